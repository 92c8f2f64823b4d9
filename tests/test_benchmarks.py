"""Every script in benchmarks/ runs in its smoke mode, so an import or API change that
breaks one fails CI (the real measurements stay manual commands: they take minutes and
their numbers mean nothing on a busy machine)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import needs_fashion_mnist

BENCHMARKS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py"))


def test_every_benchmark_is_found():
    assert {p.name for p in BENCHMARKS} >= {"cost.py", "prototype_memory.py"}


@needs_fashion_mnist()
@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_runs_in_smoke_mode(script, tmp_path):
    env = {**os.environ, "PGBD_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "a benchmark prints its measurements"
