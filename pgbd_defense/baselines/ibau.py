"""I-BAU: Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

The defense solves min_theta max_delta H(delta, theta), H the mean cross-entropy of
the clean batch with one universal perturbation delta added (||delta||_2 <= eps).
For each batch, delta is found by a few steps of gradient ascent; the model then
takes the *implicit hypergradient* of H(delta*(theta), theta): delta* is the fixed
point of Psi(delta, theta) = delta + eta * grad_delta H, so

    dH/dtheta = d_theta H + (d_theta Psi)^T (I - d_delta Psi)^-T d_delta H,

with the inverse approximated by K terms of its Neumann series (fixed-point
iterations). BackdoorBench's defaults: Adam lr 1e-4, 5 rounds (epochs), K 5; the
inner ascent (5 steps of size 10, L2 bound 10) and the fixed-point map's step 0.1
follow the authors' release. (The map's step must be small: d_delta Psi = I + eta * Hessian,
and the Neumann series only converges when that has spectral radius below 1.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

from ..finetune import LoopConfig, Method, bn_stats_frozen


@dataclass
class IBAUConfig(LoopConfig):
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    epochs: int = 5
    inner_steps: int = 5
    inner_lr: float = 10.0
    eps: float = 10.0
    fixed_point_iters: int = 5
    fixed_point_lr: float = 0.1

    def problems(self) -> List[str]:
        found = super().problems()
        for name in ("inner_steps", "fixed_point_iters"):
            if getattr(self, name) < 0:
                found.append(f"{name}={getattr(self, name)} (must be >= 0)")
        for name in ("inner_lr", "eps", "fixed_point_lr"):
            if getattr(self, name) <= 0:
                found.append(f"{name}={getattr(self, name)} (must be > 0)")
        return found


def project_l2(delta: torch.Tensor, radius: float) -> torch.Tensor:
    norm = delta.norm()
    return delta * min(1.0, radius / max(norm.item(), 1e-12))


def implicit_hypergradient(params: Sequence[torch.Tensor], delta: torch.Tensor,
                           inner: Callable[[torch.Tensor], torch.Tensor],
                           outer: Callable[[torch.Tensor], torch.Tensor], eta: float, iters: int):
    """d outer(delta*(theta), theta) / d theta for delta* the fixed point of
    Psi = delta + eta * grad_delta inner(delta); see the module docstring."""
    delta = delta.detach().requires_grad_(True)
    out = outer(delta)
    direct = torch.autograd.grad(out, list(params) + [delta], allow_unused=True)
    direct_theta, b = list(direct[:-1]), direct[-1]
    if b is None:
        b = torch.zeros_like(delta)
    g = torch.autograd.grad(inner(delta), delta, create_graph=True)[0]
    psi = delta + eta * g
    v, total = b, b.clone()
    for _ in range(iters):
        v = torch.autograd.grad(psi, delta, grad_outputs=v, retain_graph=True)[0]
        total = total + v
    implicit = torch.autograd.grad(psi, params, grad_outputs=total, allow_unused=True)
    return [(d if d is not None else torch.zeros_like(p)) + (i if i is not None else 0)
            for p, d, i in zip(params, direct_theta, implicit)]


class IBAUMethod(Method):
    name = "i-bau"

    def universal_perturbation(self, model, x, y) -> torch.Tensor:
        cfg = self.cfg
        delta = torch.zeros((1, *x.shape[1:]), device=x.device, requires_grad=True)
        for _ in range(cfg.inner_steps):
            loss = F.cross_entropy(model(x + delta), y)
            (g,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta.add_(cfg.inner_lr * g)
        return project_l2(delta.detach(), cfg.eps)

    def step(self, model, x, y, store, opt, epoch):
        # BatchNorm's running statistics follow the clean batches only (one pass each).
        with torch.no_grad():
            model(x)
        with bn_stats_frozen(model):
            return self._step(model, x, y, opt)

    def _step(self, model, x, y, opt):
        cfg = self.cfg
        delta = self.universal_perturbation(model, x, y)
        params = [p for p in model.parameters() if p.requires_grad]

        def h(d):
            return F.cross_entropy(model(x + d), y)

        grads = implicit_hypergradient(params, delta, h, h, cfg.fixed_point_lr, cfg.fixed_point_iters)
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g.detach()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with torch.no_grad():
            logits = model(x + delta)
            loss = F.cross_entropy(logits, y)
        if torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads):
            opt.step()
        # train_acc of this defense is the accuracy on the perturbed batch.
        return {"loss": loss, "perturbation_norm": delta.norm(), "logits": logits}
