"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible smooth warp of the image.

A random k x k field of 2-D offsets, normalized to mean absolute value 1 and
upsampled bicubically to the image size, scaled by s / H, is added to the
identity sampling grid; poisoned inputs are resampled through it. BackdoorBench's
defaults: k 4, s 0.5, and "noise mode": cross_ratio x (number poisoned) further
training samples are warped through the same grid plus random jitter while keeping
their labels, so the network learns that only the exact warp is the trigger.
(The noise samples shape training only; like BackdoorBench's record, ours lists
the poisoned samples.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import ATTACKS, Attack


def identity_grid(height: int, width: int) -> torch.Tensor:
    ys = torch.linspace(-1, 1, height)
    xs = torch.linspace(-1, 1, width)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)  # (1, H, W, 2), x first as grid_sample expects


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Resample uint8 images through ``grid`` (N or 1, H, W, 2) with bilinear interpolation."""
    grid = grid.expand(len(images), -1, -1, -1) if grid.shape[0] == 1 else grid
    out = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=True)
    return out.round().clamp(0, 255).to(torch.uint8)


@ATTACKS.register("wanet")
@dataclass
class WaNet(Attack):
    k: int = 4
    s: float = 0.5
    cross_ratio: float = 2.0
    grid_rescale: float = 1.0

    def grid(self, height: int, width: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + 7919)
        field = torch.rand(1, 2, self.k, self.k, generator=gen) * 2 - 1
        field = field / field.abs().mean()
        noise = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        return ((identity_grid(height, width) + self.s * noise / height) * self.grid_rescale).clamp(-1, 1)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        return warp(images, self.grid(*images.shape[-2:]))

    def training_set(self, bd_train):
        images, labels = bd_train.images.clone(), bd_train.labels
        clean_idx = (bd_train.poison_indicator == 0).nonzero().flatten()
        n_noise = min(int(round(self.cross_ratio * int(bd_train.poison_indicator.sum()))), len(clean_idx))
        gen = torch.Generator().manual_seed(self.seed + 104729)
        chosen = clean_idx[torch.randperm(len(clean_idx), generator=gen)[:n_noise]]
        h, w = images.shape[-2:]
        jitter = (torch.rand(n_noise, h, w, 2, generator=gen) * 2 - 1) / h
        grid = (self.grid(h, w) + jitter).clamp(-1, 1)
        images[chosen] = warp(images[chosen], grid)
        return images, labels
