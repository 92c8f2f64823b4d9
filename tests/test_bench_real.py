"""Against a real BackdoorBench checkout, when BACKDOORBENCH_ROOT names one (skipped in CI).

    BACKDOORBENCH_ROOT=~/BackdoorBench BACKDOORBENCH_RECORD=badnet_0_1 BACKDOORBENCH_DATASET=cifar10 \\
        python -m pytest tests/test_bench_real.py

The checkout needs the benchmark's requirements in this Python, a record under
record/, and its clean data under data/. The test installs the plugin, copies the record
to a scratch record folder (so no result of the checkout is touched), runs the launcher
for one epoch on it, removes the copy, and uninstalls again if it installed (a checkout
that already had the plugin keeps it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pgbd_defense.bench.installer import MANIFEST, check, install, uninstall

ROOT = os.environ.get("BACKDOORBENCH_ROOT")
pytestmark = pytest.mark.skipif(not ROOT, reason="BACKDOORBENCH_ROOT is not set (no BackdoorBench checkout)")


@pytest.mark.timeout(3600)  # a full-size model on a CPU: ~15 min for one epoch and the evaluations
def test_install_check_launcher_uninstall_on_a_real_checkout():
    root = Path(ROOT)
    record = os.environ.get("BACKDOORBENCH_RECORD", "badnet_0_1")
    dataset = os.environ.get("BACKDOORBENCH_DATASET", "cifar10")
    had_plugin = (root / MANIFEST).is_file()
    scratch = f"{record}__pgbd_test"
    install(root)
    try:
        failed = [(what, detail) for what, ok, detail in check(root) if not ok]
        assert not failed, failed
        shutil.rmtree(root / "record" / scratch, ignore_errors=True)  # a copy left by an interrupted run
        shutil.copytree(root / "record" / record, root / "record" / scratch, ignore=shutil.ignore_patterns("defense"))
        out = root / "record" / scratch / "defense" / "pgbd"
        cmd = [sys.executable, "./defense/pgbd.py", "--result_file", scratch, "--yaml_path",
               "./config/defense/pgbd/config.yaml", "--dataset", dataset, "--preset", "cpu", "--epochs", "1",
               "--device", "cpu"]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PGBD_NO_PROGRESS": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["asr_poisoned"] > 0.5 and 0 <= summary["asr"] <= 1
        for name in ("defense_result.pt", "pgbd_df.csv", "pgbd_df_summary.csv", "index.txt"):
            assert (out / name).is_file(), name
    finally:
        shutil.rmtree(root / "record" / scratch, ignore_errors=True)
        if not had_plugin:
            uninstall(root)
