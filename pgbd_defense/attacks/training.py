"""Training a classifier from scratch (the attacker's side: the backdoored model)."""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..datasets.batches import Normalizer, iterate
from ..util.hooks import capture, mixed_precision
from ..util.progress import progress
from .mmdr import mmd_penalty


def train_classifier(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, normalize: Normalizer,
                     epochs: int, lr: float = 0.01, batch_size: int = 128, weight_decay: float = 5e-4,
                     augment: bool = True, hflip: bool = False, seed: int = 0, device: str = "cpu",
                     desc: str = "attack training", amp: bool = False, poisoned: Optional[torch.Tensor] = None,
                     mmdr_lambda: float = 0.0, mmdr_layers: Sequence[str] = ()) -> torch.nn.Module:
    """SGD with momentum 0.9 and a cosine learning-rate schedule (BackdoorBench's attack defaults);
    ``amp``: bfloat16 autocast. ``mmdr_lambda`` > 0 adds ML-MMDR's penalty (``mmdr.py``) at
    ``mmdr_layers``, ``poisoned`` (N,) marking which of ``images`` carry the trigger."""
    if mmdr_lambda > 0 and (poisoned is None or not mmdr_layers):
        raise ValueError("ML-MMDR needs the poisoned samples' mask and at least one layer")
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    for epoch in range(epochs):
        batches = iterate(images, labels, batch_size, normalize, shuffle=True, augment=augment, hflip=hflip,
                          generator=gen, device=device)
        bar = progress(batches, total=math.ceil(len(labels) / batch_size), desc=f"{desc} {epoch + 1}/{epochs}")
        hooks = capture(model, list(mmdr_layers)) if mmdr_lambda > 0 else contextlib.nullcontext({})
        with hooks as store:
            for x, y, idx in bar:
                with mixed_precision(amp, device):
                    loss = F.cross_entropy(model(x), y)
                    if mmdr_lambda > 0:
                        loss = loss + mmdr_lambda * mmd_penalty(store, mmdr_layers, poisoned[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()

