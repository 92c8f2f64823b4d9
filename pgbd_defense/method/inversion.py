"""Trigger inversion and target inference.

A trigger is a mask m (1 x H x W, values in [0, 1]) and a pattern p (C x H x W,
in [0, 1]) stamped on an image x (in [0, 1]) as (1 - m) * x + m * p. For a class
t, :func:`invert_trigger` searches the smallest mask that sends clean images of
the other classes to t: cross-entropy towards t plus ``cost`` * mean(m), with
Neural Cleanse's schedule for the cost (Wang et al., S&P 2019): raised while
the trigger flips enough images, lowered while it does not.

A backdoor's target needs a far smaller mask than any other class, so
:func:`infer_target` inverts a trigger for every class and flags the low
outliers of the masks' L1 norms by their anomaly index (distance to the median
in units of 1.4826 x the median absolute deviation; flagged above 2, below the
median only), by default on the logarithm of the norms (see :func:`anomaly_indices`).

ST-PGBD uses the inverted trigger of its target to build D_S'. The paper uses Tao et
al. ("Better Trigger Inversion Optimization in Backdoor Scanning", CVPR 2022), which
``method="tao"`` follows (:func:`invert_tao`): no mask, an additive perturbation
x + P+ - P- whose *number of changed pixels* is penalized through a smooth count, values
below one grey level pruned, the same cost schedule. ``method="nc"`` (the default) is the
Neural Cleanse mask-and-pattern search above. docs/variants.md compares the two.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..errors import ConfigError
from ..settings.fields import FIELDS, preset_default
from ..util.hooks import eval_mode, frozen_weights
from ..util.progress import progress

log = logging.getLogger(__name__)

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of a normal distribution's sigma
METHODS = ("nc", "tao")


@dataclass
class InversionConfig:
    """Budget and schedule of one trigger search.

    steps: optimizer steps per class; batch_size: clean images per step;
    lr: Adam's step size on the mask's and pattern's logits; init_cost: the
    weight of the mask's L1 norm at the start (Neural Cleanse: 1e-3); cost_factor: the schedule's multiplier;
    patience: steps of success (or failure) before the cost moves; success: the
    flip rate that counts as success; seed: draws of the batches and the start;
    method: ``nc`` (Neural Cleanse's mask and pattern) or ``tao`` (Tao et al.'s additive,
    pixel-count-penalized perturbation).
    """

    steps: int = preset_default("inversion_steps")
    batch_size: int = preset_default("inversion_batch_size")
    lr: float = 0.1
    init_cost: float = 1e-3
    cost_factor: float = 1.5
    patience: int = 10
    success: float = 0.95
    seed: int = 0
    method: str = "nc"

    def problems(self) -> List[str]:
        found = []
        if self.method not in METHODS:
            found.append(f"method={self.method!r} (choose {', '.join(METHODS)})")
        for name in ("steps", "batch_size", "patience"):
            if getattr(self, name) < 1:
                found.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.lr <= 0 or self.init_cost < 0 or self.cost_factor <= 1:
            found.append(f"lr={self.lr}, init_cost={self.init_cost}, cost_factor={self.cost_factor} "
                         "(need lr > 0, init_cost >= 0, cost_factor > 1)")
        if not 0 < self.success <= 1:
            found.append(f"success={self.success} (must lie in (0, 1])")
        return found


@dataclass
class Trigger:
    """An inverted trigger for ``target`` and the share of non-target images it flips.

    ``kind="blend"`` (Neural Cleanse): ``mask`` (1, H, W) and ``pattern`` (C, H, W) in [0, 1],
    stamped as (1 - m) x + m p; ``norm`` is the mask's L1 norm. ``kind="additive"`` (Tao et
    al.): ``pattern`` is the perturbation (C, H, W) in [-1, 1], stamped as clip(x + pattern);
    ``mask`` marks the pixels it changes and ``norm`` counts them."""

    target: int
    mask: torch.Tensor
    pattern: torch.Tensor
    norm: float
    flip_rate: float
    kind: str = "blend"

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) images -> the same images carrying the trigger (uint8)."""
        x = images.float() / 255.0
        if self.kind == "additive":
            out = x + self.pattern
        else:
            out = (1 - self.mask) * x + self.mask * self.pattern
        return (out * 255.0).round().clamp(0, 255).to(torch.uint8)

    def support(self) -> torch.Tensor:
        """(H, W) weight of each pixel in the trigger: the mask, or the changed pixels."""
        return self.mask[0].float()


def trigger_overlap(trigger: Trigger, true_region: torch.Tensor) -> float:
    """Share of the trigger's support (mask mass, or changed pixels) inside ``true_region``
    (H, W, boolean: where the real trigger changes images)."""
    w = trigger.support()
    total = float(w.sum())
    return float((w * true_region.float()).sum()) / total if total > 0 else 0.0


def stamp_normalized(x01: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor,
                     normalize: Normalizer) -> torch.Tensor:
    """[0, 1] images blended with (mask, pattern), then normalized (differentiable; not rounded)."""
    out = (1 - mask) * x01 + mask * pattern
    return (out - normalize.mean.to(out.device)) / normalize.std.to(out.device)


def invert_trigger(model: torch.nn.Module, clean: ImageSet, target: int, normalize: Normalizer,
                   cfg: InversionConfig = InversionConfig(), device: str = "cpu") -> Trigger:
    """The smallest trigger found for ``target`` by ``cfg.method`` (model in eval mode, weights
    untouched).

    The images of ``target`` itself are left out: the trigger must move the others.
    Returns the smallest-norm trigger that flipped ``cfg.success`` of a fixed check batch,
    else the last one; its ``flip_rate`` is measured on every non-target image."""
    bad = cfg.problems()
    if bad:
        raise ConfigError("invalid trigger inversion settings: " + "; ".join(bad))
    pool = clean.images[clean.labels != target]
    if len(pool) == 0:
        raise ConfigError(f"no clean image outside class {target} to invert a trigger with")
    gen = torch.Generator().manual_seed(cfg.seed + 1000 * target)
    search = invert_tao if cfg.method == "tao" else invert_nc
    with eval_mode(model), frozen_weights(model):
        best = search(model, pool, target, normalize, cfg, gen, device)
        best.flip_rate = flip_rate(model, clean, best, normalize, device)
    return best


def invert_nc(model, pool: torch.Tensor, target: int, normalize: Normalizer, cfg: InversionConfig,
              gen: torch.Generator, device: str) -> Trigger:
    """Neural Cleanse's search on ``pool`` (uint8 non-target images), see the module's docstring."""
    _, c, h, w = pool.shape
    mask_logit = (torch.randn(1, 1, h, w, generator=gen) * 0.1 - 2.0).to(device).requires_grad_(True)
    pattern_logit = (torch.randn(1, c, h, w, generator=gen) * 0.1).to(device).requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=cfg.lr, betas=(0.5, 0.9))
    # Candidates are judged on one fixed batch every ``patience`` steps, not on the noisy training batch.
    check = pool[torch.randperm(len(pool), generator=gen)[:256]].to(device).float() / 255.0
    cost, up, down = cfg.init_cost, 0, 0
    best: Optional[Trigger] = None
    last_flip = 0.0
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(pool), (min(cfg.batch_size, len(pool)),), generator=gen)
        x01 = pool[idx].to(device).float() / 255.0
        mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
        logits = model(stamp_normalized(x01, mask, pattern, normalize))
        y = torch.full((len(x01),), target, device=device)
        loss = F.cross_entropy(logits, y) + cost * mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        flip = float((logits.argmax(1) == target).float().mean())
        cost, up, down = _schedule(cost, up, down, flip, cfg)
        if step % cfg.patience == 0 or step == cfg.steps:
            with torch.no_grad():
                mask, pattern = torch.sigmoid(mask_logit), torch.sigmoid(pattern_logit)
                last_flip = float((model(stamp_normalized(check, mask, pattern, normalize)).argmax(1) == target)
                                  .float().mean())
            norm = float(mask.sum())
            if last_flip >= cfg.success and (best is None or norm < best.norm):
                best = Trigger(target, mask.cpu()[0], pattern.cpu()[0], norm, last_flip)
    if best is None:
        mask, pattern = torch.sigmoid(mask_logit).detach().cpu()[0], torch.sigmoid(pattern_logit).detach().cpu()[0]
        best = Trigger(target, mask, pattern, float(mask.sum()), last_flip)
    return best


def _schedule(cost: float, up: int, down: int, flip: float, cfg: InversionConfig, down_power: float = 1.0):
    """Neural Cleanse's cost schedule: after ``patience`` steps of success the cost rises (a
    trigger that works may shrink), after ``patience`` of failure it falls, by
    cost_factor ** down_power (Neural Cleanse: 1; Tao et al.'s code: 1.5)."""
    up, down = (up + 1, 0) if flip >= cfg.success else (0, down + 1)
    if up >= cfg.patience:
        cost, up = (cost * cfg.cost_factor if cost > 0 else cfg.init_cost or 1e-3), 0
    elif down >= cfg.patience:
        cost, down = cost / cfg.cost_factor ** down_power, 0
    return cost, up, down


def pixel_count(raw: torch.Tensor) -> torch.Tensor:
    """Tao et al.'s smooth count of changed pixels: per pixel the largest over channels of
    tanh(raw / 10) / 2 + 0.5, summed over the image (raw: the unclamped perturbation, C x H x W;
    it falls as raw goes below 0, where the clamped perturbation is 0)."""
    return (torch.tanh(raw / 10) / (2 - 1e-7) + 0.5).amax(0).sum()


def _prune(t: torch.Tensor) -> torch.Tensor:
    """Values below one grey level (1/255) set to 0: they change no uint8 pixel."""
    return torch.where(t.abs() < 1 / 255, torch.zeros_like(t), t)


def invert_tao(model, pool: torch.Tensor, target: int, normalize: Normalizer, cfg: InversionConfig,
               gen: torch.Generator, device: str) -> Trigger:
    """Tao et al.'s search (as their PixelBackdoor code, used by the MCL release, does it):
    two raw tensors P+ and P- (C x H x W, started uniform in [0, 1]), the perturbation
    clamp(P+, 0, 1) - clamp(P-, 0, 1) added to the image and clipped to [0, 1]; loss
    cross-entropy towards ``target`` + cost * (pixel_count(P+) + pixel_count(P-)), Adam
    (lr, betas 0.5/0.9) with Neural Cleanse's cost schedule. Every ``patience`` steps the
    perturbation is pruned (values under 1/255 zeroed) and judged on a fixed check batch; a
    pruned candidate that flips ``cfg.success`` with fewer changed pixels than the best so far
    becomes the best, and the search restarts from it (P+ and P- reset to its parts).

    What differs from the release: it judges and schedules once per pass over the data (100
    passes); here once per ``patience`` optimizer steps (the same steps budget as the Neural
    Cleanse search), its random start is seeded, and the target class's own images are left out
    (as for Neural Cleanse: the trigger must move the other classes)."""
    _, c, h, w = pool.shape
    plus = torch.rand(c, h, w, generator=gen).to(device).requires_grad_(True)
    minus = torch.rand(c, h, w, generator=gen).to(device).requires_grad_(True)
    opt = torch.optim.Adam([plus, minus], lr=cfg.lr, betas=(0.5, 0.9))
    check = pool[torch.randperm(len(pool), generator=gen)[:256]].to(device).float() / 255.0
    mean, std = normalize.mean.to(device), normalize.std.to(device)
    cost, up, down = cfg.init_cost, 0, 0
    best: Optional[Trigger] = None
    best_reg = math.inf

    def perturbation():
        return plus.clamp(0, 1) - minus.clamp(0, 1)

    def stamped(x01, delta):
        return ((x01 + delta).clamp(0, 1) - mean) / std

    last = None
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(pool), (min(cfg.batch_size, len(pool)),), generator=gen)
        x01 = pool[idx].to(device).float() / 255.0
        logits = model(stamped(x01, perturbation()))
        y = torch.full((len(x01),), target, device=device)
        reg = pixel_count(plus) + pixel_count(minus)
        loss = F.cross_entropy(logits, y) + cost * reg
        opt.zero_grad()
        loss.backward()
        opt.step()
        flip = float((logits.argmax(1) == target).float().mean())
        cost, up, down = _schedule(cost, up, down, flip, cfg, down_power=1.5)
        if step % cfg.patience == 0 or step == cfg.steps:
            with torch.no_grad():
                pos, neg = _prune(plus.clamp(0, 1)), _prune(minus.clamp(0, 1))
                delta = pos - neg
                changed = delta.abs().sum(0) > 0
                hits = float((model(stamped(check, delta)).argmax(1) == target).float().mean())
                reg_now = float(pixel_count(plus) + pixel_count(minus))
                last = Trigger(target, changed[None].float().cpu(), delta.cpu(), float(changed.sum()), hits,
                               "additive")
                if hits >= cfg.success and reg_now < best_reg and (best is None or last.norm < best.norm):
                    best, best_reg = last, reg_now
                    plus.copy_(pos)
                    minus.copy_(neg)
    return best if best is not None else last


@torch.no_grad()
def flip_rate(model: torch.nn.Module, clean: ImageSet, trigger: Trigger, normalize: Normalizer,
              device: str = "cpu", batch_size: int = 256) -> float:
    """Share of the clean images outside the trigger's target that it sends to the target."""
    pool = clean.images[clean.labels != trigger.target]
    hits = 0
    with eval_mode(model):
        for start in range(0, len(pool), batch_size):
            x = normalize(trigger.apply(pool[start : start + batch_size]).to(device))
            hits += int((model(x).argmax(1) == trigger.target).sum())
    return hits / max(1, len(pool))


def _median(x: torch.Tensor) -> torch.Tensor:
    s = x.sort().values
    return s[len(s) // 2] if len(s) % 2 else s[len(s) // 2 - 1 : len(s) // 2 + 1].mean()


SCALES = FIELDS["inversion_scale"].choices  # log, linear


def anomaly_indices(norms: Sequence[float], min_mad_share: float = 0.0, scale: str = "linear") -> torch.Tensor:
    """|v - median| / (1.4826 * MAD) for each class, v the norm (``linear``, Neural Cleanse's
    choice) or its logarithm (``log``); 0 where the MAD is 0 and v is the median.

    ``log`` measures how many times smaller a mask is, not by how many pixels: on data whose
    classes need masks of very different sizes (Fashion-MNIST: 40 to 190 pixels) the linear
    MAD is so wide that a 4-pixel backdoor mask stays under the threshold.
    ``min_mad_share`` floors the spread at that relative share (linear: of the median; log:
    log(1 + share)): when the other classes agree to within a percent, a class 1% below
    them is no outlier."""
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r} (choose {', '.join(SCALES)})")
    x = torch.as_tensor(list(norms), dtype=torch.float64)
    if scale == "log":
        x = x.clamp_min(1e-6).log()
    med = _median(x)
    dev = (x - med).abs()
    floor = math.log1p(min_mad_share) if scale == "log" else min_mad_share * float(med.abs())
    mad = torch.clamp_min(_median(dev), floor)
    if mad == 0:
        return torch.where(dev == 0, torch.zeros_like(dev), torch.full_like(dev, float("inf")))
    return dev / (MAD_CONSISTENCY * mad)


@dataclass
class Inference:
    """Target inference over ``classes``: each class's mask norm, flip rate and
    anomaly index; ``ranking`` orders them from most to least suspicious (smallest
    norm first); ``flagged`` are the low outliers (anomaly index > threshold)."""

    classes: List[int]
    norms: List[float]
    flip_rates: List[float]
    anomaly: List[float]
    ranking: List[int]
    flagged: List[int]
    threshold: float = 2.0
    scale: str = "log"
    triggers: Dict[int, Trigger] = field(default_factory=dict, repr=False)

    @property
    def target(self) -> int:
        """The flagged class with the smallest norm, else the top of the ranking."""
        return self.flagged[0] if self.flagged else self.ranking[0]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("triggers")
        d["target"] = self.target
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Inference":
        """The inverse of :meth:`to_dict` (the triggers themselves are not kept)."""
        return cls(**{k: v for k, v in d.items() if k not in ("target", "triggers")})

    def rows(self) -> List[dict]:
        rank = {c: i + 1 for i, c in enumerate(self.ranking)}
        return [{"class": c, "mask_l1": n, "flip_rate": f, "anomaly_index": a, "rank": rank[c],
                 "flagged": c in self.flagged}
                for c, n, f, a in zip(self.classes, self.norms, self.flip_rates, self.anomaly)]


def infer_target(model: torch.nn.Module, clean: ImageSet, num_classes: int, normalize: Normalizer,
                 cfg: InversionConfig = InversionConfig(), classes: Optional[Sequence[int]] = None,
                 threshold: float = 2.0, min_mad_share: float = 0.05, scale: str = "log",
                 device: str = "cpu") -> Inference:
    """Invert a trigger for each class (all by default) and rank the classes by mask norm;
    flag the low outliers (see :func:`anomaly_indices` for ``min_mad_share``)."""
    classes = list(range(num_classes)) if not classes else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise ConfigError(f"classes {bad} are not classes of this {num_classes}-class model")
    if len(classes) < 3:
        raise ConfigError("target inference compares classes with each other: give at least 3")
    triggers: Dict[int, Trigger] = {}
    for c in progress(classes, desc="target inference (classes)"):
        triggers[c] = invert_trigger(model, clean, c, normalize, cfg, device)
        log.info("class %d: mask L1 %.2f, flips %.1f%% of the other classes' clean images", c, triggers[c].norm,
                 100 * triggers[c].flip_rate)
    norms = [triggers[c].norm for c in classes]
    anomaly = anomaly_indices(norms, min_mad_share, scale).tolist()
    med = torch.tensor(norms).median().item()
    ranking = [c for _, c in sorted(zip(norms, classes))]
    flagged = [c for c in ranking if anomaly[classes.index(c)] > threshold and triggers[c].norm < med]
    return Inference(classes, norms, [triggers[c].flip_rate for c in classes], anomaly, ranking, flagged, threshold,
                     scale, triggers)


def save_trigger_png(trigger: Trigger, path: Path) -> Path:
    """Mask, pattern and the stamped trigger (mask * pattern) side by side, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def hwc(t: torch.Tensor):
        return t.permute(1, 2, 0).squeeze(-1).numpy()

    fig, axes = plt.subplots(1, 3, figsize=(7.5, 2.8))
    gray = trigger.pattern.shape[0] == 1
    if trigger.kind == "additive":  # the changed pixels, what is added, what is taken away
        panels = (trigger.mask, trigger.pattern.clamp_min(0), (-trigger.pattern).clamp_min(0))
        titles = ("changed pixels", "added (P+)", "removed (P-)")
    else:
        panels = (trigger.mask, trigger.pattern, trigger.mask * trigger.pattern)
        titles = ("mask", "pattern", "mask x pattern")
    for ax, img, title in zip(axes, panels, titles):
        ax.imshow(hwc(img), cmap="gray" if gray or img.shape[0] == 1 else None, vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    size = "changed pixels" if trigger.kind == "additive" else "mask L1"
    fig.suptitle(f"synthesized trigger for class {trigger.target}: {size} {trigger.norm:.1f}, "
                 f"flips {100 * trigger.flip_rate:.1f}%", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
