"""BadNets (Gu et al., 2017): a small white square stamped at the bottom-right
corner, as in BackdoorBench (3x3 pixels set to 255)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ATTACKS, Attack


@ATTACKS.register("badnet")
@dataclass
class BadNet(Attack):
    patch_size: int = 3

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        out[..., -self.patch_size:, -self.patch_size:] = 255
        return out
