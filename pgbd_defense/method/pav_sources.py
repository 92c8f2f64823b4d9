"""Where PGBD's Prototype Activation Vectors come from, and which target each class has
in each epoch: PGBD's variants as two parameters of the one defense.

A :class:`PAVSource` owns everything about its PAVs: the work before the first epoch
(``prepare``), estimating prototypes and PAVs (``estimate``, blended with the previous
estimate when prototypes are re-estimated), new PAVs for new targets from the same
prototypes (``retarget``), its resumable state, and the files it leaves:

- :class:`PureSource`: V_c = P_t(c) - P_c in the layer's activation space (PGBD, NT-PGBD).
- :class:`ShiftedSource`: ST-PGBD; V_c = P'_c - P_c, P'_c the prototype of class c's clean
  samples carrying a trigger synthesized for the target (``inversion.py``).
- :class:`MappedSource`: pure PAVs computed in a large teacher's feature space and mapped
  back (``mapping.py``).

A :class:`TargetPlan` says which target each class has in an epoch: the given ones
(:class:`FixedTargets`), or NT-PGBD's assumed target cycling through classes
(:class:`CyclingTargets`). :func:`make_variant` builds both from the variant's name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..errors import ConfigError
from ..settings.resolve import VARIANT_NAMES
from .inversion import InversionConfig, Trigger, invert_trigger, save_trigger_png
from .mapping import LinearMap, MapFit, MappingConfig, MappingError, reduce_teacher, student_maps, train_map
from .prototypes import Prototypes, blend, estimate_prototypes, pure_pavs, shift_pavs, stream_prototypes

log = logging.getLogger(__name__)

VARIANTS = tuple(VARIANT_NAMES)  # pgbd, nt, st


@dataclass
class PrototypeConfig:
    """How prototypes are estimated: ``clusters`` k-means clusters per class (seeded), blended
    at rate ``alpha`` with the previous estimate, streaming past ``memory_mb`` per class."""

    clusters: int = 3
    alpha: float = 0.75
    memory_mb: float = 1024.0
    seed: int = 0


@dataclass
class SanitizationState:
    """The prototypes and PAVs the loss uses until the next estimate."""

    prototypes: Prototypes
    means: torch.Tensor
    pavs: torch.Tensor
    active: torch.Tensor
    shifted: Optional[Prototypes] = None  # ST-PGBD: prototypes of D_S carrying the synthesized trigger
    teacher_means: Optional[torch.Tensor] = None  # mapping: prototypes in the teacher space (K, k, h, w)

    def to_payload(self) -> dict:
        return {"centroids": list(self.prototypes.centroids), "means": self.means.cpu(), "pavs": self.pavs.cpu(),
                "active": self.active.cpu(),
                "shifted": list(self.shifted.centroids) if self.shifted is not None else None,
                "teacher_means": self.teacher_means}

    @classmethod
    def from_payload(cls, p: dict, device: str) -> "SanitizationState":
        return cls(Prototypes(list(p["centroids"])), p["means"].to(device), p["pavs"].to(device),
                   p["active"].to(device), Prototypes(list(p["shifted"])) if p.get("shifted") is not None else None,
                   p.get("teacher_means"))


class PAVSource:
    """Pure PAVs, V_c = P_t(c) - P_c, from the clean subset's prototypes in ``layer``."""

    name = "pure"

    def __init__(self, layer: str, protos: PrototypeConfig):
        self.layer = layer
        self.protos = protos

    def prepare(self, model, train: ImageSet, normalize: Normalizer, device: str) -> None:
        """Work before the first estimate (not repeated on resume: it is in ``state_dict``)."""

    def _prototypes(self, model, data: ImageSet, normalize, num_classes: int, device: str,
                    old: Optional[Prototypes]) -> Prototypes:
        p = self.protos
        fresh = stream_prototypes(model, self.layer, data.images, data.labels, normalize, num_classes, p.clusters,
                                  p.seed, p.memory_mb, device=device)
        return blend(old, fresh, p.alpha) if old is not None else fresh

    def estimate(self, model, train: ImageSet, targets: torch.Tensor, normalize: Normalizer, device: str,
                 previous: Optional[SanitizationState] = None) -> SanitizationState:
        protos = self._prototypes(model, train, normalize, len(targets), device,
                                  previous.prototypes if previous is not None else None)
        means = protos.means()
        pavs, active = pure_pavs(means, targets, protos.available)
        return SanitizationState(protos, means.to(device), pavs.to(device), active.to(device))

    def retarget(self, state: SanitizationState, targets: torch.Tensor, device: str) -> SanitizationState:
        """PAVs for other targets from the same prototypes (NT-PGBD between re-estimates)."""
        pavs, active = pure_pavs(state.means.cpu(), targets, state.prototypes.available)
        return SanitizationState(state.prototypes, state.means, pavs.to(device), active.to(device), state.shifted,
                                 state.teacher_means)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, payload: dict, device: str) -> None:
        """Restore what ``state_dict`` saved."""

    def restore_data(self, train: ImageSet) -> None:
        """After a resume: rebuild data derived in ``prepare`` from what was restored."""

    def artifacts(self, out: Path) -> dict:
        """Write this source's files into ``out``; return what goes into summary.json."""
        return {}


PureSource = PAVSource


class ShiftedSource(PAVSource):
    """ST-PGBD: a trigger inverted for the one target (``steps`` x ``batch_size`` images), D_S'
    = D_S carrying it, and V_c = P'_c - P_c."""

    name = "shifted"

    def __init__(self, layer: str, protos: PrototypeConfig, target: int, steps: int, batch_size: int,
                 method: str = "nc"):
        super().__init__(layer, protos)
        self.target, self.steps, self.batch_size, self.method = target, steps, batch_size, method
        self.trigger: Optional[Trigger] = None
        self.shifted: Optional[ImageSet] = None

    def prepare(self, model, train, normalize, device):
        inv = InversionConfig(steps=self.steps, batch_size=self.batch_size, seed=self.protos.seed, method=self.method)
        self.trigger = invert_trigger(model, train, self.target, normalize, inv, device)
        log.info("ST-PGBD: %s trigger for class %d, size %.2f, flips %.1f%% of D_S", self.method, self.trigger.target,
                 self.trigger.norm, 100 * self.trigger.flip_rate)
        self.shifted = ImageSet(self.trigger.apply(train.images), train.labels)

    def estimate(self, model, train, targets, normalize, device, previous=None):
        k = len(targets)
        protos = self._prototypes(model, train, normalize, k, device,
                                  previous.prototypes if previous is not None else None)
        means = protos.means()
        shifted = self._prototypes(model, self.shifted, normalize, k, device,
                                   previous.shifted if previous is not None else None)
        pavs, active = shift_pavs(means, shifted.means(), targets, protos.available & shifted.available)
        return SanitizationState(protos, means.to(device), pavs.to(device), active.to(device), shifted)

    def retarget(self, state, targets, device):
        raise NotImplementedError("ST-PGBD's PAVs belong to the one trigger it synthesized: its target cannot cycle")

    def state_dict(self) -> dict:
        t = self.trigger
        return {"trigger": {"target": t.target, "mask": t.mask, "pattern": t.pattern, "norm": t.norm,
                            "flip_rate": t.flip_rate, "kind": t.kind}} if t is not None else {}

    def load_state_dict(self, payload, device):
        if payload.get("trigger"):
            self.trigger = Trigger(**payload["trigger"])

    def restore_data(self, train):
        """D_S' is rebuilt from the saved trigger rather than searched again."""
        if self.trigger is not None and self.shifted is None:
            self.shifted = ImageSet(self.trigger.apply(train.images), train.labels)

    def artifacts(self, out):
        if self.trigger is None:
            return {}
        t = self.trigger
        save_trigger_png(t, Path(out) / "synthesized_trigger.png")
        torch.save({"target": t.target, "mask": t.mask, "pattern": t.pattern, "kind": t.kind},
                   Path(out) / "synthesized_trigger.pt")
        size = "changed_pixels" if t.kind == "additive" else "mask_l1"
        return {"synthesized_trigger": {"target": t.target, "method": self.method, size: round(t.norm, 3),
                                        "flip_rate": round(t.flip_rate, 4), "png": "synthesized_trigger.png"}}


def teacher_prototypes(model, layer: str, clean: ImageSet, normalize: Normalizer, fmap: LinearMap,
                       num_classes: int, clusters: int, seed: int, device: str = "cpu") -> torch.Tensor:
    """Prototypes (K, k, h, w) of the student's activations lifted into the teacher space."""
    where = fmap.s_scale.device
    with torch.no_grad():
        lifted = fmap.to_teacher(student_maps(model, layer, clean.images, normalize, device=device).to(where)).cpu()
    means = estimate_prototypes(lifted.flatten(1), clean.labels, num_classes, clusters, seed).means()
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


class MappedSource(PAVSource):
    """Pure PAVs computed in a teacher's feature space: a reversible 3x3 map student <->
    teacher is fitted on the training images' pairs (``teacher_features``, rows matching
    them), prototypes are taken of the lifted activations, and each PAV is mapped back."""

    name = "mapped"

    def __init__(self, layer: str, protos: PrototypeConfig, teacher_features: torch.Tensor, components: int,
                 steps: int):
        super().__init__(layer, protos)
        self.teacher_features, self.components, self.steps = teacher_features, components, steps
        self.fmap: Optional[LinearMap] = None
        self.map_fit: Optional[MapFit] = None

    def prepare(self, model, train, normalize, device):
        if len(self.teacher_features) != len(train):
            raise MappingError(f"{len(self.teacher_features)} teacher feature rows for {len(train)} training images")
        student = student_maps(model, self.layer, train.images, normalize, device=device)
        teacher = reduce_teacher(self.teacher_features, self.components, tuple(student.shape[2:]), self.protos.seed)
        self.map_fit = train_map(student, teacher, MappingConfig(components=self.components, steps=self.steps,
                                                                 seed=self.protos.seed))
        self.fmap = self.map_fit.model.to(device).eval()

    def estimate(self, model, train, targets, normalize, device, previous=None):
        protos = self._prototypes(model, train, normalize, len(targets), device,
                                  previous.prototypes if previous is not None else None)
        means = protos.means()
        _, active = pure_pavs(means, targets, protos.available)
        t_means = teacher_prototypes(model, self.layer, train, normalize, self.fmap, len(targets),
                                     self.protos.clusters, self.protos.seed, device)
        pavs = teacher_pavs(t_means, targets, self.fmap, active)
        return SanitizationState(protos, means.to(device), pavs.to(device), active.to(device), None, t_means)

    def retarget(self, state, targets, device):
        _, active = pure_pavs(state.means.cpu(), targets, state.prototypes.available)
        pavs = teacher_pavs(state.teacher_means, targets, self.fmap, active)
        return SanitizationState(state.prototypes, state.means, pavs.to(device), active.to(device), state.shifted,
                                 state.teacher_means)

    def state_dict(self) -> dict:
        return {"fmap": {k: v.cpu() for k, v in self.fmap.state_dict().items()}} if self.fmap is not None else {}

    def load_state_dict(self, payload, device):
        if payload.get("fmap"):
            f = payload["fmap"]
            self.fmap = LinearMap(f["s2t.weight"].shape[1], f["s2t.weight"].shape[0])
            self.fmap.load_state_dict(f)
            self.fmap.to(device).eval()

    def artifacts(self, out):
        if self.map_fit is None:
            return {}
        m = self.map_fit
        return {"mapping": {"steps": m.steps, "converged": m.converged,
                            "loss_first": m.losses[0] if m.losses else None,
                            "loss_last": m.losses[-1] if m.losses else None,
                            "student_round_trip_error": round(m.student_error, 4),
                            "teacher_fit_error": round(m.teacher_error, 4),
                            "components": int(m.model.t2s.weight.shape[1])}}


def nt_target(epoch: int, cycle: int, order: Sequence[int]) -> int:
    """NT-PGBD's assumed target during ``epoch`` (0-based): order[0] for the first
    ``cycle`` epochs, then order[1], ..., wrapping around."""
    return int(order[(epoch // cycle) % len(order)])


class FixedTargets:
    """Each class keeps the target it was given (-1: no term for it)."""

    cycles = False

    def __init__(self, targets: torch.Tensor):
        self.targets = targets.clone()

    def at(self, epoch: int) -> torch.Tensor:
        return self.targets


class CyclingTargets(FixedTargets):
    """NT-PGBD: every class is assumed attacked towards one class, which changes every
    ``cycle`` epochs along ``order`` (default: all classes in turn)."""

    cycles = True

    def __init__(self, targets: torch.Tensor, cycle: int, order: Sequence[int] = ()):
        super().__init__(targets)
        k = len(targets)
        self.cycle = cycle
        self.order = [int(c) for c in order] or list(range(k))
        bad = [c for c in self.order if not 0 <= c < k]
        if bad:
            raise ConfigError(f"nt_classes {bad} are not classes of this {k}-class model")

    def at(self, epoch: int) -> torch.Tensor:
        return torch.full_like(self.targets, nt_target(epoch, self.cycle, self.order))


def single_target(targets: torch.Tensor, who: str) -> int:
    """The one target class of all-to-one targets, or an error naming what to give instead."""
    known = sorted({int(t) for t in targets.tolist() if t >= 0})
    if len(known) != 1:
        raise ConfigError(f"{who} needs the trigger of one target class; the targets are {known or 'unknown'} "
                          "(give --target N or --target auto; for all-to-all attacks use nt-pgbd)")
    return known[0]


def make_variant(variant: str, targets: torch.Tensor, layer: str, protos: PrototypeConfig, *, cycle: int = 3,
                 nt_classes: Sequence[int] = (), st_steps: int = 300, st_batch_size: int = 32, st_inversion: str = "nc",
                 teacher_features: Optional[torch.Tensor] = None, mapping_components: int = 64,
                 mapping_steps: int = 3000) -> Tuple[PAVSource, FixedTargets]:
    """The PAV source and target plan of PGBD's variant ``pgbd``, ``nt`` or ``st``."""
    if variant not in VARIANTS:
        raise ConfigError(f"variant={variant!r} (choose {', '.join(VARIANTS)})")
    plan = CyclingTargets(targets, cycle, nt_classes) if variant == "nt" else FixedTargets(targets)
    if variant == "st":
        if teacher_features is not None:
            raise ConfigError("the large-model mapping applies to pure PAVs (pgbd, nt-pgbd), not to ST-PGBD")
        return ShiftedSource(layer, protos, single_target(targets, "ST-PGBD"), st_steps, st_batch_size,
                             st_inversion), plan
    if teacher_features is not None:
        return MappedSource(layer, protos, teacher_features, mapping_components, mapping_steps), plan
    return PureSource(layer, protos), plan
