"""Writes that a kill cannot tear: write a temporary file beside the target, then
rename it over the target (an atomic step on POSIX file systems)."""

from __future__ import annotations

import csv
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

_NAME_TRIES = 100


def _create_beside(target: Path) -> Path:
    """A new empty file next to ``target`` with the permissions a plain ``open`` gives
    (0666 less the umask, applied by the kernel). Not ``tempfile.mkstemp``: it makes 0600
    files, which would hide records and results from the rest of a group sharing a record
    root, and reading the umask to widen them afterwards needs os.umask's set-and-restore,
    which races with any thread creating a file in between."""
    for _ in range(_NAME_TRIES):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {target} after {_NAME_TRIES} names")


@contextmanager
def atomic_path(target) -> Iterator[Path]:
    """Yield a temporary path; on success it replaces ``target``, on error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_beside(target)
    try:
        yield tmp
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
