"""Grad-CAM (Selvaraju et al., ICCV 2017) of one convolution, for a batch.

The map of image i for class c_i is ReLU(sum_k w_k A_k) with A the layer's
output and w_k the spatial mean of d logit_c / d A_k; it is upsampled to the
input size and scaled to [0, 1] per image. Short enough to own: a library would
bring OpenCV for what is ten lines of torch.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..util.hooks import capture, eval_mode


def grad_cam(model: torch.nn.Module, layer: str, x: torch.Tensor, classes: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
    """(N, H, W) maps in [0, 1] for inputs ``x`` (already normalized) and ``classes``
    (default: each input's predicted class). The model is left in the mode it was in."""
    try:
        with eval_mode(model), capture(model, layer) as store, torch.enable_grad():
            x = x.detach().requires_grad_(True)  # gradients must flow even if every weight is frozen
            logits = model(x)
            store[layer].retain_grad()
            if classes is None:
                classes = logits.argmax(1)
            model.zero_grad(set_to_none=True)
            logits.gather(1, classes.view(-1, 1)).sum().backward()
            a, g = store[layer].detach(), store[layer].grad.detach()
    finally:
        model.zero_grad(set_to_none=True)
    cam = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return cam / peak
