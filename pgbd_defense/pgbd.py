"""PGBD: fine-tune a backdoored model on clean data with the sanitization loss.

Amula et al., "Prototype Guided Backdoor Defense via Activation Space
Manipulation", ICCV 2025. The defense estimates class prototypes in one layer's
activation space, takes each class's Prototype Activation Vector towards its
attack target, and fine-tunes with cross-entropy plus lambda * L_s, which turns
each sample's deviation from its own prototype away from the target. With
``lam=0`` the loop is plain fine-tuning (the FT baseline) under the same budget.

NT-PGBD (``variant="nt"``) needs no target: the assumed target cycles through the
classes (or a given list, e.g. a target-inference ranking), changing every
``cycle`` epochs, and the PAVs are recomputed from the same prototypes for each.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from .batches import Normalizer
from .data import ImageSet
from .finetune import (EpochCallback, FinetuneResult, LoopConfig, Method, NonFiniteLossError,  # noqa: F401
                       ResumeMismatchError, Selection, apply_update, finetune)
from .loss import FORMS, REDUCTIONS, pgbd_loss
from .prototypes import Prototypes, blend, capture, find_layer, last_conv_name, pure_pavs, stream_prototypes

log = logging.getLogger(__name__)

VARIANTS = ("pgbd", "nt")


@dataclass
class PGBDConfig(LoopConfig):
    """PGBD's settings; the defaults are the paper's (the presets live in ``config.py``).

    Attributes (beyond the loop's):
        layer: named module whose output is the activation space (default: last conv).
        lam: weight of the sanitization loss (paper: 10).
        form: ``cos`` (paper), ``abs_cos`` (release) or ``relu_cos`` (hinge), see ``loss.py``.
        reduction: ``sum`` over the batch (release) or ``mean``.
        warmup_epochs: lambda rises linearly from lam/warmup_epochs to lam over these epochs (0: off).
        clusters: k-means clusters per class (paper: 3).
        update_gap: re-estimate prototypes every this many epochs (0: never; release: 5).
        alpha: weight of the fresh prototypes when re-estimating (release: 0.75).
        variant: ``pgbd`` (targets given) or ``nt`` (NT-PGBD: the target cycles).
        cycle: NT-PGBD changes its assumed target every this many epochs (paper: 3 for 10 classes).
        nt_classes: the classes NT-PGBD cycles through, in order (empty: all, 0..K-1).
        proto_memory_mb: a class whose activations need more memory than this is clustered
            by streaming MiniBatchKMeans instead of holding them all (see ``stream_prototypes``).
        grad_clip (loop): with BatchNorm frozen the network has no normalization left, and the
            cosine's gradient grows as 1/||f(x) - P_c|| near a prototype: clipping keeps larger
            learning rates from diverging. The paper does not clip.
    """

    lr: float = 1e-4
    weight_decay: float = 1e-4
    epochs: int = 35
    batch_size: int = 16
    freeze_bn: bool = True
    augment: bool = True
    lr_scheduler: str = "constant"
    layer: Optional[str] = None
    lam: float = 10.0
    form: str = "cos"
    reduction: str = "sum"
    warmup_epochs: int = 0
    clusters: int = 3
    update_gap: int = 0
    alpha: float = 0.75
    variant: str = "pgbd"
    cycle: int = 3
    nt_classes: Sequence[int] = ()
    proto_memory_mb: float = 1024.0

    def problems(self) -> List[str]:
        found = super().problems()
        if self.form not in FORMS:
            found.append(f"form={self.form!r} (choose {', '.join(FORMS)})")
        if self.reduction not in REDUCTIONS:
            found.append(f"reduction={self.reduction!r} (choose {', '.join(REDUCTIONS)})")
        if int(self.clusters) < 1:
            found.append(f"clusters={self.clusters} (must be >= 1)")
        if self.lam < 0:
            found.append(f"lam={self.lam} (must be >= 0)")
        for name in ("update_gap", "warmup_epochs"):
            if getattr(self, name) < 0:
                found.append(f"{name}={getattr(self, name)} (must be >= 0)")
        if self.proto_memory_mb <= 0:
            found.append(f"proto_memory_mb={self.proto_memory_mb} (must be > 0)")
        if not 0 <= self.alpha <= 1:
            found.append(f"alpha={self.alpha} (must lie in [0, 1])")
        if self.variant not in VARIANTS:
            found.append(f"variant={self.variant!r} (choose {', '.join(VARIANTS)})")
        if self.cycle < 1:
            found.append(f"cycle={self.cycle} (must be >= 1)")
        return found

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["nt_classes"] = list(d["nt_classes"])
        return d


@dataclass
class SanitizationState:
    prototypes: Prototypes
    means: torch.Tensor
    pavs: torch.Tensor
    active: torch.Tensor


def compute_state(model, layer: str, clean: ImageSet, targets: torch.Tensor, normalize: Normalizer,
                  cfg: PGBDConfig, previous: Optional[SanitizationState] = None,
                  device: str = "cpu") -> SanitizationState:
    """Prototypes (blended with ``previous`` at rate alpha if given) and pure PAVs."""
    protos = stream_prototypes(model, layer, clean.images, clean.labels, normalize, len(targets), cfg.clusters,
                               cfg.seed, cfg.proto_memory_mb, device=device)
    if previous is not None:
        protos = blend(previous.prototypes, protos, cfg.alpha)
    means = protos.means()
    pavs, active = pure_pavs(means, targets, protos.available)
    return SanitizationState(protos, means.to(device), pavs.to(device), active.to(device))


def nt_target(epoch: int, cycle: int, order: Sequence[int]) -> int:
    """NT-PGBD's assumed target during ``epoch`` (0-based): order[0] for the first
    ``cycle`` epochs, then order[1], ..., wrapping around."""
    return int(order[(epoch // cycle) % len(order)])


class PGBDMethod(Method):
    """Cross-entropy plus lambda * L_s with the PAVs towards each class's target."""

    name = "pgbd"

    def __init__(self, cfg: PGBDConfig, targets: torch.Tensor, layer: Optional[str] = None):
        super().__init__(cfg)
        self.targets = targets.clone()
        self.layer = layer or cfg.layer
        self.state: Optional[SanitizationState] = None
        if cfg.variant == "nt":
            k = len(targets)
            self.order = list(cfg.nt_classes) or list(range(k))
            bad = [c for c in self.order if not 0 <= int(c) < k]
            if bad:
                raise ValueError(f"nt_classes {bad} are not classes of this {k}-class model")

    @property
    def uses_sanitization(self) -> bool:
        return self.cfg.lam > 0

    def current_targets(self, epoch: int) -> torch.Tensor:
        if self.cfg.variant == "nt":
            return torch.full_like(self.targets, nt_target(epoch, self.cfg.cycle, self.order))
        return self.targets

    def start(self, model, train, normalize, hflip, device):
        self.layer = self.layer or last_conv_name(model)
        find_layer(model, self.layer)
        if self.uses_sanitization:
            self.state = compute_state(model, self.layer, train, self.current_targets(0), normalize, self.cfg,
                                       device=device)

    def begin_epoch(self, epoch, model, train, normalize, device):
        if self.state is None:
            return
        targets = self.current_targets(epoch)
        if self.cfg.update_gap and epoch > 0 and epoch % self.cfg.update_gap == 0:
            self.state = compute_state(model, self.layer, train, targets, normalize, self.cfg,
                                       previous=self.state, device=device)
        elif self.cfg.variant == "nt":
            pavs, active = pure_pavs(self.state.means.cpu(), targets, self.state.prototypes.available)
            self.state = SanitizationState(self.state.prototypes, self.state.means, pavs.to(device),
                                           active.to(device))

    def hooks(self, model):
        self.layer = self.layer or last_conv_name(model)
        return capture(model, self.layer)

    def lam_at(self, epoch: int) -> float:
        w = self.cfg.warmup_epochs
        return self.cfg.lam * min(1.0, (epoch + 1) / w) if w else self.cfg.lam

    def step(self, model, x, y, store, opt, epoch):
        logits = model(x)
        if self.state is None:
            loss = ce = torch.nn.functional.cross_entropy(logits, y)
            ls = torch.zeros(())
        else:
            loss, ce, ls = pgbd_loss(logits, store["out"].flatten(1), y, self.state.means, self.state.pavs,
                                     self.state.active, self.lam_at(epoch), self.cfg.form, self.cfg.reduction)
        if torch.isfinite(loss):
            apply_update(model, opt, loss, self.cfg.grad_clip)
        return {"loss": loss.detach(), "ce": ce.detach(), "sanitization": ls.detach(), "logits": logits.detach()}

    def state_dict(self) -> dict:
        if self.state is None:
            return {"state": None, "layer": self.layer}
        s = self.state
        return {"layer": self.layer, "state": {"centroids": list(s.prototypes.centroids), "means": s.means.cpu(),
                                               "pavs": s.pavs.cpu(), "active": s.active.cpu()}}

    def load_state_dict(self, payload: dict, model, device: str) -> None:
        self.layer = payload["layer"]
        p = payload["state"]
        self.state = None if p is None else SanitizationState(
            Prototypes(list(p["centroids"])), p["means"].to(device), p["pavs"].to(device), p["active"].to(device))


def pgbd_finetune(model: torch.nn.Module, clean: ImageSet, targets: torch.Tensor, normalize: Normalizer,
                  cfg: PGBDConfig, hflip: bool = False, device: str = "cpu",
                  on_epoch_end: Optional[EpochCallback] = None, checkpoint: Optional[Path] = None,
                  resume: bool = False, val: Optional[ImageSet] = None,
                  selection: Selection = Selection(val_share=0.0)) -> List[dict]:
    """Fine-tune ``model`` in place with PGBD; returns one row of statistics per epoch.

    ``targets[c]`` is the attack label of class c (-1: no sanitization term for c).
    See :func:`finetune` for the callback, checkpoint and selection."""
    method = PGBDMethod(cfg, targets)
    return finetune(model, method, clean, normalize, val=val, selection=selection, hflip=hflip, device=device,
                    on_epoch_end=on_epoch_end, checkpoint=checkpoint, resume=resume,
                    fingerprint=targets.tolist()).history
