"""Progress bars with labels (tqdm), silenced by PGBD_NO_PROGRESS=1 or when disabled globally."""

from __future__ import annotations

import os
from contextlib import contextmanager

from tqdm.auto import tqdm

_enabled = os.environ.get("PGBD_NO_PROGRESS", "") not in ("1", "true", "yes")


def progress(iterable, total=None, desc=None, leave=True):
    return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not _enabled or desc is None,
                dynamic_ncols=True)


@contextmanager
def quiet():
    """Silence the bars opened inside (a table's cells under the table's own bar)."""
    global _enabled
    before = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = before
