"""Trojan-style patch attack with a *fixed* watermark.

TrojanNN (Liu et al., NDSS 2018) optimizes a watermark-shaped patch to excite
chosen neurons of a trained model before poisoning. That optimization is not
implemented here: this attack stamps a fixed watermark (a 7x7 square ring with a
centre dot, white) in the bottom-right corner, so it is a BadNets variant with a
larger, sparser patch, not TrojanNN."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ATTACKS, Attack


def watermark_mask(size: int = 7) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    mask[size // 2, size // 2] = True
    return mask


@ATTACKS.register("trojan")
@dataclass
class TrojanWatermark(Attack):
    size: int = 7
    margin: int = 1

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        h, w = images.shape[-2:]
        top, left = h - self.size - self.margin, w - self.size - self.margin
        region = out[..., top : top + self.size, left : left + self.size]
        region[..., watermark_mask(self.size)] = 255
        return out
