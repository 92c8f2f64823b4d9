"""Writes that a kill cannot tear: write a temporary file beside the target, then
rename it over the target (an atomic step on POSIX file systems)."""

from __future__ import annotations

import csv
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(target) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``target``, on error it is removed.
    The file gets the permissions a plain ``open`` would give it (mkstemp makes it 0600,
    which would hide records and results from the rest of a group sharing a record root)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(target, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


def atomic_torch_save(obj, target) -> None:
    with atomic_path(target) as tmp:
        torch.save(obj, tmp)


def atomic_write_csv(target, rows) -> None:
    """Rows (dicts with the same keys) as a CSV file with a header, written atomically."""
    with atomic_path(target) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
