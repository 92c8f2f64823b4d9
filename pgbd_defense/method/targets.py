"""Which label each class is attacked towards: from the record, the user, or inferred.

``--target`` takes ``record`` (read off the record's poisoned test set, the
default), a class index, ``all2all`` (class c -> c+1 mod K) or ``auto`` (Neural
Cleanse-style inference on the defender's clean data, ``inversion.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..errors import ConfigError
from ..formats.records import AttackRecord, RecordError, label_mapping
from ..settings.fields import preset_default
from ..util.atomic import atomic_write_csv, atomic_write_text
from ..util.digest import raw_bytes, update_with_weights
from .inversion import SCALES, Inference, InversionConfig, infer_target

log = logging.getLogger(__name__)

SPECS = "'record', 'auto', 'all2all' or a class index"
_D = preset_default


@dataclass
class TargetConfig:
    """Which targets a defense is given (``spec``, one of :data:`SPECS`) and, for ``auto``,
    the search that infers one: ``steps`` x ``batch_size`` images per class, over ``classes``
    (empty: all), anomaly index on ``scale``; NT-PGBD then cycles through the top ``nt_topk``
    of the ranking (0: all classes)."""

    spec: str = _D("target")
    steps: int = _D("inversion_steps")
    batch_size: int = _D("inversion_batch_size")
    classes: Sequence[int] = ()
    scale: str = _D("inversion_scale")
    method: str = _D("inversion")
    nt_topk: int = _D("nt_topk")
    seed: int = _D("random_seed")

    def problems(self) -> List[str]:
        found = []
        if self.spec not in ("record", "auto", "all2all"):
            try:
                if int(self.spec) < 0:
                    found.append(f"target={self.spec} (a class index is >= 0)")
            except (TypeError, ValueError):
                found.append(f"target={self.spec!r} (must be {SPECS})")
        if self.scale not in SCALES:
            found.append(f"inversion_scale={self.scale!r} (choose {', '.join(SCALES)})")
        if self.nt_topk < 0:
            found.append(f"nt_topk={self.nt_topk} (must be >= 0; 0: all classes)")
        found += [f"inversion_{p}" for p in self.inversion().problems()]
        return found

    def __post_init__(self):
        self.classes = [int(c) for c in self.classes]
        bad = self.problems()
        if bad:
            raise ConfigError("invalid target settings: " + "; ".join(bad))

    def inversion(self) -> InversionConfig:
        return InversionConfig(steps=int(self.steps), batch_size=int(self.batch_size), seed=int(self.seed),
                               method=self.method)


def resolve_targets(spec: Any, record: AttackRecord) -> torch.Tensor:
    """The attack label of each class for every spec but ``auto`` (see :func:`defended_targets`)."""
    k = record.num_classes
    if spec in (None, "record"):
        mapping = record.target_labels()
        if (mapping < 0).all():
            raise RecordError("the record's poisoned test set is empty: give the target with --target N or auto")
        return mapping
    if spec == "all2all":
        return label_mapping(k, "all2all", 0)
    try:
        t = int(spec)
    except (TypeError, ValueError):
        raise ConfigError(f"--target must be {SPECS}, got {spec!r}") from None
    if not 0 <= t < k:
        raise ConfigError(f"--target {t} is out of range: this {k}-class model has classes 0..{k - 1}")
    return label_mapping(k, "all2one", t)


def write_inference(inference: Inference, out: Path) -> None:
    """``target_inference.csv`` (one row per class) and ``target_inference.json`` in ``out``."""
    atomic_write_csv(Path(out) / "target_inference.csv", inference.rows())
    atomic_write_text(Path(out) / "target_inference.json", json.dumps(inference.to_dict(), indent=2))


def inference_key(model: torch.nn.Module, train: ImageSet, normalize: Normalizer, inv: InversionConfig,
                  classes: Optional[Sequence[int]], scale: str, device: str) -> str:
    """A digest of everything a target inference depends on: the search is minutes of work
    per class, and a record is often defended several times (variants, tables, figures)."""
    h = hashlib.sha256()
    update_with_weights(h, model)
    for tensor in (train.images, train.labels, normalize.mean, normalize.std):
        h.update(raw_bytes(tensor))
    search = asdict(inv)
    if search["method"] == "nc":  # added later: Neural Cleanse searches keep their cached inferences
        search.pop("method")
    h.update(json.dumps([search, list(classes or []), scale, str(device)]).encode())
    return h.hexdigest()[:16]


def defended_targets(cfg: TargetConfig, record: AttackRecord, train: ImageSet, normalize: Normalizer,
                     out: Path, device: str = "cpu"
                     ) -> Tuple[torch.Tensor, Optional[Inference], Optional[List[int]]]:
    """(targets the defense uses, the inference behind them for ``auto``, NT-PGBD's class
    order when the inference chose it). The inference is written to ``out`` and cached in
    ``out``'s parent under a digest of its inputs (:func:`inference_key`).

    With ``auto`` and ``nt_topk`` > 0, NT-PGBD cycles through the top ``nt_topk`` of the ranking."""
    if cfg.spec != "auto":
        return resolve_targets(cfg.spec, record), None, None
    inv = cfg.inversion()
    classes, scale = cfg.classes or None, cfg.scale
    key = inference_key(record.model, train, normalize, inv, classes, scale, device)
    cache = Path(out).parent / f".target_inference_{key}.json"  # beside the record's defense folders
    if cache.is_file():
        inference = Inference.from_dict(json.loads(cache.read_text()))
        log.info("target inference: reusing %s (same model, clean data and search settings)", cache)
    else:
        inference = infer_target(record.model, train, record.num_classes, normalize, inv, classes=classes,
                                 scale=scale, device=device)
        atomic_write_text(cache, json.dumps(inference.to_dict(), indent=2))
    write_inference(inference, out)
    log.info("target inference: ranking %s, anomaly indices %s; %s", inference.ranking,
             [round(a, 2) for a in inference.anomaly],
             f"flagged {inference.flagged}" if inference.flagged else
             f"no class is an outlier (index > {inference.threshold}): using the top of the ranking")
    order = None
    if cfg.nt_topk > 0:
        order = inference.ranking[: cfg.nt_topk]
        log.info("NT-PGBD cycles through the top %d inferred classes: %s", cfg.nt_topk, order)
    return label_mapping(record.num_classes, "all2one", inference.target), inference, order
