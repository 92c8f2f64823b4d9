"""The BackdoorBench plugin in a stand-in checkout (tests/fake_bench.py): install is
idempotent and reversible, --check reports readiness, and defense/pgbd.py runs like a
built-in defense, writing BackdoorBench's defense folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgbd_defense.install import MANIFEST, check, install, main as install_main, planned_files, uninstall

from .fake_bench import make_fake_checkout
from .test_records import _write

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(tmp_path, tiny_data):
    _write(tmp_path, tiny_data, save_png=True)  # record at <tmp>/bench/record/tiny
    return make_fake_checkout(tmp_path / "bench", tiny_data)


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_install_adds_only_new_files_and_is_idempotent(bench):
    before = _tree(bench)
    added, same = install(bench)
    assert sorted(added) == sorted(planned_files()) and same == []
    after = _tree(bench)
    assert sorted(set(after) - set(before)) == sorted([*planned_files(), MANIFEST])
    assert set(before) <= set(after)
    assert install(bench) == ([], list(planned_files()))
    assert _tree(bench) == after


def test_uninstall_removes_exactly_what_was_added(bench):
    before = _tree(bench)
    install(bench)
    removed = uninstall(bench)
    assert sorted(removed) == sorted(planned_files())
    assert _tree(bench) == before
    assert uninstall(bench) == []


def test_uninstall_refuses_to_delete_an_edited_file(bench, capsys):
    install(bench)
    launcher = bench / "defense" / "pgbd.py"
    launcher.write_text(launcher.read_text() + "# my change\n")
    assert install_main(["--bench-root", str(bench), "--uninstall"]) == 2
    assert "edited since installation: defense/pgbd.py" in capsys.readouterr().err
    assert launcher.is_file()
    assert install_main(["--bench-root", str(bench), "--uninstall", "--force"]) == 0
    assert not launcher.exists()


def test_install_never_overwrites_a_foreign_file(bench, capsys):
    (bench / "defense" / "pgbd.py").write_text("# someone else's defense\n")
    assert install_main(["--bench-root", str(bench)]) == 2
    assert "not from pgbd-defense" in capsys.readouterr().err
    assert (bench / "defense" / "pgbd.py").read_text() == "# someone else's defense\n"
    assert not (bench / "config" / "defense" / "pgbd").exists()


def test_not_a_checkout_is_named(tmp_path, capsys):
    assert install_main(["--bench-root", str(tmp_path)]) == 2
    assert "lacks defense/base.py" in capsys.readouterr().err


def test_check_reports_each_requirement(bench):
    results = {what: ok for what, ok, _ in check(bench)}
    assert results["BackdoorBench checkout"] and not results["plugin installed"]
    install(bench)
    results = check(bench)
    assert all(ok for _, ok, _ in results), results


def test_launcher_runs_like_a_builtin_defense(bench):
    install(bench)
    env = {**os.environ, "PGBD_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "./defense/pgbd.py", "--result_file", "tiny", "--yaml_path",
           "./config/defense/pgbd/config.yaml", "--dataset", "mnist", "--preset", "cpu", "--epochs", "2",
           "--batch_size", "16", "--ratio", "0.5", "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = bench / "record" / "tiny" / "defense" / "pgbd"
    for name in ("defense_result.pt", "pgbd_df.csv", "pgbd_df_summary.csv", "index.txt", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == "pgbd" and summary["clean_samples"] == 60
    # The benchmark's own test transform supplied the normalization (0.5, 0.5) and its data loader the images.
    config = (out / "config.yaml").read_text()
    assert "epochs: 2" in config
    # A second run refuses to overwrite, as the standalone command does.
    again = subprocess.run(cmd, cwd=bench, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
