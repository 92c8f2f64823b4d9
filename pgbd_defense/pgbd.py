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

ST-PGBD (``variant="st"``) inverts a trigger for the target from the model itself
(``inversion.py``), stamps it on D_S to get D_S', and uses V_c = P'_c - P_c.

With a teacher (``teacher_features``), the PAVs are computed in the teacher's
feature space and mapped back (``mapping.py``).
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
from .inversion import InversionConfig, Trigger, invert_trigger, save_trigger_png
from .loss import FORMS, REDUCTIONS, pgbd_loss
from .mapping import LinearMap, MapFit, MappingConfig, MappingError, reduce_teacher, student_maps, train_map
from .prototypes import (Prototypes, blend, capture, estimate_prototypes, find_layer, last_conv_name, pure_pavs,
                         shift_pavs, stream_prototypes)

log = logging.getLogger(__name__)

VARIANTS = ("pgbd", "nt", "st")


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
        variant: ``pgbd`` (targets given), ``nt`` (NT-PGBD: the target cycles) or ``st``
            (ST-PGBD: PAVs towards the prototypes of D_S carrying a synthesized trigger).
        cycle: NT-PGBD changes its assumed target every this many epochs (paper: 3 for 10 classes).
        nt_classes: the classes NT-PGBD cycles through, in order (empty: all, 0..K-1).
        st_steps, st_batch_size: ST-PGBD's trigger search (optimizer steps, images per step).
        mapping_components, mapping_steps: the teacher mapping's PCA channels and step budget.
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
    st_steps: int = 300
    st_batch_size: int = 32
    mapping_components: int = 64
    mapping_steps: int = 3000

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
        for name in ("st_steps", "st_batch_size", "mapping_components", "mapping_steps"):
            if getattr(self, name) < 1:
                found.append(f"{name}={getattr(self, name)} (must be >= 1)")
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
    shifted: Optional[Prototypes] = None  # ST-PGBD: prototypes of D_S carrying the synthesized trigger
    teacher_means: Optional[torch.Tensor] = None  # mapping: prototypes in the teacher space (K, k, h, w)


def teacher_prototypes(model, layer: str, clean: ImageSet, normalize: Normalizer, fmap: LinearMap,
                       num_classes: int, cfg: PGBDConfig, device: str = "cpu") -> torch.Tensor:
    """Prototypes (K, k, h, w) of the student's activations lifted into the teacher space."""
    where = fmap.s_scale.device
    with torch.no_grad():
        lifted = fmap.to_teacher(student_maps(model, layer, clean.images, normalize, device=device).to(where)).cpu()
    means = estimate_prototypes(lifted.flatten(1), clean.labels, num_classes, cfg.clusters, cfg.seed).means()
    return means.view(num_classes, *lifted.shape[1:])


def teacher_pavs(teacher_means: torch.Tensor, targets: torch.Tensor, fmap: LinearMap,
                 active: torch.Tensor) -> torch.Tensor:
    """V_c = P^T_t - P^T_c in the teacher space, mapped back to the student space (K x D)."""
    k = len(targets)
    means = teacher_means.to(fmap.s_scale.device)
    with torch.no_grad():
        pavs = fmap.vector_to_student(means[targets.clamp(0, k - 1)] - means).flatten(1).cpu()
    pavs[~active.cpu()] = 0.0
    return pavs


def compute_state(model, layer: str, clean: ImageSet, targets: torch.Tensor, normalize: Normalizer,
                  cfg: PGBDConfig, previous: Optional[SanitizationState] = None,
                  device: str = "cpu", shifted: Optional[ImageSet] = None,
                  fmap: Optional[LinearMap] = None) -> SanitizationState:
    """Prototypes (blended with ``previous`` at rate alpha if given) and the PAVs: pure
    (P_t - P_c), ST-PGBD's (P'_c - P_c, when ``shifted`` is D_S'), or pure ones computed in
    the teacher space (when ``fmap`` is given)."""
    k = len(targets)

    def protos_of(data: ImageSet, old: Optional[Prototypes]) -> Prototypes:
        p = stream_prototypes(model, layer, data.images, data.labels, normalize, k, cfg.clusters, cfg.seed,
                              cfg.proto_memory_mb, device=device)
        return blend(old, p, cfg.alpha) if old is not None else p

    protos = protos_of(clean, previous.prototypes if previous is not None else None)
    means = protos.means()
    shifted_protos, t_means = None, None
    if shifted is not None:
        shifted_protos = protos_of(shifted, previous.shifted if previous is not None else None)
        pavs, active = shift_pavs(means, shifted_protos.means(), targets, protos.available & shifted_protos.available)
    else:
        pavs, active = pure_pavs(means, targets, protos.available)
        if fmap is not None:
            t_means = teacher_prototypes(model, layer, clean, normalize, fmap, k, cfg, device)
            pavs = teacher_pavs(t_means, targets, fmap, active)
    return SanitizationState(protos, means.to(device), pavs.to(device), active.to(device), shifted_protos, t_means)


def nt_target(epoch: int, cycle: int, order: Sequence[int]) -> int:
    """NT-PGBD's assumed target during ``epoch`` (0-based): order[0] for the first
    ``cycle`` epochs, then order[1], ..., wrapping around."""
    return int(order[(epoch // cycle) % len(order)])


class PGBDMethod(Method):
    """Cross-entropy plus lambda * L_s with the PAVs towards each class's target.

    ``teacher_features`` (rows matching the training images passed to ``start``)
    turn on the large-model mapping."""

    name = "pgbd"

    def __init__(self, cfg: PGBDConfig, targets: torch.Tensor, layer: Optional[str] = None,
                 teacher_features: Optional[torch.Tensor] = None):
        super().__init__(cfg)
        self.targets = targets.clone()
        self.layer = layer or cfg.layer
        self.state: Optional[SanitizationState] = None
        self.teacher_features = teacher_features
        self.fmap: Optional[LinearMap] = None
        self.map_fit: Optional[MapFit] = None
        self.trigger: Optional[Trigger] = None
        self.shifted: Optional[ImageSet] = None
        if cfg.variant == "nt":
            k = len(targets)
            self.order = list(cfg.nt_classes) or list(range(k))
            bad = [c for c in self.order if not 0 <= int(c) < k]
            if bad:
                raise ValueError(f"nt_classes {bad} are not classes of this {k}-class model")
        if cfg.variant == "st":
            self.st_target()
            if teacher_features is not None:
                raise ValueError("the large-model mapping applies to pure PAVs (pgbd, nt-pgbd), not to ST-PGBD")

    def st_target(self) -> int:
        known = sorted({int(t) for t in self.targets.tolist() if t >= 0})
        if len(known) != 1:
            raise ValueError("ST-PGBD synthesizes the trigger of one target class; the targets are "
                             f"{known or 'unknown'} "
                             "(give --target N or --target auto; for all-to-all attacks use nt-pgbd)")
        return known[0]

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
        if not self.uses_sanitization:
            return
        if self.cfg.variant == "st":
            inv = InversionConfig(steps=self.cfg.st_steps, batch_size=self.cfg.st_batch_size, seed=self.cfg.seed)
            self.trigger = invert_trigger(model, train, self.st_target(), normalize, inv, device)
            log.info("ST-PGBD: trigger for class %d, mask L1 %.2f, flips %.1f%% of D_S", self.trigger.target,
                     self.trigger.norm, 100 * self.trigger.flip_rate)
            self.shifted = ImageSet(self.trigger.apply(train.images), train.labels)
        if self.teacher_features is not None:
            self.fmap = self.fit_map(model, train, normalize, device)
        self.state = compute_state(model, self.layer, train, self.current_targets(0), normalize, self.cfg,
                                   device=device, shifted=self.shifted, fmap=self.fmap)

    def fit_map(self, model, train, normalize, device) -> LinearMap:
        if len(self.teacher_features) != len(train):
            raise MappingError(f"{len(self.teacher_features)} teacher feature rows for {len(train)} training images")
        student = student_maps(model, self.layer, train.images, normalize, device=device)
        teacher = reduce_teacher(self.teacher_features, self.cfg.mapping_components, tuple(student.shape[2:]),
                                 self.cfg.seed)
        self.map_fit = train_map(student, teacher, MappingConfig(components=self.cfg.mapping_components,
                                                                 steps=self.cfg.mapping_steps, seed=self.cfg.seed))
        return self.map_fit.model.to(device).eval()

    def begin_epoch(self, epoch, model, train, normalize, device):
        if self.state is None:
            return
        targets = self.current_targets(epoch)
        if self.cfg.update_gap and epoch > 0 and epoch % self.cfg.update_gap == 0:
            self.state = compute_state(model, self.layer, train, targets, normalize, self.cfg, previous=self.state,
                                       device=device, shifted=self.shifted, fmap=self.fmap)
        elif self.cfg.variant == "nt":
            s = self.state
            pavs, active = pure_pavs(s.means.cpu(), targets, s.prototypes.available)
            if s.teacher_means is not None:
                pavs = teacher_pavs(s.teacher_means, targets, self.fmap, active)
            self.state = SanitizationState(s.prototypes, s.means, pavs.to(device), active.to(device), s.shifted,
                                           s.teacher_means)

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
        payload: dict = {"layer": self.layer, "state": None}
        if self.trigger is not None:
            t = self.trigger
            payload["trigger"] = {"target": t.target, "mask": t.mask, "pattern": t.pattern, "norm": t.norm,
                                  "flip_rate": t.flip_rate}
        if self.fmap is not None:
            payload["fmap"] = {k: v.cpu() for k, v in self.fmap.state_dict().items()}
        if self.state is None:
            return payload
        s = self.state
        payload["state"] = {"centroids": list(s.prototypes.centroids), "means": s.means.cpu(), "pavs": s.pavs.cpu(),
                            "active": s.active.cpu(),
                            "shifted": list(s.shifted.centroids) if s.shifted is not None else None,
                            "teacher_means": s.teacher_means}
        return payload

    def load_state_dict(self, payload: dict, model, device: str) -> None:
        self.layer = payload["layer"]
        if payload.get("trigger"):
            self.trigger = Trigger(**payload["trigger"])
        if payload.get("fmap"):
            f = payload["fmap"]
            self.fmap = LinearMap(f["s2t.weight"].shape[1], f["s2t.weight"].shape[0])
            self.fmap.load_state_dict(f)
            self.fmap.to(device).eval()
        p = payload["state"]
        self.state = None if p is None else SanitizationState(
            Prototypes(list(p["centroids"])), p["means"].to(device), p["pavs"].to(device), p["active"].to(device),
            Prototypes(list(p["shifted"])) if p.get("shifted") is not None else None, p.get("teacher_means"))

    def restore_data(self, train: ImageSet) -> None:
        """After a resume: D_S' is rebuilt from the saved trigger rather than searched again."""
        if self.trigger is not None and self.shifted is None:
            self.shifted = ImageSet(self.trigger.apply(train.images), train.labels)

    def write_artifacts(self, out: Path) -> dict:
        """ST-PGBD's trigger (PNG and tensors) and the mapping's training curve; returns what
        goes into summary.json."""
        info: dict = {}
        if self.trigger is not None:
            t = self.trigger
            save_trigger_png(t, Path(out) / "synthesized_trigger.png")
            torch.save({"target": t.target, "mask": t.mask, "pattern": t.pattern}, Path(out) / "synthesized_trigger.pt")
            info["synthesized_trigger"] = {"target": t.target, "mask_l1": round(t.norm, 3),
                                           "flip_rate": round(t.flip_rate, 4), "png": "synthesized_trigger.png"}
        if self.map_fit is not None:
            m = self.map_fit
            info["mapping"] = {"steps": m.steps, "converged": m.converged,
                               "loss_first": m.losses[0] if m.losses else None,
                               "loss_last": m.losses[-1] if m.losses else None,
                               "student_round_trip_error": round(m.student_error, 4),
                               "teacher_fit_error": round(m.teacher_error, 4),
                               "components": int(m.model.t2s.weight.shape[1])}
        return info


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
