"""Grids in parallel: the submitit backend (its local executor, for real), a local pool of
workers sharing a record, a launch killed mid-cell and relaunched, two launches at once, and
the errors of a bad executor setting. Every way must give the serial run's table, to the last
digit (one torch thread per cell everywhere: the thread count changes float rounding)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from pgbd_defense.experiments import runner, table2
from pgbd_defense.experiments.cells import cell_done

from . import tiny_table

REPO = Path(__file__).resolve().parents[1]
NUMBERS = tiny_table.NUMBERS
_argv, _cells = tiny_table.argv, tiny_table.defense_cells


@pytest.fixture(autouse=True)
def tiny_preset(monkeypatch):
    tiny_table.use_in_test(monkeypatch)


def _same_numbers(a, b) -> None:
    x, y = _cells(a), _cells(b)
    assert list(x.index) == list(y.index) and len(x) == 4
    pd.testing.assert_frame_equal(x[NUMBERS], y[NUMBERS], check_exact=True)
    assert (Path(a) / "table2.csv").read_text() == (Path(b) / "table2.csv").read_text()


@pytest.fixture
def serial(tmp_path, tiny_data):
    """The reference: the tiny grid run serially in this process."""
    out = tmp_path / "serial"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_serial", out, "--check")) == 0
    return out


def _launch(tmp_path, data, root, out, *extra, epochs=1):
    """A table2 launch in its own process group; its output goes to files (a pipe nobody reads
    until the end would block a chatty child once the pipe's buffer is full). ``_stderr`` reads it."""
    env = {**os.environ, "TINY_EPOCHS": str(epochs), "PGBD_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    log = tmp_path / f"{Path(out).name}_{time.monotonic_ns()}.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "tiny_table.py"),
                                 *_argv(data, root, out, *extra)],
                                env=env, stdout=subprocess.DEVNULL, stderr=sink, text=True, start_new_session=True)
    proc.log = log
    return proc


def _stderr(proc) -> str:
    return proc.log.read_text()


def test_submitit_local_executor_gives_the_serial_table(tmp_path, tiny_data, serial):
    pytest.importorskip("submitit")
    out = tmp_path / "submitit"
    argv = _argv(tiny_data, tmp_path / "rec_submitit", out, "--executor", "slurm", "--slurm-cluster", "local",
                 "--slurm-time", "10", "--wait")
    assert table2.main(argv) == 0
    _same_numbers(serial, out)
    assert (out / "slurm_logs" / "jobs.json").is_file() and list((out / "slurm_logs").glob("*_log.err"))


def test_local_workers_share_one_record_and_give_the_serial_table(tmp_path, tiny_data, serial, capfd):
    out = tmp_path / "local"
    assert table2.main(_argv(tiny_data, tmp_path / "rec_local", out, "--executor", "local", "--workers", "2")) == 0
    _same_numbers(serial, out)
    assert capfd.readouterr().err.count("making the badnet record") == 1  # two workers, one training
    assert set(pd.read_csv(out / "cells.csv")["status"]) == {"ok"}
    assert "(1 thread per cell, 2 local workers)" in (out / "table2.md").read_text()  # the cells' threads


def test_a_launch_killed_mid_cell_is_completed_by_the_next_and_loses_nothing(tmp_path, tiny_data, request):
    # The uninterrupted reference runs beside the launch to be killed (one thread each, two cores).
    reference = tmp_path / "reference"
    ref_proc = _launch(tmp_path, tiny_data, tmp_path / "rec_ref", reference, epochs=40)
    request.addfinalizer(lambda: ref_proc.poll() is None and os.killpg(ref_proc.pid, signal.SIGKILL))
    root, out = tmp_path / "rec_killed", tmp_path / "killed"
    proc = _launch(tmp_path, tiny_data, root, out, epochs=40)
    # The second cell (pgbd, seed 0) runs after the first finished: kill it after some epochs.
    deadline = time.time() + 600
    while not list(root.glob("*/defense/pgbd_*/checkpoint/last.pt")):
        assert proc.poll() is None and time.time() < deadline, _stderr(proc)[-2000:]
        time.sleep(0.2)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ref_proc.wait(timeout=600) == 0, _stderr(ref_proc)[-2000:]
    status = subprocess.run([sys.executable, str(REPO / "tests" / "tiny_table.py"),
                             *_argv(tiny_data, root, out, "--status")], capture_output=True, text=True,
                            env={**os.environ, "TINY_EPOCHS": "40"})
    assert "4 cells: 1 done, 0 running, 0 failed, 3 queued" in status.stdout, status.stdout + status.stderr
    proc = _launch(tmp_path, tiny_data, root, out, epochs=40)
    assert proc.wait(timeout=600) == 0, _stderr(proc)[-2000:]
    cells = _cells(out)
    assert cells.loc[("ft", 0), "status"] == "cached"  # finished before the kill: read, not rerun
    assert cells.loc[("pgbd", 0), "status"] == "ok"  # redone, from its checkpoint
    _same_numbers(reference, out)


def test_two_launches_at_once_compute_each_cell_once(tmp_path, tiny_data, serial):
    root = tmp_path / "rec_shared"
    procs = [_launch(tmp_path, tiny_data, root, tmp_path / name) for name in ("first", "second")]
    for p in procs:
        assert p.wait(timeout=600) == 0, _stderr(p)[-2000:]
    errs = "".join(_stderr(p) for p in procs)
    assert errs.count("making the badnet record") == 1
    first, second = _cells(tmp_path / "first"), _cells(tmp_path / "second")
    for key in first.index:  # each cell computed by one launch and read by the other
        assert {first.loc[key, "status"], second.loc[key, "status"]} == {"ok", "cached"}, key
    _same_numbers(tmp_path / "first", tmp_path / "second")
    _same_numbers(serial, tmp_path / "first")


@pytest.mark.parametrize("executor", [[], ["--executor", "local", "--workers", "2"]], ids=["serial", "local"])
def test_a_launch_skips_a_cell_another_process_holds_and_comes_back_to_it(tmp_path, tiny_data, executor):
    # Another launch "runs" the grid's first cell (this test holds its lock): the launch must do
    # the other cells meanwhile, not wait in line behind it (two launches would go in lockstep).
    root, out = tmp_path / "rec", tmp_path / "out"
    args = table2.build_parser().parse_args(_argv(tiny_data, root, out))
    jobs = table2.plan_jobs(table2.PRESETS["tiny"], table2.PROTOCOLS["equal-budget"], args, ["mnist"], ["badnet"],
                            ["ft", "pgbd"], None, [0, 1], [0])
    held, others = jobs[0], jobs[1:]
    lock = runner.cell_lock(held.cell)
    lock.acquire()
    proc = _launch(tmp_path, tiny_data, root, out, *executor)
    try:
        deadline = time.time() + 600
        while not all(cell_done(j.cell) for j in others):
            assert proc.poll() is None and time.time() < deadline, _stderr(proc)[-2000:]
            time.sleep(0.2)
        time.sleep(2 * runner.LOCK_POLL_SECONDS)  # it keeps coming back to the held cell, and waits
        assert proc.poll() is None and not cell_done(held.cell)
    finally:
        lock.release()
    assert proc.wait(timeout=600) == 0, _stderr(proc)[-2000:]
    cells = _cells(out)
    assert set(cells["status"]) == {"ok"} and len(cells) == 4  # the held cell too, once it was free


@pytest.mark.parametrize("extra, message", [
    (["--executor", "local", "--workers", "0"], "workers=0 (must be >= 1)"),
    (["--executor", "slurm", "--slurm-extra", "account"], "--slurm-extra 'account': write KEY=VALUE"),
    (["--executor", "local", "--devices", "cuda:0", "--workers", "2"], "at most one worker per device"),
    (["--executor", "slurm", "--slurm-time", "0"], "slurm_time=0"),
])
def test_bad_executor_settings_fail_in_one_line_and_write_nothing(tmp_path, tiny_data, caplog, extra, message):
    out = tmp_path / "out"
    assert table2.main(_argv(tiny_data, tmp_path / "rec", out, *extra)) == 2
    assert message in caplog.text and len(caplog.records) == 1
    assert not out.exists() and not (tmp_path / "rec").exists()


def test_slurm_parameters_from_a_yaml_section_and_flags_win(tmp_path):
    from pgbd_defense.experiments import runner
    config = tmp_path / "cluster.yaml"
    config.write_text("slurm:\n  partition: gpu\n  time: 300\n  gpus_per_task: 1\n"
                      "  extra: {account: abc, qos: high}\n")
    args = table2.build_parser().parse_args(["--executor", "slurm", "--slurm-config", str(config),
                                             "--slurm-time", "30", "--slurm-extra", "qos=low"])
    spec = runner.executor_spec(args, tmp_path / "out")
    assert (spec.slurm_partition, spec.slurm_time, spec.gpus_per_task, spec.array_parallelism) == ("gpu", 30, 1, 16)
    assert spec.slurm_extra == {"account": "abc", "qos": "low"}
    plain = runner.executor_spec(table2.build_parser().parse_args(["--executor", "slurm"]), tmp_path / "out")
    assert (plain.slurm_partition, plain.slurm_time, plain.gpus_per_task, plain.slurm_extra) == (None, 240, 0, {})


@pytest.mark.parametrize("text, message", [
    ("slurm:\n  partiton: gpu\n", "unknown keys ['partiton']"),
    ("partition: gpu\n", "needs a mapping under 'slurm:'"),
    ("slurm:\n  time: long\n", "time must be an integer"),
])
def test_a_bad_slurm_config_fails_in_one_line_and_writes_nothing(tmp_path, tiny_data, caplog, text, message):
    config = tmp_path / "cluster.yaml"
    config.write_text(text)
    out = tmp_path / "out"
    assert table2.main(_argv(tiny_data, tmp_path / "rec", out, "--executor", "slurm",
                             "--slurm-config", str(config))) == 2
    assert message in caplog.text and len(caplog.records) == 1
    assert not out.exists() and not (tmp_path / "rec").exists()


def test_the_missing_extra_is_named(tmp_path, tiny_data, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now fails
    out = tmp_path / "out"
    assert table2.main(_argv(tiny_data, tmp_path / "rec", out, "--executor", "slurm")) == 2
    assert "pip install 'pgbd-defense[cluster]'" in caplog.text and not out.exists()


def test_assemble_writes_what_finished_and_marks_the_rest(tmp_path, tiny_data):
    root = tmp_path / "rec"
    assert table2.main(_argv(tiny_data, root, tmp_path / "part", "--defenses", "ft")) == 0
    out = tmp_path / "assembled"
    assert table2.main(_argv(tiny_data, root, out, "--assemble")) == 0
    cells = _cells(out)
    assert set(cells.loc["ft", "status"]) == {"cached"} and set(cells.loc["pgbd", "status"]) == {"queued"}
    text = (out / "table2.md").read_text()
    assert "Not finished: 2 cells queued" in text
    # the cells' and the record's thread counts as they recorded them, not the assembling process's
    assert "(1 thread per cell); assembled from the cells finished so far" in text
    assert "Records built at 1 thread: badnet on mnist" in text
    made = json.loads(next(root.glob("*/provenance.json")).read_text())
    assert made["threads"] == "1" and made["seconds"] > 0 and made["torch"] == torch.__version__
    # a record made before records kept provenance.json is named as such, not guessed
    next(root.glob("*/provenance.json")).unlink()
    assert table2.main(_argv(tiny_data, root, out, "--assemble")) == 0
    assert "Records built at a thread count not known" in (out / "table2.md").read_text()
    next(root.iterdir()).joinpath("provenance.json").write_text("[1]")  # JSON, but not an object
    assert table2.main(_argv(tiny_data, root, out, "--assemble")) == 0
    assert "Records built at a thread count not known" in (out / "table2.md").read_text()


def test_plan_counts_the_cells_and_times_them_measured_or_estimated(tmp_path, tiny_data, capsys):
    root = tmp_path / "rec"
    assert table2.main(_argv(tiny_data, root, tmp_path / "plan", "--plan")) == 0
    text = capsys.readouterr().out
    assert "1 records, 4 cells (0 already finished)" in text
    assert "| mnist | ft | 2 | 2 |" in text and "estimated" in text
    assert not root.exists()  # a plan runs nothing
    assert table2.main(_argv(tiny_data, root, tmp_path / "part", "--defenses", "ft")) == 0
    capsys.readouterr()
    assert table2.main(_argv(tiny_data, root, tmp_path / "plan", "--plan")) == 0
    text = capsys.readouterr().out
    assert "| mnist | ft | 2 | 0 |" in text and "measured (2 cells)" in text and "| mnist | pgbd | 2 | 2 |" in text


def test_a_setting_changed_for_every_cell_is_its_own_cell_and_named(tmp_path, tiny_data, caplog):
    root = tmp_path / "rec"
    assert table2.main(_argv(tiny_data, root, tmp_path / "a", "--defenses", "ft", "--set", "amp=true",
                             "--set", "lr=0.05")) == 0
    assert "Changed for every cell: amp=True, lr=0.05." in (tmp_path / "a" / "table2.md").read_text()
    cells = _cells(tmp_path / "a")
    configs = [Path(r) / "defense" / c / "config.yaml" for r, c in zip(cells["record"], cells["cell"])]
    assert len(cells) == 2 and all("amp: true" in p.read_text() and "lr: 0.05" in p.read_text() for p in configs)
    assert table2.main(_argv(tiny_data, root, tmp_path / "b", "--defenses", "ft")) == 0
    assert set(_cells(tmp_path / "b")["status"]) == {"ok"}  # without the change: other cells
    assert table2.main(_argv(tiny_data, root, tmp_path / "c", "--set", "nope=1")) == 2
    assert "'nope=1': write KEY=VALUE" in caplog.text


def test_torch_threads_sets_the_count_for_the_block_and_restores_it_even_on_an_error():
    from pgbd_defense.util.threads import torch_threads

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("a cell's bug")
    assert torch.get_num_threads() == before
    with torch_threads(None):  # None: the count is left as it is
        assert torch.get_num_threads() == before
