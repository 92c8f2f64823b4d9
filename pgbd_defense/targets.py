"""Which label each class is attacked towards: from the record, the user, or inferred.

``--target`` takes ``record`` (read off the record's poisoned test set, the
default), a class index, ``all2all`` (class c -> c+1 mod K) or ``auto`` (Neural
Cleanse-style inference on the defender's clean data, ``inversion.py``)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from .atomic import atomic_write_csv, atomic_write_text
from .attacks.base import label_mapping
from .batches import Normalizer
from .config import ConfigError
from .data import ImageSet
from .digest import raw_bytes, update_with_weights
from .inversion import Inference, InversionConfig, infer_target
from .records import AttackRecord, RecordError

log = logging.getLogger(__name__)

SPECS = "'record', 'auto', 'all2all' or a class index"


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
    h.update(json.dumps([asdict(inv), list(classes or []), scale, str(device)]).encode())
    return h.hexdigest()[:16]


def defended_targets(cfg: Dict[str, Any], record: AttackRecord, train: ImageSet, normalize: Normalizer,
                     out: Path, device: str = "cpu") -> Tuple[torch.Tensor, Optional[Inference]]:
    """The targets the defense uses and, for ``auto``, the inference behind them (written to ``out``,
    and cached in ``out``'s parent under a digest of its inputs, see :func:`inference_key`).

    With ``auto``, NT-PGBD's classes become the top ``nt_topk`` of the ranking when
    ``nt_topk`` > 0 (``cfg`` is updated in place)."""
    if cfg["target"] != "auto":
        return resolve_targets(cfg["target"], record), None
    inv = InversionConfig(steps=int(cfg["inversion_steps"]), batch_size=int(cfg["inversion_batch_size"]),
                          seed=int(cfg["random_seed"]))
    classes, scale = cfg["inversion_classes"] or None, cfg["inversion_scale"]
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
    if int(cfg.get("nt_topk") or 0) > 0:
        cfg["nt_classes"] = inference.ranking[: int(cfg["nt_topk"])]
        log.info("NT-PGBD cycles through the top %d inferred classes: %s", int(cfg["nt_topk"]), cfg["nt_classes"])
    return label_mapping(record.num_classes, "all2one", inference.target), inference
