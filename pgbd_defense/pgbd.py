"""PGBD: fine-tune a backdoored model on clean data with the sanitization loss.

Amula et al., "Prototype Guided Backdoor Defense via Activation Space
Manipulation", ICCV 2025. The defense estimates class prototypes in one layer's
activation space, takes each class's Prototype Activation Vector towards its
attack target, and fine-tunes with cross-entropy plus lambda * L_s, which turns
each sample's deviation from its own prototype away from the target. With
``lam=0`` the loop is plain fine-tuning (the FT baseline) under the same budget.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from .atomic import atomic_torch_save
from .batches import Normalizer, iterate
from .data import ImageSet
from .loss import FORMS, REDUCTIONS, pgbd_loss
from .progress import progress
from .safe_pickle import safe_torch_load
from .prototypes import Prototypes, blend, capture, find_layer, last_conv_name, pure_pavs, stream_prototypes

log = logging.getLogger(__name__)


LR_SCHEDULERS = ("constant", "cosine")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


@dataclass
class PGBDConfig:
    """PGBD's settings; the defaults are the CPU preset chosen in ``config.py``.

    Attributes:
        layer: named module whose output is the activation space (default: last conv).
        lam: weight of the sanitization loss (paper: 10).
        form: ``cos`` (paper) or ``abs_cos`` (release).
        reduction: ``sum`` over the batch (release) or ``mean``.
        clusters: k-means clusters per class (paper: 3).
        lr, momentum, weight_decay, epochs, batch_size: SGD fine-tuning (paper: 1e-4, 0.9, 1e-4, 35, 16).
        freeze_bn: keep the model in eval mode while fine-tuning (release: yes).
        augment: BackdoorBench's train augmentation on the clean subset.
        update_gap: re-estimate prototypes every this many epochs (0: never; release: 5).
        alpha: weight of the fresh prototypes when re-estimating (release: 0.75).
        grad_clip: clip the global gradient norm to this value (0: off; the paper does not clip).
            With BatchNorm frozen the network has no normalization left, and the cosine's
            gradient grows as 1/||f(x) - P_c|| near a prototype: clipping keeps larger
            learning rates from diverging.
        lr_scheduler: ``constant`` (the paper) or ``cosine`` (annealed to 0 over the epochs,
            BackdoorBench's usual choice for fine-tuning).
        proto_memory_mb: a class whose activations need more memory than this is clustered
            by streaming MiniBatchKMeans instead of holding them all (see ``stream_prototypes``).
        seed: seeds k-means, data order and augmentation.
    """

    layer: Optional[str] = None
    lam: float = 10.0
    form: str = "cos"
    reduction: str = "sum"
    clusters: int = 3
    lr: float = 1e-4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    epochs: int = 35
    batch_size: int = 16
    freeze_bn: bool = True
    augment: bool = True
    update_gap: int = 0
    alpha: float = 0.75
    grad_clip: float = 0.0
    lr_scheduler: str = "constant"
    proto_memory_mb: float = 1024.0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.form not in FORMS:
            problems.append(f"form={self.form!r} (choose {', '.join(FORMS)})")
        if self.reduction not in REDUCTIONS:
            problems.append(f"reduction={self.reduction!r} (choose {', '.join(REDUCTIONS)})")
        for name in ("clusters", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.lr <= 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if self.lam < 0:
            problems.append(f"lam={self.lam} (must be >= 0)")
        if self.update_gap < 0:
            problems.append(f"update_gap={self.update_gap} (must be >= 0)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(f"lr_scheduler={self.lr_scheduler!r} (choose {', '.join(LR_SCHEDULERS)})")
        if self.proto_memory_mb <= 0:
            problems.append(f"proto_memory_mb={self.proto_memory_mb} (must be > 0)")
        if self.grad_clip < 0:
            problems.append(f"grad_clip={self.grad_clip} (must be >= 0)")
        if not 0 <= self.alpha <= 1:
            problems.append(f"alpha={self.alpha} (must lie in [0, 1])")
        if problems:
            raise ValueError("invalid PGBD settings: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


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


EpochCallback = Callable[[int, Dict[str, float]], Optional[Dict[str, float]]]


class ResumeMismatchError(ValueError):
    """A checkpoint made with other settings or another clean subset than this run's."""


def _train_epoch(model, layer, clean, normalize, cfg, state, opt, sched, gen, epoch, hflip, device):
    model.train(not cfg.freeze_bn)
    sums = {"loss": 0.0, "ce": 0.0, "ls": 0.0, "correct": 0, "n": 0}
    n_batches = math.ceil(len(clean) / cfg.batch_size)
    batches = iterate(clean.images, clean.labels, cfg.batch_size, normalize, shuffle=True,
                      augment=cfg.augment, hflip=hflip, generator=gen, device=device)
    with capture(model, layer) as store:
        for b, (x, y, _) in enumerate(progress(batches, total=n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}")):
            logits = model(x)
            if state is None:
                loss = ce = torch.nn.functional.cross_entropy(logits, y)
                ls = torch.zeros(())
            else:
                loss, ce, ls = pgbd_loss(logits, store["out"].flatten(1), y, state.means, state.pavs,
                                         state.active, cfg.lam, cfg.form, cfg.reduction)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss.item()} at epoch {epoch + 1}, batch {b + 1} (CE {ce.item()}, "
                    f"L_s {ls.item()}); lower the learning rate or lambda")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            if sched is not None:
                sched.step()
            sums["loss"] += loss.item()
            sums["ce"] += ce.item()
            sums["ls"] += ls.item()
            sums["correct"] += int((logits.argmax(1) == y).sum())
            sums["n"] += len(y)
    model.eval()
    return {"train_epoch_loss_avg_over_batch": sums["loss"] / n_batches,
            "train_ce_avg_over_batch": sums["ce"] / n_batches,
            "train_sanitization_avg_over_batch": sums["ls"] / n_batches,
            "train_acc": sums["correct"] / max(sums["n"], 1)}


def _state_to_payload(state: Optional[SanitizationState]):
    if state is None:
        return None
    return {"centroids": list(state.prototypes.centroids), "means": state.means.cpu(), "pavs": state.pavs.cpu(),
            "active": state.active.cpu()}


def _state_from_payload(p, device) -> Optional[SanitizationState]:
    if p is None:
        return None
    return SanitizationState(Prototypes(list(p["centroids"])), p["means"].to(device), p["pavs"].to(device),
                             p["active"].to(device))


def pgbd_finetune(model: torch.nn.Module, clean: ImageSet, targets: torch.Tensor, normalize: Normalizer,
                  cfg: PGBDConfig, hflip: bool = False, device: str = "cpu",
                  on_epoch_end: Optional[EpochCallback] = None, checkpoint: Optional[Path] = None,
                  resume: bool = False) -> List[Dict[str, float]]:
    """Fine-tune ``model`` in place; returns one row of statistics per epoch.

    ``targets[c]`` is the attack label of class c (-1: no sanitization term for c).
    ``on_epoch_end(epoch, stats)`` runs after each epoch (evaluation, logging); a dict
    it returns is merged into that epoch's row. With ``checkpoint``, the whole loop
    state (model, optimizer, schedule, data-order generator, prototypes, rows) is
    saved atomically after every epoch, and ``resume=True`` continues from it: a run
    killed at any moment and resumed ends with the same numbers as one never stopped."""
    layer = cfg.layer or last_conv_name(model)
    find_layer(model, layer)
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n_batches = math.ceil(len(clean) / cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * n_batches) \
        if cfg.lr_scheduler == "cosine" else None
    fingerprint = _fingerprint(clean, targets)
    history: List[Dict[str, float]] = []
    first_epoch = 0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        saved = safe_torch_load(checkpoint)
        if saved.get("config") != cfg.to_dict() or saved.get("fingerprint") != fingerprint:
            raise ResumeMismatchError(
                f"{checkpoint} was made with other settings or another clean subset; rerun without --resume "
                "to start over (it will be replaced), or with the settings it was made with")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        state = _state_from_payload(saved["sanitization"], device)
        history = list(saved["history"])
        first_epoch = int(saved["epoch"]) + 1
        log.info("resuming from %s after epoch %d", checkpoint, first_epoch)
    else:
        state = compute_state(model, layer, clean, targets, normalize, cfg, device=device) if cfg.lam > 0 else None
    for epoch in range(first_epoch, cfg.epochs):
        if state is not None and cfg.update_gap and epoch > 0 and epoch % cfg.update_gap == 0:
            state = compute_state(model, layer, clean, targets, normalize, cfg, previous=state, device=device)
        stats = _train_epoch(model, layer, clean, normalize, cfg, state, opt, sched, gen, epoch, hflip, device)
        extra = on_epoch_end(epoch, stats) if on_epoch_end is not None else None
        history.append({**stats, **(extra or {})})
        if checkpoint is not None:
            atomic_torch_save({
                "epoch": epoch, "config": cfg.to_dict(), "fingerprint": fingerprint,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                "generator": gen.get_state(), "sanitization": _state_to_payload(state), "history": history,
            }, checkpoint)
    model.eval()
    return history


def _fingerprint(clean: ImageSet, targets: torch.Tensor) -> List[int]:
    """Cheap identity of the clean subset and targets, to refuse resuming another run's checkpoint."""
    return [len(clean), int(clean.labels.sum()), int(clean.images[:, :, ::7, ::7].sum()), *targets.tolist()]
