"""Interrupted runs resume to the same numbers, writes cannot tear, seeds reproduce."""

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

from pgbd_defense.run import main

from .test_records import _write

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--epochs", "30", "--batch-size", "4", "--ratio", "1.0", "--lambda", "1", "--update-gap", "4",
            "--no-progress"]
NUMBERS = ("ca", "asr", "ra", "dem", "ca_poisoned", "asr_poisoned")


@pytest.fixture
def record(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    return folder, tiny_data


def _cli(record, name, *extra):
    folder, data_root = record
    return ["--record", str(folder), "--data-root", str(data_root), "--defense-name", name, *SETTINGS, *extra]


def _numbers(record, name):
    out = record[0] / "defense" / name
    summary = json.loads((out / "summary.json").read_text())
    df = pd.read_csv(out / f"{name}_df.csv", index_col=0)
    return {k: summary[k] for k in NUMBERS}, df


def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_numbers(record):
    assert main(_cli(record, "ref")) == 0
    env = {**os.environ, "PGBD_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "pgbd_defense.run", *_cli(record, "killed")], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = record[0] / "defense" / "killed" / "checkpoint" / "last.pt"
    deadline = time.time() + 120
    epoch = -1
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.is_file():
            epoch = torch.load(checkpoint, weights_only=False)["epoch"]
            if epoch >= 3:
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= epoch < 29, "the run was not caught mid-way"
    assert not (record[0] / "defense" / "killed" / "summary.json").exists()
    assert main(_cli(record, "killed", "--resume")) == 0
    ref_summary, ref_df = _numbers(record, "ref")
    got_summary, got_df = _numbers(record, "killed")
    assert got_summary == ref_summary
    pd.testing.assert_frame_equal(got_df, ref_df)
    assert not checkpoint.exists()  # superseded by the results


def test_resume_with_other_settings_is_refused(record, caplog, monkeypatch):
    cli = _cli(record, "r")
    cli[cli.index("--epochs") + 1] = "2"
    import pgbd_defense.defenses.loop as loop_module
    real = loop_module.atomic_torch_save

    def save_then_interrupt(obj, path):  # Ctrl-C right after the first epoch's checkpoint
        real(obj, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop_module, "atomic_torch_save", save_then_interrupt)
    assert main(cli) == 130
    monkeypatch.setattr(loop_module, "atomic_torch_save", real)
    assert (record[0] / "defense" / "r" / "checkpoint" / "last.pt").is_file()
    assert "--resume" in caplog.text
    assert main([*cli, "--resume", "--lr", "0.5"]) == 2
    assert "other settings" in caplog.text
    assert main([*cli, "--resume"]) == 0


def test_two_seeded_runs_give_identical_results(record):
    assert main(_cli(record, "a", "--seed", "3", "--epochs", "3")) == 0
    assert main(_cli(record, "b", "--seed", "3", "--epochs", "3")) == 0
    assert main(_cli(record, "c", "--seed", "4", "--epochs", "3")) == 0
    a, b, c = (_numbers(record, n) for n in "abc")
    assert a[0] == b[0]
    pd.testing.assert_frame_equal(a[1], b[1])
    assert not a[1]["train_epoch_loss_avg_over_batch"].equals(c[1]["train_epoch_loss_avg_over_batch"])
    summary = json.loads((record[0] / "defense" / "a" / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["environment"]["torch"] == torch.__version__


WRITER = """
import sys, torch
from pgbd_defense.util.atomic import atomic_torch_save
i = 0
while True:
    i += 1
    atomic_torch_save({"version": i, "payload": torch.full((2_000_000,), float(i))}, sys.argv[1])
"""


@pytest.mark.parametrize("delay", [0.3, 0.77, 1.31])
def test_kill_during_save_leaves_a_loadable_file(tmp_path, delay):
    target = tmp_path / "result.pt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], env=env)
    deadline = time.time() + 60
    while not target.exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(target, weights_only=False)
    assert saved["version"] >= 1
    assert torch.all(saved["payload"] == float(saved["version"]))


def test_an_atomic_write_gets_the_permissions_a_plain_write_gets(tmp_path):
    # mkstemp makes its file 0600; results written through it must be as readable as any other
    # file the user writes (a group sharing a record root reads each other's records and cells).
    from pgbd_defense.util.atomic import atomic_torch_save, atomic_write_text

    for umask, mode in ((0o022, 0o644), (0o027, 0o640), (0o002, 0o664)):
        folder = tmp_path / oct(umask)
        folder.mkdir()
        old = os.umask(umask)
        try:
            (folder / "plain.txt").write_text("x")
            atomic_write_text(folder / "atomic.txt", "x")
            atomic_torch_save({"a": 1}, folder / "atomic.pt")
        finally:
            os.umask(old)
        modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
        assert modes == {"plain.txt": mode, "atomic.txt": mode, "atomic.pt": mode}, oct(umask)


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from pgbd_defense.util.atomic import atomic_path

    target = tmp_path / "results.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_an_atomic_write_never_reuses_another_writers_temporary(tmp_path, monkeypatch):
    # Two processes writing one target each create their own temporary: a name already taken
    # (another writer's half-written file) is skipped, never truncated.
    from pgbd_defense.util import atomic

    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    target = tmp_path / "cell.json"
    with atomic.atomic_path(target) as first:
        first.write_text("writer one")
        with atomic.atomic_path(target) as second:
            assert second != first and first.read_text() == "writer one"
            second.write_text("writer two")
    assert target.read_text() == "writer one"  # the outer write replaced last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cell.json"]
