"""PGBD: fine-tune a backdoored model on clean data with the sanitization loss.

Amula et al., "Prototype Guided Backdoor Defense via Activation Space Manipulation",
ICCV 2025. The defense estimates class prototypes in one layer's activation space,
takes each class's Prototype Activation Vector towards its attack target, and
fine-tunes with cross-entropy plus lambda * L_s, which turns each sample's deviation
from its own prototype away from the target. With ``lam=0`` the loop is plain
fine-tuning (the FT baseline) under the same budget.

Its variants are parameters (``method/pav_sources.py``): NT-PGBD (``variant="nt"``)
needs no target, the assumed target cycling through the classes every ``cycle``
epochs; ST-PGBD (``variant="st"``) takes V_c = P'_c - P_c from a trigger synthesized
for the target; with teacher features the PAVs are computed in a large teacher's
feature space and mapped back.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..method.diagnostics import PROBE_SIZE, pav_trigger_alignment, term_diagnostics
from ..method.loss import FORMS, REDUCTIONS, pgbd_loss
from ..method.pav_sources import VARIANTS, PrototypeConfig, SanitizationState, make_variant
from ..settings.fields import preset_default
from ..util.hooks import capture, find_layer, last_conv_name
from .loop import EpochCallback, LoopConfig, Method, Selection, apply_update, finetune

log = logging.getLogger(__name__)

_D = partial(preset_default, defense="pgbd")


@dataclass
class PGBDConfig(LoopConfig):
    """PGBD's settings; the defaults are the paper's (``settings.preset_default(name, "paper", "pgbd")``).

    Attributes (beyond the loop's):
        layer: named module whose output is the activation space (default: last conv).
        lam: weight of the sanitization loss (paper: 10).
        form: ``cos`` (paper), ``abs_cos`` (release) or ``relu_cos`` (hinge), see ``method/loss.py``.
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

    lr: float = _D("lr")
    weight_decay: float = _D("wd")
    epochs: int = _D("epochs")
    batch_size: int = _D("batch_size")
    freeze_bn: bool = _D("freeze_bn")
    augment: bool = _D("augment")
    lr_scheduler: str = _D("lr_scheduler")
    scheduler_interval: str = _D("scheduler_interval")
    cos_t_max: int = _D("cos_t_max")
    layer: Optional[str] = _D("layer")
    lam: float = _D("lambda")
    form: str = _D("loss_form")
    reduction: str = _D("reduction")
    warmup_epochs: int = _D("warmup_epochs")
    clusters: int = _D("clusters")
    update_gap: int = _D("update_gap")
    alpha: float = _D("alpha")
    variant: str = "pgbd"
    cycle: int = _D("cycle")
    nt_classes: Sequence[int] = tuple(_D("nt_classes"))
    proto_memory_mb: float = _D("proto_memory_mb")
    st_steps: int = _D("st_steps")
    st_batch_size: int = _D("st_batch_size")
    mapping_components: int = _D("mapping_components")
    mapping_steps: int = _D("mapping_steps")

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


class PGBDMethod(Method):
    """Cross-entropy plus lambda * L_s with the PAVs towards each class's target.

    ``targets[c]`` is the attack label of class c (-1: no term for c). The variant
    (``cfg.variant``) and ``teacher_features`` (rows matching the training images passed to
    ``start``; they turn on the large-model mapping) choose the PAV source and the target
    plan (``method/pav_sources.py``)."""

    name = "pgbd"

    def __init__(self, cfg: PGBDConfig, targets: torch.Tensor, layer: Optional[str] = None,
                 teacher_features: Optional[torch.Tensor] = None):
        super().__init__(cfg)
        self.targets = targets.clone()
        self.layer = layer or cfg.layer
        self.state: Optional[SanitizationState] = None
        protos = PrototypeConfig(clusters=cfg.clusters, alpha=cfg.alpha, memory_mb=cfg.proto_memory_mb, seed=cfg.seed)
        # Built (and checked: NT's classes, ST's one target) now; the layer is bound in start.
        self.source, self.plan = make_variant(
            cfg.variant, self.targets, self.layer, protos, cycle=cfg.cycle, nt_classes=cfg.nt_classes,
            st_steps=cfg.st_steps, st_batch_size=cfg.st_batch_size, teacher_features=teacher_features,
            mapping_components=cfg.mapping_components, mapping_steps=cfg.mapping_steps)

    @property
    def uses_sanitization(self) -> bool:
        return self.cfg.lam > 0

    def current_targets(self, epoch: int) -> torch.Tensor:
        return self.plan.at(epoch)

    def _bind_layer(self, model) -> None:
        """The layer named, or the model's last convolution; checked against the model."""
        self.layer = self.layer or last_conv_name(model)
        find_layer(model, self.layer)
        self.source.layer = self.layer

    def start(self, model, train, normalize, hflip, device):
        self._bind_layer(model)
        self._probe = (train.images[:PROBE_SIZE], train.labels[:PROBE_SIZE])
        if not self.uses_sanitization:
            return
        self.source.prepare(model, train, normalize, device)
        self.state = self.source.estimate(model, train, self.current_targets(0), normalize, device)

    def begin_epoch(self, epoch, model, train, normalize, device):
        if self.state is None:
            return
        targets = self.current_targets(epoch)
        if self.cfg.update_gap and epoch > 0 and epoch % self.cfg.update_gap == 0:
            self.state = self.source.estimate(model, train, targets, normalize, device, previous=self.state)
        elif self.plan.cycles:
            self.state = self.source.retarget(self.state, targets, device)

    def hooks(self, model):
        self._bind_layer(model)
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
            loss, ce, ls = pgbd_loss(logits, store[self.layer].flatten(1), y, self.state.means, self.state.pavs,
                                     self.state.active, self.lam_at(epoch), self.cfg.form, self.cfg.reduction)
        if torch.isfinite(loss):
            apply_update(model, opt, loss, self.cfg.grad_clip)
        return {"loss": loss.detach(), "ce": ce.detach(), "sanitization": ls.detach(), "logits": logits.detach()}

    def state_dict(self) -> dict:
        state = self.state.to_payload() if self.state is not None else None
        return {"layer": self.layer, "state": state, **self.source.state_dict()}

    def load_state_dict(self, payload: dict, model, device: str) -> None:
        self.layer = payload["layer"]
        self._bind_layer(model)
        self.source.load_state_dict(payload, device)
        p = payload["state"]
        self.state = None if p is None else SanitizationState.from_payload(p, device)

    def restore_data(self, train: ImageSet) -> None:
        self._probe = (train.images[:PROBE_SIZE], train.labels[:PROBE_SIZE])
        self.source.restore_data(train)

    def diagnostics(self, model, epoch: int, normalize: Normalizer, device: str,
                    poisoned: Optional[tuple] = None) -> Dict[str, float]:
        """The sanitization term's numbers after ``epoch`` (``method/diagnostics.py``); evaluation
        only. ``poisoned``: (triggered, plain, labels) test images for the PAVs' alignment."""
        if self.state is None:
            return {}
        s = self.state
        row = term_diagnostics(model, self.layer, *self._probe, normalize, s.means, s.pavs, s.active,
                               self.lam_at(epoch), self.cfg.form, self.cfg.reduction, device)
        if poisoned is not None:
            row["pav_trigger_alignment"] = pav_trigger_alignment(model, self.layer, *poisoned, s.pavs, s.active,
                                                                 normalize, device)
        return row

    def write_artifacts(self, out: Path) -> dict:
        """The PAV source's files (ST-PGBD's trigger, the mapping's fit); what goes into summary.json."""
        return self.source.artifacts(out)


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
