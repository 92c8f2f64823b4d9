"""FT-SAM: fine-tuning with sharpness-aware minimization (Zhu et al., ICCV 2023).

Each update first takes the gradient g at the weights w, moves to the worst nearby
point w + eps of a neighbourhood of radius rho, and applies the gradient taken
there at w. FT-SAM uses the adaptive neighbourhood of ASAM (Kwon et al., 2021):
with T_w = |w| + eta elementwise, eps = rho * T_w^2 g / ||T_w g||, so that
||T_w^-1 eps|| = rho; plain SAM (``adaptive=False``) has eps = rho * g / ||g||.
BackdoorBench's defaults: rho 2, label smoothing 0.1, lr 0.01 with a cosine schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..settings.fields import preset_default
from .loop import LoopConfig, Method, bn_stats_frozen

_D = partial(preset_default, defense="ft-sam")


@dataclass
class FTSAMConfig(LoopConfig):
    """Loop settings plus SAM's: radius ``rho``, ASAM's ``adaptive`` neighbourhood and its
    ``eta``, and the cross-entropy's ``label_smoothing`` (defaults: BackdoorBench's ft-sam.py)."""

    scheduler_interval: str = _D("scheduler_interval")
    rho: float = _D("rho")
    adaptive: bool = _D("adaptive")
    eta: float = _D("sam_eta")
    label_smoothing: float = _D("label_smoothing")

    def problems(self) -> List[str]:
        found = super().problems()
        if self.rho <= 0:
            found.append(f"rho={self.rho} (must be > 0)")
        if not 0 <= self.label_smoothing < 1:
            found.append(f"label_smoothing={self.label_smoothing} (must lie in [0, 1))")
        return found


def sam_perturbation(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool, eta: float = 0.01) -> List[torch.Tensor]:
    """The ascent step eps for each weight tensor (see the module docstring)."""
    if adaptive:
        scale = [w.abs() + eta for w in weights]
        norm = torch.sqrt(sum(((t * g) ** 2).sum() for t, g in zip(scale, grads)))
        return [rho * t * t * g / norm.clamp_min(1e-12) for t, g in zip(scale, grads)]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    return [rho * g / norm.clamp_min(1e-12) for g in grads]


class FTSAMMethod(Method):
    name = "ft-sam"

    def step(self, model, x, y, store, opt, epoch):
        cfg = self.cfg
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in model.parameters() if p.grad is not None]
        with torch.no_grad():
            eps = sam_perturbation([p for p in params], [p.grad for p in params], cfg.rho, cfg.adaptive, cfg.eta)
            for p, e in zip(params, eps):
                p.add_(e)
        try:
            opt.zero_grad(set_to_none=True)
            with bn_stats_frozen(model):
                sharp = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
            sharp.backward()
        finally:
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.sub_(e)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        if torch.isfinite(sharp):
            opt.step()
        return {"loss": sharp.detach(), "ce": loss.detach(), "logits": logits.detach()}
