"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022), as the
authors' release (YiZeng623/I-BAU, ``defense.py``) and BackdoorBench (``defense/i-bau.py``,
f02e3534) run it.

The defense solves min_theta max_delta H(delta, theta), H the cross-entropy of clean
data with one universal perturbation delta added. Each round (an epoch of the loop):

1. **Fit delta** (``fit_perturbation``): delta starts at zero; one SGD step of size
   ``pert_lr`` (10) per batch, over the whole clean subset once, on the inner loss
   -CE(f(x + delta), argmax f(x)) + ``pert_decay`` ||delta||^2 (the model's own
   predictions as labels; no projection: both sources comment the L2 bound out).
   On the genuine BadNets record its norm grows past 100 in 12 steps and the final
   delta sends every image to the target class: it *is* a trigger.
2. **Unlearn** (``IBAUMethod.step``): per batch, the outer loss is the cross-entropy
   with delta added to a random ``portion`` of the batch (true labels); the model
   takes its implicit hypergradient through the fixed point delta = Psi(delta, theta),
   Psi = delta - ``fixed_point_lr`` * grad_delta G, G the inner loss on one fixed batch
   of the subset with true labels (both sources use their first batch, in every round):

       dL/dtheta = d_theta L + (d_theta Psi)^T v,  v = sum_{k<K} (d_delta Psi^T)^k d_delta L,

   K = ``fixed_point_iters`` Neumann terms (the sources' ``fixed_point``, which starts
   v at zero, so K = 0 is the direct gradient alone). The map's step must be small:
   d_delta Psi = I - eta * Hessian, and the series converges only when its spectral
   radius is below 1.

The model stays in eval mode throughout (BatchNorm on running statistics): delta is
fitted against, and the model unlearns, the network that is tested. Adam at a constant
learning rate (BackdoorBench builds a cosine scheduler and never steps it).

Perturbed share: both sources perturb ``int(n * 0.01)`` samples of a batch of n, which is
2 at BackdoorBench's batch 256, 1 at the release's 100, and 0 (no unlearning at all) at
batches below 100. Here it is ``max(1, int(n * portion))``: the sources' count wherever
theirs is non-zero, one sample where theirs would be none (docs/baselines.md has the
measurement).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..datasets.batches import EVAL_BATCH_SIZE, Normalizer, iterate
from ..settings.fields import preset_default
from ..util.hooks import eval_mode, frozen_weights
from .loop import LoopConfig, Method

_D = partial(preset_default, defense="i-bau")

log = logging.getLogger(__name__)


@dataclass
class IBAUConfig(LoopConfig):
    """I-BAU's settings; ``epochs`` are its rounds (BackdoorBench's ``n_rounds``).

    Attributes:
        fixed_point_iters: K, Neumann terms of the implicit hypergradient (BackdoorBench's ``K``).
        fixed_point_lr: step of the inner fixed-point map Psi (0.1 in both sources).
        pert_lr: SGD step of delta's fit, one per batch (10 in both sources).
        pert_decay: weight of ||delta||^2 in the inner loss (0.001 in both sources).
        portion: share of each batch that gets delta in the outer loss (at least one sample).
    """

    optimizer: str = _D("optimizer")
    scheduler_interval: str = _D("scheduler_interval")
    cos_t_max: int = _D("cos_t_max")
    amsgrad: bool = _D("amsgrad")
    lr: float = _D("lr")
    weight_decay: float = _D("wd")
    epochs: int = _D("epochs")
    lr_scheduler: str = _D("lr_scheduler")
    freeze_bn: bool = _D("freeze_bn")
    fixed_point_iters: int = _D("K")
    fixed_point_lr: float = _D("fixed_point_lr")
    pert_lr: float = _D("pert_lr")
    pert_decay: float = _D("pert_decay")
    portion: float = _D("portion")

    def problems(self) -> List[str]:
        found = super().problems()
        if self.fixed_point_iters < 0:
            found.append(f"fixed_point_iters={self.fixed_point_iters} (must be >= 0)")
        for name in ("fixed_point_lr", "pert_lr"):
            if getattr(self, name) <= 0:
                found.append(f"{name}={getattr(self, name)} (must be > 0)")
        if self.pert_decay < 0:
            found.append(f"pert_decay={self.pert_decay} (must be >= 0)")
        if not 0 <= self.portion <= 1:
            found.append(f"portion={self.portion} (must lie in [0, 1]; at least one sample is perturbed)")
        return found


def perturbed_count(batch: int, portion: float) -> int:
    """Samples of a batch that get delta in the outer loss: the sources' ``int(n * portion)``,
    but never none."""
    return min(batch, max(1, int(batch * portion)))


def inner_loss(model, x: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor, decay: float) -> torch.Tensor:
    """G(delta) = -CE(f(x + delta), labels) + decay ||delta||^2, minimized over delta."""
    return -F.cross_entropy(model(x + delta), labels) + decay * delta.pow(2).sum()


def fit_perturbation(model, train: ImageSet, normalize: Normalizer, cfg: IBAUConfig, generator: torch.Generator,
                     hflip: bool, device: str) -> torch.Tensor:
    """One universal delta over the clean subset: one SGD step per batch (see the module docstring)."""
    delta = torch.zeros((1, *train.images.shape[1:]), device=device, requires_grad=True)
    opt = torch.optim.SGD([delta], lr=cfg.pert_lr)
    # frozen weights: only delta is fitted here, and the weights' gradients would add the
    # weight-gradient half of every backward pass
    with eval_mode(model), frozen_weights(model):
        for x, _, _ in iterate(train.images, train.labels, cfg.batch_size, normalize, shuffle=True,
                               augment=cfg.augment, hflip=hflip, generator=generator, device=device):
            with torch.no_grad():
                pseudo = model(x).argmax(1)
            opt.zero_grad(set_to_none=True)
            inner_loss(model, x, pseudo, delta, cfg.pert_decay).backward()
            opt.step()
    return delta.detach()


@torch.inference_mode()
def flip_rate(model, data: ImageSet, delta: torch.Tensor, normalize: Normalizer, device: str) -> float:
    """Share of ``data`` whose predicted class changes when delta is added (a defender can
    compute it on clean data: a delta that acts as a trigger flips most images)."""
    changed = 0
    with eval_mode(model):
        for x, _, _ in iterate(data.images, data.labels, EVAL_BATCH_SIZE, normalize, device=device):
            changed += int((model(x).argmax(1) != model(x + delta).argmax(1)).sum())
    return changed / max(len(data), 1)


def implicit_hypergradient(params: Sequence[torch.Tensor], delta: torch.Tensor,
                           inner: Callable[[torch.Tensor], torch.Tensor],
                           outer: Callable[[torch.Tensor], torch.Tensor], eta: float, iters: int,
                           tol: float = 1e-10) -> List[torch.Tensor]:
    """d outer(delta*(theta), theta) / d theta for delta* the fixed point of
    Psi = delta - eta * grad_delta inner(delta) (``inner`` is minimized); K = ``iters``
    Neumann terms, stopping early when a term changes v by less than ``tol``."""
    delta = delta.detach().requires_grad_(True)
    direct = torch.autograd.grad(outer(delta), list(params) + [delta], allow_unused=True)
    direct_theta, b = list(direct[:-1]), direct[-1]
    if b is None:
        b = torch.zeros_like(delta)
    g = torch.autograd.grad(inner(delta), delta, create_graph=True)[0]
    psi = delta - eta * g
    v = torch.zeros_like(delta)
    for _ in range(iters):
        previous = v
        v = torch.autograd.grad(psi, delta, grad_outputs=v, retain_graph=True)[0] + b
        if float((v - previous).norm()) < tol:
            break
    implicit = torch.autograd.grad(psi, params, grad_outputs=v, allow_unused=True)
    return [(d if d is not None else torch.zeros_like(p)) + (i if i is not None else 0)
            for p, d, i in zip(params, direct_theta, implicit)]


class IBAUMethod(Method):
    name = "i-bau"

    def __init__(self, cfg: IBAUConfig):
        super().__init__(cfg)
        self.delta: Optional[torch.Tensor] = None
        self.anchor: Optional[tuple] = None  # the inner map's data: one fixed batch of the subset
        self.generator = torch.Generator().manual_seed(cfg.seed + 104729)

    def begin_epoch(self, epoch, model, train, normalize, device) -> Dict[str, float]:
        cfg = self.cfg
        self.delta = fit_perturbation(model, train, normalize, cfg, self.generator, self.hflip, device)
        # The inner map's data: one batch, the same in every round (the sources' images_list[0]).
        first = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.batch_size]
        x0, y0, _ = next(iterate(train.images[first], train.labels[first], len(first), normalize, device=device))
        self.anchor = (x0, y0)
        probe, where = (self.heldout, "heldout") if self.heldout is not None else (train, "train")
        stats = {"pert_norm": float(self.delta.norm()),
                 f"pert_flip_rate_{where}": flip_rate(model, probe, self.delta, normalize, device)}
        log.info("i-bau round %d: ||delta|| %.2f, flips %.1f%% of the %s clean images", epoch + 1,
                 stats["pert_norm"], 100 * stats[f"pert_flip_rate_{where}"], "held-out" if where == "heldout" else
                 "training")
        return stats

    def step(self, model, x, y, store, opt, epoch):
        cfg = self.cfg
        params = [p for p in model.parameters() if p.requires_grad]
        n = perturbed_count(len(x), cfg.portion)
        rows = torch.randperm(len(x), generator=self.generator)[:n].to(x.device)
        chosen = torch.zeros(len(x), 1, 1, 1, device=x.device)
        chosen[rows] = 1.0
        x0, y0 = self.anchor

        def outer(d):
            return F.cross_entropy(model(x + chosen * d), y)

        def inner(d):
            return inner_loss(model, x0, y0, d, cfg.pert_decay)

        grads = implicit_hypergradient(params, self.delta, inner, outer, cfg.fixed_point_lr, cfg.fixed_point_iters)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with torch.no_grad():
            logits = model(x + chosen * self.delta)
            loss = F.cross_entropy(logits, y)
        if torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads):
            opt.step()
        # train_acc of this defense is the accuracy on the batch as unlearned (delta on `n` samples).
        return {"loss": loss, "logits": logits}

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict, model, device: str) -> None:
        self.generator.set_state(state["generator"])
