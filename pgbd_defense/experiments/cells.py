"""Cached experiment cells, shared by the Table 2, sweep, variants and figures commands and
by ``run --compare``.

A cell is one defense, with one preset (and optionally a YAML file) and a dict of
settings that override it, run on one attack record through :func:`pipeline.defend`.
Its results live where BackdoorBench keeps a defense's results,
``<record>/defense/<name>/``, the name digesting the cell's settings, with ``cell.json``
recording exactly which settings made them; a cell whose ``summary.json`` exists for the
same settings is read, not rerun. Every defense of a record gets the same clean subset
(one index file per record and seed), as a side-by-side comparison needs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from .. import __version__
from ..attacks.record import AttackSettings, build_attack_record, record_name
from ..defenses.loop import ResumeMismatchError
from ..errors import UserError
from ..formats.records import load_attack_record
from ..pipeline import defend, draw_clean_subset, load_record
from ..settings import DEFENSE_OVERRIDES, FIELDS, PRESET_NAMES, read_yaml, resolve
from ..util.atomic import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One defense on one record: ``settings`` override the ``preset`` (and the YAML file
    ``config``, if given); ``label`` is how tables name it (default: the defense)."""

    record: Path
    defense: str
    settings: Dict[str, Any] = field(default_factory=dict)
    preset: str = "cpu"
    config: Optional[str] = None
    label: str = ""

    def identity(self) -> Dict[str, Any]:
        return {"defense": self.defense, "preset": self.preset, "config": self.config,
                "settings": {k: self.settings[k] for k in sorted(self.settings)}}

    @property
    def name(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{self.defense}_{digest}"

    @property
    def folder(self) -> Path:
        return Path(self.record) / "defense" / self.name


def add_cell_arguments(parser, out_default: str) -> None:
    """The options every cached-cell command shares (sweep, variants table)."""
    parser.add_argument("--out", default=out_default)
    parser.add_argument("--record-root", default="record", help="where attack records go (shared with table2)")
    parser.add_argument("--data-root")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recompute", action="store_true", help="rerun finished cells")
    parser.add_argument("-v", "--verbose", action="store_true")


def ensure_record(settings: AttackSettings, record_root: Path, data_root: Optional[str] = None,
                  device: str = "cpu") -> Path:
    folder = Path(record_root) / record_name(settings)
    if not (folder / "attack_result.pt").is_file():
        log.info("making the %s record on %s", settings.attack, settings.dataset)
        build_attack_record(folder, settings, data_root=data_root, device=device, save_png=False)
    return folder


def shared_index(record: Path, ratio: float, seed: int, data_root: Optional[str] = None) -> Path:
    """One clean-subset index file per record and seed, drawn as a run draws it."""
    path = Path(record) / f"clean_subset_{ratio:g}_{seed}.txt"
    if not path.is_file():
        n_train = len(load_attack_record(record, data_root=data_root).clean_train)
        atomic_write_text(path, "".join(f"{i}\n" for i in draw_clean_subset(n_train, ratio, seed)))
    return path


def defaults_fingerprint() -> str:
    """Changes whenever a preset's defense-side values change, so a cached cell made under
    other defaults (same cell settings, different meaning) is recomputed, not reused. The
    attack section only says how the standalone path makes a record, and a cell always runs
    on a given record (whose name digests its attack settings), so it is left out; so is a field
    added later while it keeps its neutral value (``Field.neutral``)."""
    presets = {preset: {name: f.value_in(preset) for name, f in FIELDS.items()
                        if "attack" not in f.uses and not (f.neutral is not None and f.value_in(preset) == f.neutral)}
               for preset in PRESET_NAMES}
    text = json.dumps([__version__, presets, DEFENSE_OVERRIDES], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def wanted_settings(cell: Cell) -> Dict:
    """What ``cell.json`` holds when the cell's results are the current settings' results."""
    return json.loads(json.dumps({**cell.identity(), "defaults": defaults_fingerprint()}, default=str))


def cell_done(cell: Cell) -> bool:
    """Whether the cell finished with its current settings (``cell.json`` is written last)."""
    settings_path = cell.folder / "cell.json"
    return (cell.folder / "summary.json").is_file() and settings_path.is_file() \
        and json.loads(settings_path.read_text()) == wanted_settings(cell)


def run_cell(cell: Cell, data_root: Optional[str] = None, recompute: bool = False, device: str = "cpu") -> Dict:
    """Run (or read) one cell; a failure becomes a row with its reason and log (and the
    cell's ``failed.json``), not an exception. A cell killed mid-run continues from its last
    finished epoch (its checkpoint) when rerun with the same settings."""
    row = {"record": str(cell.record), "defense": cell.label or cell.defense, "cell": cell.name}
    summary_path = cell.folder / "summary.json"
    settings_path = cell.folder / "cell.json"
    wanted = wanted_settings(cell)
    if not recompute and cell_done(cell):
        return {**row, **json.loads(summary_path.read_text()), "status": "cached"}
    started = time.time()
    error = None
    settings_path.unlink(missing_ok=True)  # results being replaced are not this cell's until it finishes
    try:
        settings = resolve(cell.preset, cell.defense, read_yaml(cell.config),
                           {**cell.settings, "device": device, "data_root": data_root}, source=cell.config or "config")
        record = load_record(cell.record, settings)
        resume = not recompute and (cell.folder / "checkpoint" / "last.pt").is_file()
        try:
            defend(settings, record, cell.record, name=cell.name, overwrite=True, resume=resume)
        except ResumeMismatchError:  # a checkpoint of other settings: start over
            record = load_record(cell.record, settings)
            defend(settings, record, cell.record, name=cell.name, overwrite=True)
    except UserError as e:
        error = f"{type(e).__name__}: {e}"
        log.error("cell %s failed: %s", cell.name, error)
    except Exception as e:  # one broken cell must not lose the others
        error = f"{type(e).__name__}: {e}"
        log.error("cell %s failed:\n%s", cell.name, traceback.format_exc())
    if error is None and summary_path.is_file():
        (cell.folder / "failed.json").unlink(missing_ok=True)
        atomic_write_text(settings_path, json.dumps(wanted, indent=1) + "\n")
        return {**row, **json.loads(summary_path.read_text()), "status": "ok"}
    logs = sorted((cell.folder / "log").glob("*.log"))
    failed = {"status": "failed", "error": error or "no summary written", "seconds": round(time.time() - started, 1),
              "log": str(logs[-1]) if logs else ""}
    atomic_write_text(cell.folder / "failed.json", json.dumps(failed, indent=1) + "\n")
    return {**row, **failed}
