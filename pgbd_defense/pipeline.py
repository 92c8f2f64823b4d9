"""The library entry point: make or reuse a record, check a run's settings, and defend a
record into its BackdoorBench-style defense folder.

    >>> from pgbd_defense.settings import resolve
    >>> from pgbd_defense.pipeline import defend, load_record
    >>> settings = resolve("cpu", "pgbd", overrides={"epochs": 2})      # doctest: +SKIP
    >>> result = defend(settings, load_record("record/badnet_0_1"))     # doctest: +SKIP
    >>> result.summary["asr"]                                          # doctest: +SKIP

Every caller goes through here: the command line (``run.py``), experiment cells
(``experiments/cells.py``), the Table 2, sweep, variants and figures commands, and the
plugin inside a BackdoorBench checkout (``bench/plugin.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import datasets as data_mod
from .attacks.record import AttackSettings, build_attack_record, record_name
from .datasets.batches import Normalizer
from .defenses import DEFENSES, MAPPED, build_method, defense_config
from .defenses.loop import PhaseClock, Selection, finetune, split_positions
from .errors import ConfigError, UserError
from .formats.defense_folder import (
    log_file_path,
    prepare_defense_dir,
    read_index,
    write_epoch_tables,
    write_index,
    write_summary,
)
from .formats.models import build_model
from .formats.records import AttackRecord, load_attack_record, write_defense_result
from .method.diagnostics import poisoned_pairs
from .method.mapping import TeacherConfig, cached_backbone_features, features_from_file, parse_source
from .method.targets import TargetConfig, defended_targets, resolve_targets
from .metrics import DEM, dem, evaluate
from .settings import Settings, preset_default
from .util.atomic import atomic_write_text
from .util.digest import raw_bytes, update_with_weights
from .util.hooks import LayerNotFoundError, find_layer, last_conv_name
from .util.provenance import environment

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """The run's data and evaluation: the clean subset (``ratio`` of the training split drawn
    with ``seed``, or the indices in the file ``index``), the per-epoch diagnostic evaluation
    (``eval_every``), the sanitization-term diagnostics (``diagnostics``), the device and the data root."""

    ratio: float = preset_default("ratio")
    index: Optional[str] = preset_default("index")
    seed: int = preset_default("random_seed")
    eval_every: int = preset_default("eval_every")
    diagnostics: bool = preset_default("diagnostics")
    device: str = preset_default("device")
    data_root: Optional[str] = preset_default("data_root")

    def problems(self) -> List[str]:
        found = []
        if not 0 < self.ratio <= 1:
            found.append(f"ratio={self.ratio} (the clean share must lie in (0, 1])")
        if self.eval_every < 0:
            found.append(f"eval_every={self.eval_every} (must be >= 0; 0 turns the per-epoch test evaluation off)")
        if self.index and not Path(self.index).is_file():
            found.append(f"index={self.index!r}: no such file")
        return found


@dataclass
class DefenseResult:
    """What :func:`defend` did: the defense folder, its ``summary.json`` content, the
    per-epoch rows and the defended model (the record's model, changed in place)."""

    folder: Path
    summary: Dict[str, Any]
    history: List[Dict[str, float]]
    model: torch.nn.Module
    before: Dict[str, float] = field(default_factory=dict)
    after: Dict[str, float] = field(default_factory=dict)


def check(settings: Settings, defenses: Sequence[str] = (), make_record: bool = False) -> None:
    """Check every setting a run uses before any work: the defense's config (and those of
    ``defenses`` compared with it), the selection rule, targets, mapping, clean subset and,
    with ``make_record``, the attack. Raises one :class:`ConfigError` naming every problem."""
    found: List[str] = []
    for name in dict.fromkeys([settings.defense, *defenses]):
        if name not in DEFENSES:
            found.append(f"unknown defense {name!r}; choose one of: {', '.join(DEFENSES.names())}")
            continue
        try:
            defense_config(name, settings)
        except ConfigError as e:
            found.append(f"{name}: {e}")
    for section, cls in (("selection", Selection), ("targets", TargetConfig), ("mapping", TeacherConfig),
                         ("run", RunConfig)):
        try:
            made = cls(**settings.section(section))  # Selection and TargetConfig check themselves
        except ConfigError as e:
            found.append(str(e))
            continue
        if hasattr(made, "problems"):
            found += made.problems()
    mapping = TeacherConfig(**settings.section("mapping"))
    if not mapping.problems() and mapping.enabled and settings.defense not in MAPPED:
        found.append(f"the large-model mapping is a setting of {' and '.join(MAPPED)}, not of {settings.defense}")
    if make_record:
        attack = attack_settings(settings)
        found += [f"attack: {p}" for p in attack.problems()]
        if not found:
            found += _layer_problems(settings, attack)
    if found:
        raise ConfigError("invalid settings: " + "; ".join(found))


def _layer_problems(settings: Settings, attack: AttackSettings) -> List[str]:
    """The layers named checked against the model the attack will train (built, not trained)."""
    info = data_mod.dataset_info(attack.dataset)
    return layer_problems(settings, build_model(attack.model, info.num_classes, info.size[2], attack.width))


def layer_problems(settings: Settings, model: torch.nn.Module) -> List[str]:
    """The layers the settings name (PGBD's, NAD's) that ``model`` does not have."""
    names = [settings["layer"]] if settings["layer"] else []
    names += list(settings["nad_layers"]) if settings.defense == "nad" else []
    found = []
    for name in names:
        try:
            find_layer(model, name)
        except UserError as e:
            found.append(str(e))
    return found


def attack_settings(settings: Settings) -> AttackSettings:
    return AttackSettings(**settings.section("attack"))


def make_or_reuse_record(settings: Settings, record_root: Path, download: bool = False) -> Path:
    """The record the settings' attack section describes, under ``record_root`` (its name
    digests those settings), made by training the backdoored model if absent."""
    attack = attack_settings(settings)
    folder = Path(record_root) / record_name(attack)
    if (folder / "attack_result.pt").is_file():
        log.info("reusing the attack record %s", folder)
    else:
        log.info("no record at %s: running the %s attack on %s", folder, attack.attack, attack.dataset)
        build_attack_record(folder, attack, data_root=settings["data_root"], download=download,
                            device=settings["device"])
    return folder


def load_record(folder, settings: Optional[Settings] = None, trust: bool = False) -> AttackRecord:
    """A record folder, loaded with the settings' data root and device."""
    data_root = settings["data_root"] if settings is not None else None
    device = settings["device"] if settings is not None else "cpu"
    return load_attack_record(folder, data_root=data_root, trust=trust, device=device)


def draw_clean_subset(n_train: int, ratio: float, seed: int) -> List[int]:
    if not 0 < ratio <= 1:
        raise ConfigError(f"ratio (clean share) must lie in (0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=gen)[: max(1, int(round(ratio * n_train)))].tolist())


def poisoned_evaluation(record: AttackRecord, record_dir: Path, normalize: Normalizer, device: str) -> Dict:
    """The record's model on its test sets, computed once per record: every defense of a
    side-by-side comparison needs the same numbers. The cache key hashes the weights and
    both test sets, so a changed model or data set is evaluated afresh."""
    h = hashlib.sha1()
    update_with_weights(h, record.model)
    for t in (record.clean_test.images, record.clean_test.labels, record.bd_test.images, record.bd_test.labels,
              record.bd_test.original_labels):
        h.update(raw_bytes(t))
    h.update(repr((normalize.mean.tolist(), normalize.std.tolist())).encode())
    path = Path(record_dir) / "defense" / f".poisoned_eval_{h.hexdigest()[:20]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a damaged cache is recomputed
    metrics = evaluate(record.model, record.clean_test, record.bd_test, normalize, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(metrics))
    return metrics


def teacher_features(cfg: TeacherConfig, train: data_mod.ImageSet, rows: List[int], indices: List[int],
                     record_dir: Path, device: str) -> Optional[torch.Tensor]:
    """Teacher features of the training images for the large-model mapping (None when off).
    ``rows``: the training images' positions in the clean subset, whose record indices are ``indices``."""
    source = parse_source(cfg.source)
    if source is None:
        return None
    kind, where, weights = source
    if kind == "file":
        return features_from_file(where, rows, indices)
    return cached_backbone_features(where, weights, train.images, Path(record_dir) / "defense", int(cfg.input_size),
                                    device)


def defend(settings: Settings, record: AttackRecord, record_dir: Optional[Path] = None, *, name: Optional[str] = None,
           overwrite: bool = False, resume: bool = False) -> DefenseResult:
    """Run ``settings.defense`` on a loaded record into ``<record>/defense/<name>/`` (``name``
    defaults to the defense's), logging to its ``log/`` folder. Existing results are kept
    unless ``overwrite``; ``resume`` continues an interrupted run from its checkpoint."""
    record_dir = Path(record_dir or record.folder)
    name = name or settings.defense
    # What only the record can tell is checked before anything is written: the layers, the targets.
    bad = layer_problems(settings, record.model)
    if bad:
        raise LayerNotFoundError("; ".join(bad))
    if settings["target"] != "auto":
        resolve_targets(settings["target"], record)
    out = prepare_defense_dir(record_dir, name, overwrite)
    file_handler = logging.FileHandler(log_file_path(out))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(file_handler)
    try:
        return _defend(settings, record, record_dir, out, name, resume)
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def _defend(settings: Settings, record: AttackRecord, record_dir: Path, out: Path, name: str,
            resume: bool) -> DefenseResult:
    started = time.time()  # the defense's own time; building the attack record is not counted
    clock = PhaseClock()
    run = RunConfig(**settings.section("run"))
    device = run.device
    info = data_mod.dataset_info(record.clean_data)
    normalize = record.normalizer()
    layer = settings["layer"] or last_conv_name(record.model)
    find_layer(record.model, layer)
    n_train = len(record.clean_train)
    indices = read_index(Path(run.index), n_train) if run.index else draw_clean_subset(n_train, run.ratio, run.seed)
    clean = data_mod.ImageSet(record.clean_train.images[indices], record.clean_train.labels[indices])
    selection = Selection(**settings.section("selection"))
    kept, held = split_positions(clean.labels, selection.val_share, run.seed)
    train = data_mod.ImageSet(clean.images[kept], clean.labels[kept])
    val = data_mod.ImageSet(clean.images[held], clean.labels[held]) if held is not None else None
    with clock("target_inference"):
        targets, inference, nt_order = defended_targets(TargetConfig(**settings.section("targets")), record, train,
                                                        normalize, out, device)
    with clock("teacher_features"):
        teacher = teacher_features(TeacherConfig(**settings.section("mapping")), train, kept.tolist(), indices,
                                   record_dir, device)
    method = build_method(settings.defense, settings, targets, layer, teacher, nt_order)
    log.info("record %s: %s, %d classes, targets %s; clean subset %d samples (%d train, %d held out); "
             "defense %s; layer %s", record_dir, record.model_name, record.num_classes, targets.tolist(), len(clean),
             len(train), len(val) if val is not None else 0, settings.defense, layer)
    with clock("poisoned_evaluation"):
        before = poisoned_evaluation(record, record_dir, normalize, device)
    log.info("poisoned model: CA %.4f ASR %.4f RA %.4f", before["test_acc"], before["test_asr"], before["test_ra"])
    if before["test_asr"] == 0 or before["test_acc"] == 0:
        log.warning("the record's model shows no backdoor (ASR %.4f) or no accuracy (CA %.4f): DEM is undefined "
                    "and will be reported as NaN", before["test_asr"], before["test_acc"])

    poisoned = poisoned_pairs(record.bd_test, record.clean_test) if run.diagnostics else None

    def on_epoch_end(epoch: int, stats: Dict[str, float]) -> Dict[str, float]:
        # Test-set numbers are a diagnostic for the per-epoch table, off unless asked for
        # (eval_every N): selection never sees them.
        row = {"epoch": epoch, "batch": -(-len(train) // method.cfg.batch_size) - 1}
        if run.eval_every and (epoch + 1) % run.eval_every == 0:
            row.update(evaluate(record.model, record.clean_test, record.bd_test, normalize, device=device))
            log.info("epoch %d: loss %.4f held-out %s CA %.4f ASR %.4f RA %.4f", epoch + 1,
                     stats["train_epoch_loss_avg_over_batch"], _pct(stats.get("val_acc")), row["test_acc"],
                     row["test_asr"], row["test_ra"])
        else:
            log.info("epoch %d: loss %.4f held-out %s", epoch + 1, stats["train_epoch_loss_avg_over_batch"],
                     _pct(stats.get("val_acc")))
        if run.diagnostics and hasattr(method, "diagnostics"):
            row.update(method.diagnostics(record.model, epoch, normalize, device, poisoned))
            log.info("epoch %d: sanitization term %s", epoch + 1,
                     ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k.startswith(("term_", "pav_"))))
        return row

    checkpoint = out / "checkpoint" / "last.pt"
    if checkpoint.is_file() and not resume:
        log.warning("%s holds an interrupted run; starting over (pass --resume to continue it instead)", checkpoint)
    try:
        result = finetune(record.model, method, train, normalize, val=val, selection=selection, hflip=info.hflip,
                          device=device, on_epoch_end=on_epoch_end, checkpoint=checkpoint, resume=resume,
                          fingerprint=targets.tolist())
    except KeyboardInterrupt:
        log.error("interrupted: every finished epoch is saved in %s; rerun the same command with --resume "
                  "to continue", checkpoint)
        raise
    rows = result.history
    chosen = rows[result.selected_epoch] if result.selected_epoch >= 0 else None
    # The returned model is evaluated once: a diagnostic evaluation of its own epoch is
    # reused (same weights, same numbers), any other epoch's is not evaluated again.
    if chosen is not None and "test_acc" in chosen:
        after = chosen
    else:
        with clock("evaluation"):
            after = evaluate(record.model, record.clean_test, record.bd_test, normalize, device=device)
        if chosen is not None:
            chosen.update(after)  # the per-epoch table shows the returned model's numbers at its epoch
    for note in result.notes:
        log.warning("%s", note)
    log.info("selected epoch %d of %d (%s)", result.selected_epoch + 1, len(rows),
             "collapse guard" if result.collapsed else selection.select if val is not None else "last")
    d = dem(before["test_acc"], before["test_asr"], after["test_acc"], after["test_asr"]) \
        if before["test_asr"] > 0 and before["test_acc"] > 0 else DEM(math.nan, math.nan)
    summary = {
        "attack": record.raw.get("attack", record.name), "dataset": record.clean_data, "defense": settings.defense,
        "ca_poisoned": before["test_acc"], "asr_poisoned": before["test_asr"], "ra_poisoned": before["test_ra"],
        "ca": after["test_acc"], "asr": after["test_asr"], "ra": after["test_ra"], "dem": d.value,
        "delta_c": d.delta_c, "delta_a": d.delta_a, "seconds": round(time.time() - started, 1),
        **{f"seconds_{phase}": round(t, 2) for phase, t in {**clock.seconds, **result.seconds}.items()},
        "record": str(record_dir), "clean_samples": len(clean), "train_samples": len(train),
        "val_samples": len(val) if val is not None else 0, "selected_epoch": result.selected_epoch,
        "epochs_run": len(rows), "collapsed": result.collapsed, "val_acc_before": result.val_acc_before,
        "val_acc_selected": rows[result.selected_epoch].get("val_acc") if result.selected_epoch >= 0 else
        result.val_acc_before, "seed": run.seed, "targets": targets.tolist(),
        "environment": environment(),
    }
    if inference is not None:
        summary["target_inference"] = {"target": inference.target, "flagged": inference.flagged,
                                       "ranking": inference.ranking, "file": "target_inference.csv"}
    summary.update(method.write_artifacts(out))
    write_defense_result(out, record.model, record.model_name, record.num_classes)
    write_epoch_tables(out, name, rows)
    if getattr(method, "teacher_history", None):  # NAD's teacher, as BackdoorBench writes nad_te_df.csv
        write_epoch_tables(out, f"{name}_te", method.teacher_history)
    write_index(out, indices)
    saved = settings.saved() if nt_order is None else settings.replace(nt_classes=nt_order).saved()
    write_summary(out, summary, {**saved, "layer": layer})
    checkpoint.unlink(missing_ok=True)  # the results above supersede it
    return DefenseResult(out, summary, rows, record.model, before, after)
