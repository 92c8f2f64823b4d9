"""Where and how a result was made: commit, date, machine, the versions that decide the numbers,
and torch's thread count.

Tables and attack records both carry it: the thread count changes the order of floating-point
sums, so two records made by the same command at different thread counts differ (an IAB record
at 5 epochs implants 96.4% at one thread and 59.9% at two: docs/attacks.md)."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path
from typing import Dict

import torch

from .. import __version__


def provenance() -> Dict[str, str]:
    """What a committed table or a record must say about where it was made."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} x {len(names)}" if names else cpu
    return {"commit": commit, "date": datetime.date.today().isoformat(), "machine": cpu,
            "torch": torch.__version__, "threads": str(torch.get_num_threads()), "pgbd_defense": __version__}


def threads_text(threads) -> str:
    """``1`` -> ``1 thread``, ``2`` -> ``2 threads``; a description (a pool's threads per cell) as it is."""
    text = str(threads)
    if not text.isdigit():
        return text
    return f"{text} thread" + ("" if text == "1" else "s")


def environment() -> Dict[str, str]:
    """Versions that decide the numbers, saved with every result (torch's thread count among
    them: it changes the order of floating-point sums)."""
    import numpy
    import sklearn
    import torchvision

    return {"pgbd_defense": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "torch_threads": str(torch.get_num_threads())}
