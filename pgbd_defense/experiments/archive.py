"""Carrying finished cells to another machine: a grid too long for one session (the paper
protocol at 10% is ~10 h of cells on a 2-core CPU) is finished over several, on machines
that start empty.

``--export-cells FILE`` (table2) writes every finished cell of the grid to one JSON file,
small enough to commit beside the table: the cell's settings (its ``cell.json``), its
results (its ``summary.json``) and a fingerprint of the record it ran on.
``--import-cells FILE`` takes them back: before a cell would run, an archived cell with the
same record name and the same settings becomes the cell's results, *only when the record
made on this machine is the same record* (same fingerprint). A record is deterministic for
its settings, thread count and CPU type, but another CPU type rounds differently and trains
a different model (README); cells of that other model are not this record's cells, so they
are refused (logged with the reason) and run.

The fingerprint is a SHA-256 over every tensor, array, image and number of
``attack_result.pt`` (the model's weights, the materialized poisoned splits, their labels and
indices), by key, type, shape and bytes: strings (paths, names) are not in it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..formats.safe_pickle import safe_torch_load
from ..util.atomic import atomic_write_text
from .cells import Cell, cell_done, defaults_fingerprint, wanted_settings

log = logging.getLogger(__name__)

FORMAT = "pgbd-defense cell archive"
VERSION = 1
FINGERPRINT_FILE = "fingerprint.json"


def _feed(digest, key: str, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        # the raw bytes (a 0-d tensor cannot be viewed as bytes, a 1-element one can)
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, np.ndarray):
        value = np.ascontiguousarray(value)
        digest.update(f"{key}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    elif isinstance(value, Image.Image):  # the poisoned images of a record kept in memory
        _feed(digest, key, np.asarray(value))
    elif isinstance(value, (bool, int, float, np.number)):  # labels, indices; not strings (paths)
        digest.update(f"{key}|{type(value).__name__}|{value!r}|".encode())
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _feed(digest, f"{key}/{k}", value[k])
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _feed(digest, f"{key}/{i}", v)


def content_fingerprint(raw: Dict[str, Any]) -> str:
    """SHA-256 over every tensor, array, image and number of a loaded record, in key order
    (see the module's doc).

    >>> a = content_fingerprint({"model": {"w": torch.ones(2)}, "data_path": "/x"})
    >>> a == content_fingerprint({"model": {"w": torch.ones(2)}, "data_path": "/elsewhere"})
    True
    >>> a == content_fingerprint({"model": {"w": torch.tensor([1.0, 1.0 + 2 ** -20])}})
    False
    """
    digest = hashlib.sha256()
    _feed(digest, "", raw)
    return digest.hexdigest()


def record_fingerprint(record: Path) -> str:
    """The fingerprint of ``record/attack_result.pt``, cached in ``record/fingerprint.json``
    for as long as the file's size and modification time are those it was computed for."""
    path = Path(record) / "attack_result.pt"
    stat = path.stat()
    cache = Path(record) / FINGERPRINT_FILE
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if isinstance(saved, dict) and {k: saved.get(k) for k in key} == key and saved.get("sha256"):
                return str(saved["sha256"])
        except ValueError:
            pass  # a torn or foreign file: recompute
    value = content_fingerprint(safe_torch_load(path))
    atomic_write_text(cache, json.dumps({**key, "sha256": value}) + "\n")
    return value


def match_key(cell: Cell) -> str:
    """What identifies a cell across machines: its record's name and its settings, with the
    clean-subset index file named by its file name (its folder is this machine's record root)."""
    identity = cell.identity()
    settings = dict(identity["settings"])
    if "index" in settings:
        settings["index"] = Path(str(settings["index"])).name
    return json.dumps({"record": Path(cell.record).name, **identity, "settings": settings},
                      sort_keys=True, default=str)


def export_cells(cells: Iterable[Cell], path: Path, keep: Iterable[Dict[str, Any]] = ()) -> int:
    """Write the finished ones of ``cells`` to ``path``, and after them the entries ``keep``
    (an imported archive's cells that this grid does not cover, so that exporting a slice to
    the file it imported from loses nothing); returns how many entries were written."""
    entries = list(keep)
    for cell in cells:
        if not cell_done(cell):
            continue
        entries.append({"key": match_key(cell), "record_fingerprint": record_fingerprint(cell.record),
                        "defaults": defaults_fingerprint(),
                        "summary": json.loads((cell.folder / "summary.json").read_text())})
    atomic_write_text(Path(path), json.dumps({"format": FORMAT, "version": VERSION, "cells": entries},
                                             indent=1, sort_keys=True) + "\n")
    return len(entries)


def read_archive(path: Path) -> Dict[str, Dict[str, Any]]:
    """``path``'s cells by match key; a file that is not an archive is a ConfigError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--import-cells {path}: no such file") from None
    except ValueError as e:
        raise ConfigError(f"--import-cells {path}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION \
            or not isinstance(data.get("cells"), list):
        raise ConfigError(f"--import-cells {path}: not a cell archive of version {VERSION} "
                          "(write one with table2 --export-cells)")
    out = {}
    for entry in data["cells"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                and isinstance(entry.get("summary"), dict) and isinstance(entry.get("record_fingerprint"), str)):
            raise ConfigError(f"--import-cells {path}: a malformed cell entry ({str(entry)[:200]})")
        out[entry["key"]] = entry
    return out


def import_cell(cell: Cell, archive: Dict[str, Dict[str, Any]]) -> Tuple[bool, Optional[str]]:
    """Make ``cell`` finished from ``archive`` when it holds this cell on this record. Returns
    (imported, why not); not imported without a reason: the archive does not hold the cell.
    A finished cell is never overwritten. The caller holds the cell's lock."""
    entry = archive.get(match_key(cell))
    if entry is None or cell_done(cell):
        return False, None
    if entry.get("defaults") != defaults_fingerprint():
        return False, "made under other preset defaults or another version (its cell would differ)"
    if entry["record_fingerprint"] != record_fingerprint(cell.record):
        return False, ("the record here differs from the one the cell ran on (another CPU type or thread "
                       "count trains another model)")
    cell.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cell.folder / "summary.json", json.dumps(entry["summary"], indent=1) + "\n")
    (cell.folder / "failed.json").unlink(missing_ok=True)
    # written last: it is what makes the cell finished (cells.cell_done)
    atomic_write_text(cell.folder / "cell.json", json.dumps(wanted_settings(cell), indent=1) + "\n")
    return True, None


def unmatched_entries(cells: Iterable[Cell], archive: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Archived cells no cell of the grid matches (another grid's, or settings changed since)."""
    wanted = {match_key(c) for c in cells}
    return [entry for key, entry in archive.items() if key not in wanted]
