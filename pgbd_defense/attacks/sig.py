"""SIG (Barni et al., 2019), a clean-label attack: a horizontal sinusoid
x'[i, j] = x[i, j] + delta * sin(2 pi j f / W) is added to target-class training
images, whose labels stay correct; at test time any image carrying the signal is
pushed to the target. BackdoorBench's defaults: delta 40 (0-255 scale), f 6."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import ATTACKS, Attack


def sinusoid(width: int, delta: float, frequency: float) -> torch.Tensor:
    j = torch.arange(width, dtype=torch.float32)
    return delta * torch.sin(2 * math.pi * j * frequency / width)


@ATTACKS.register("sig")
@dataclass
class SIG(Attack):
    delta: float = 40.0
    frequency: float = 6.0
    clean_label = True

    def __post_init__(self):
        if self.mode != "all2one":
            raise ConfigError("SIG is a clean-label attack on one target class: use label mode all2one")
        super().__post_init__()

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        signal = sinusoid(images.shape[-1], self.delta, self.frequency)
        return (images.float() + signal).round().clamp(0, 255).to(torch.uint8)
