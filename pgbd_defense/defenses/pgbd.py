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

Settings studied to keep the term active (issue 20, ``docs/effectiveness.md``) are
parameters too: more than one *term* (``extra_layers``: the same term at more layers;
``nt_addition``: NT-PGBD's cycling term beside the known target's), each with its own
prototypes and PAVs, and ``lambda_mode="grad_share"``, which sets each batch's lambda so
that the term's gradient is a fixed share of the gradient at its layer.
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
from ..errors import ConfigError
from ..method.diagnostics import PROBE_SIZE, pav_trigger_alignment, term_diagnostics
from ..method.loss import FORMS, REDUCTIONS, sanitization_loss
from ..method.pav_sources import VARIANTS, FixedTargets, PAVSource, PrototypeConfig, SanitizationState, make_variant
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
        lambda_mode: ``fixed`` (lam) or ``grad_share``: per batch and term, lambda =
            s / (1 - s) * ||dCE/da|| / ||dL_s/da|| at the term's layer (s = ``grad_share``), so
            the term is always that share of the gradient there (0 while L_s has no gradient).
        extra_layers: more layers, each with its own prototypes, PAVs and term.
        nt_addition: add NT-PGBD's cycling term (its own PAVs) at ``layer`` to the known target's.
        clusters: k-means clusters per class (paper: 3).
        update_gap: re-estimate prototypes every this many epochs (0: never; release: 5).
        alpha: weight of the fresh prototypes when re-estimating (release: 0.75).
        variant: ``pgbd`` (targets given), ``nt`` (NT-PGBD: the target cycles) or ``st``
            (ST-PGBD: PAVs towards the prototypes of D_S carrying a synthesized trigger).
        cycle: NT-PGBD changes its assumed target every this many epochs (paper: 3 for 10 classes).
        nt_classes: the classes NT-PGBD cycles through, in order (empty: all, 0..K-1).
        st_steps, st_batch_size: ST-PGBD's trigger search (optimizer steps, images per step).
        inversion: ST-PGBD's search, ``nc`` (Neural Cleanse) or ``tao`` (Tao et al., the paper's).
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
    lambda_mode: str = _D("lambda_mode")
    grad_share: float = _D("grad_share")
    extra_layers: Sequence[str] = tuple(_D("extra_layers"))
    nt_addition: bool = _D("nt_addition")
    clusters: int = _D("clusters")
    update_gap: int = _D("update_gap")
    alpha: float = _D("alpha")
    variant: str = "pgbd"
    cycle: int = _D("cycle")
    nt_classes: Sequence[int] = tuple(_D("nt_classes"))
    proto_memory_mb: float = _D("proto_memory_mb")
    st_steps: int = _D("st_steps")
    st_batch_size: int = _D("st_batch_size")
    inversion: str = _D("inversion")
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
        if self.lambda_mode not in LAMBDA_MODES:
            found.append(f"lambda_mode={self.lambda_mode!r} (choose {', '.join(LAMBDA_MODES)})")
        if not 0 < self.grad_share < 1:
            found.append(f"grad_share={self.grad_share} (must lie strictly between 0 and 1)")
        if self.nt_addition and self.variant != "pgbd":
            found.append(f"nt_addition with variant={self.variant!r} (the cycling term is added to a known "
                         "target's: use variant pgbd, or nt-pgbd alone)")
        if len(set(self.extra_layers)) != len(self.extra_layers) or (self.layer and self.layer in self.extra_layers):
            found.append(f"extra_layers={list(self.extra_layers)} repeat a layer (layer={self.layer!r})")
        if self.inversion not in ("nc", "tao"):
            found.append(f"inversion={self.inversion!r} (choose nc, tao)")
        if self.cycle < 1:
            found.append(f"cycle={self.cycle} (must be >= 1)")
        for name in ("st_steps", "st_batch_size", "mapping_components", "mapping_steps"):
            if getattr(self, name) < 1:
                found.append(f"{name}={getattr(self, name)} (must be >= 1)")
        return found

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["nt_classes"] = list(d["nt_classes"])
        d["extra_layers"] = list(d["extra_layers"])
        return d


LAMBDA_MODES = ("fixed", "grad_share")
_EPS = 1e-12


@dataclass
class Term:
    """One sanitization term: a layer, where its PAVs come from, which target each class has
    in each epoch, and the prototypes and PAVs in use. ``follows_primary``: the layer is the
    defense's main one (bound with it when that is the model's last convolution)."""

    layer: Optional[str]
    source: PAVSource
    plan: FixedTargets
    follows_primary: bool = False
    state: Optional[SanitizationState] = None


class PGBDMethod(Method):
    """Cross-entropy plus lambda * L_s with the PAVs towards each class's target.

    ``targets[c]`` is the attack label of class c (-1: no term for c). The variant
    (``cfg.variant``) and ``teacher_features`` (rows matching the training images passed to
    ``start``; they turn on the large-model mapping) choose the PAV source and the target
    plan (``method/pav_sources.py``)."""

    name = "pgbd"

    def __init__(self, cfg: PGBDConfig, targets: torch.Tensor, layer: Optional[str] = None,
                 teacher_features: Optional[torch.Tensor] = None):
        super().__init__(cfg)  # the config checked itself when it was made (LoopConfig.__post_init__)
        self.targets = targets.clone()
        self.layer = layer or cfg.layer
        protos = PrototypeConfig(clusters=cfg.clusters, alpha=cfg.alpha, memory_mb=cfg.proto_memory_mb, seed=cfg.seed)

        def term(variant: str, at: Optional[str], follows: bool) -> Term:
            # Built (and checked: NT's classes, ST's one target) now; a missing layer is bound in start.
            source, plan = make_variant(
                variant, self.targets, at, protos, cycle=cfg.cycle, nt_classes=cfg.nt_classes,
                st_steps=cfg.st_steps, st_batch_size=cfg.st_batch_size, st_inversion=cfg.inversion,
                teacher_features=teacher_features,
                mapping_components=cfg.mapping_components, mapping_steps=cfg.mapping_steps)
            return Term(at, source, plan, follows)

        self.terms: List[Term] = [term(cfg.variant, self.layer, True)]
        self.terms += [term(cfg.variant, extra, False) for extra in cfg.extra_layers]
        if cfg.nt_addition:
            self.terms.append(term("nt", self.layer, True))

    # The main term (the only one by default): what the diagnostics and older callers read.
    @property
    def source(self) -> PAVSource:
        return self.terms[0].source

    @property
    def plan(self) -> FixedTargets:
        return self.terms[0].plan

    @property
    def state(self) -> Optional[SanitizationState]:
        return self.terms[0].state

    @property
    def uses_sanitization(self) -> bool:
        return self.cfg.lam > 0 or self.cfg.lambda_mode == "grad_share"

    def current_targets(self, epoch: int) -> torch.Tensor:
        return self.plan.at(epoch)

    def _bind_layer(self, model) -> None:
        """The layers named, or the model's last convolution; checked against the model."""
        self.layer = self.layer or last_conv_name(model)
        for t in self.terms:
            if t.follows_primary:
                t.layer = self.layer
            find_layer(model, t.layer)
            t.source.layer = t.layer
        layers = [t.layer for t in self.terms if not (t.follows_primary and t is not self.terms[0])]
        if len(set(layers)) != len(layers):
            raise ConfigError(f"PGBD: extra_layers repeat the main layer {self.layer!r}; name other layers")

    def start(self, model, train, normalize, hflip, device):
        self._bind_layer(model)
        self._probe = (train.images[:PROBE_SIZE], train.labels[:PROBE_SIZE])
        if not self.uses_sanitization:
            return
        for t in self.terms:
            t.source.prepare(model, train, normalize, device)
            t.state = t.source.estimate(model, train, t.plan.at(0), normalize, device)

    def begin_epoch(self, epoch, model, train, normalize, device):
        for t in self.terms:
            if t.state is None:
                continue
            targets = t.plan.at(epoch)
            if self.cfg.update_gap and epoch > 0 and epoch % self.cfg.update_gap == 0:
                t.state = t.source.estimate(model, train, targets, normalize, device, previous=t.state)
            elif t.plan.cycles:
                t.state = t.source.retarget(t.state, targets, device)

    def hooks(self, model):
        self._bind_layer(model)
        return capture(model, list(dict.fromkeys(t.layer for t in self.terms)))

    def lam_at(self, epoch: int) -> float:
        """The fixed lambda of ``epoch`` (with warm-up); grad_share scales by the warm-up only."""
        w = self.cfg.warmup_epochs
        ramp = min(1.0, (epoch + 1) / w) if w else 1.0
        return ramp * (1.0 if self.cfg.lambda_mode == "grad_share" else self.cfg.lam)

    def _share_lambda(self, ce: torch.Tensor, ls: torch.Tensor, acts: torch.Tensor) -> float:
        """lambda making ||lambda dL_s/da|| / (||dCE/da|| + ||lambda dL_s/da||) = grad_share."""
        s = self.cfg.grad_share
        (g_ce,) = torch.autograd.grad(ce, acts, retain_graph=True)
        (g_s,) = torch.autograd.grad(ls, acts, retain_graph=True, allow_unused=True)
        norm_s = 0.0 if g_s is None else float(g_s.norm())
        return 0.0 if norm_s < _EPS else s / (1.0 - s) * float(g_ce.norm()) / norm_s

    def step(self, model, x, y, store, opt, epoch):
        logits = model(x)
        loss = ce = torch.nn.functional.cross_entropy(logits, y)
        ls_total = torch.zeros(())
        lams = []
        for t in self.terms:
            if t.state is None:
                continue
            s = t.state
            acts = store[t.layer]
            ls = sanitization_loss(acts.flatten(1), y, s.means, s.pavs, s.active, self.cfg.form, self.cfg.reduction)
            lam = self.lam_at(epoch)
            if self.cfg.lambda_mode == "grad_share":
                lam *= self._share_lambda(ce, ls, acts)
            loss = loss + lam * ls
            ls_total = ls_total + ls.detach()
            lams.append(lam)
        if torch.isfinite(loss):
            apply_update(model, opt, loss, self.cfg.grad_clip)
        out = {"loss": loss.detach(), "ce": ce.detach(), "sanitization": ls_total, "logits": logits.detach()}
        if self.cfg.lambda_mode == "grad_share":
            out["lambda"] = torch.tensor(sum(lams) / max(len(lams), 1))
        return out

    def state_dict(self) -> dict:
        main = self.terms[0]
        payload = {"layer": self.layer, "state": main.state.to_payload() if main.state is not None else None,
                   **main.source.state_dict()}
        if len(self.terms) > 1:  # the default's checkpoints keep their old shape
            payload["more_terms"] = [{"layer": t.layer, "source": t.source.state_dict(),
                                      "state": t.state.to_payload() if t.state is not None else None}
                                     for t in self.terms[1:]]
        return payload

    def load_state_dict(self, payload: dict, model, device: str) -> None:
        self.layer = payload["layer"]
        self._bind_layer(model)
        more = payload.get("more_terms", [])
        if len(more) != len(self.terms) - 1:
            raise ConfigError(f"PGBD checkpoint has {len(more) + 1} terms, these settings {len(self.terms)}")
        main = self.terms[0]
        main.source.load_state_dict(payload, device)
        main.state = None if payload["state"] is None else SanitizationState.from_payload(payload["state"], device)
        for t, p in zip(self.terms[1:], more):
            t.source.load_state_dict(p["source"], device)
            t.state = None if p["state"] is None else SanitizationState.from_payload(p["state"], device)

    def restore_data(self, train: ImageSet) -> None:
        self._probe = (train.images[:PROBE_SIZE], train.labels[:PROBE_SIZE])
        for t in self.terms:
            t.source.restore_data(train)

    def diagnostics(self, model, epoch: int, normalize: Normalizer, device: str,
                    poisoned: Optional[tuple] = None) -> Dict[str, float]:
        """The main term's numbers after ``epoch`` (``method/diagnostics.py``); evaluation only.
        ``poisoned``: (triggered, plain, labels) test images for the PAVs' alignment. With
        ``lambda_mode="grad_share"`` the gradient share is lambda 1's (the share itself is fixed by
        construction; the lambdas chosen are the ``train_lambda_avg_over_batch`` column)."""
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
        """The main PAV source's files (ST-PGBD's trigger, the mapping's fit); what goes into summary.json."""
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
