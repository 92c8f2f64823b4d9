"""Recognizing a BackdoorBench checkout and importing its modules from it."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from ..errors import UserError

# Files every BackdoorBench v2 checkout has and the plugin relies on.
MARKERS = ("defense/base.py", "utils/save_load_attack.py", "utils/aggregate_block/dataset_and_transform_generate.py",
           "utils/aggregate_block/model_trainer_generate.py", "config/defense")


class NotACheckoutError(UserError, FileNotFoundError):
    """The folder is not a BackdoorBench checkout; the message lists what is missing."""


def missing_markers(root: Path) -> List[str]:
    return [m for m in MARKERS if not (Path(root) / m).exists()]


def is_checkout(root: Optional[Path]) -> bool:
    return root is not None and Path(root).is_dir() and not missing_markers(Path(root))


def require_checkout(root: Path) -> Path:
    root = Path(root).resolve()
    if not root.is_dir():
        raise NotACheckoutError(f"{root} does not exist; give the folder of a BackdoorBench clone "
                                "(git clone https://github.com/SCLBD/BackdoorBench)")
    missing = missing_markers(root)
    if missing:
        raise NotACheckoutError(f"{root} is not a BackdoorBench checkout: it lacks {', '.join(missing)}")
    return root


def find_checkout(start: Optional[Path] = None) -> Optional[Path]:
    """The checkout holding ``start`` (default: the working directory), if any."""
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if is_checkout(folder):
            return folder
    return None


def _from_checkout(module, root: str) -> bool:
    """Whether a module (or a namespace package, which has no file) lives under ``root``.
    A namespace package's path is recomputed from its parent package on access, so this
    must be asked while the parent is still in ``sys.modules``."""
    try:
        places = [getattr(module, "__file__", None) or "", *list(getattr(module, "__path__", None) or [])]
    except Exception:  # a path that cannot be computed: keep the module rather than guess
        return False
    return any(str(p).startswith(root + os.sep) for p in places)


@contextlib.contextmanager
def bench_imports(root: Path) -> Iterator[None]:
    """Make ``import utils...``/``defense...`` resolve to the checkout's modules, as its
    scripts expect (they run from the checkout root). On the way out the checkout's modules
    imported here are forgotten too: its generic names (``utils``, ``models``) would
    otherwise answer a later import meant for another checkout, or for another package."""
    root = str(Path(root).resolve())
    added = root not in sys.path
    before = set(sys.modules)
    if added:
        sys.path.insert(0, root)
    try:
        yield
    finally:
        if added and root in sys.path:
            sys.path.remove(root)
        # Decide for every module first, then forget: see _from_checkout.
        ours = [n for n in list(sys.modules) if n not in before and _from_checkout(sys.modules[n], root)]
        for name in ours:
            del sys.modules[name]
