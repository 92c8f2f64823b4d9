"""Blended (Chen et al., 2017): a fixed image blended into the input,
x' = (1 - alpha) x + alpha T, alpha 0.2 as in BackdoorBench.

BackdoorBench blends a photograph it ships; we generate our own pattern (seeded
uniform noise, the other common choice in the literature) unless the user gives
an image with ``trigger_image``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .base import ATTACKS, Attack


def load_trigger_image(path: str, height: int, width: int, channels: int) -> torch.Tensor:
    """A user's trigger image as uint8 (C, H, W), resized to the data's size."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((width, height), Image.BILINEAR)
            arr = np.asarray(im)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read trigger image {path!r}: {e}") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def noise_pattern(height: int, width: int, channels: int, seed: int = 1234) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), generator=gen, dtype=torch.uint8)


@ATTACKS.register("blended")
@dataclass
class Blended(Attack):
    alpha: float = 0.2
    trigger_image: str = ""

    def pattern(self, images: torch.Tensor) -> torch.Tensor:
        c, h, w = images.shape[1:]
        if self.trigger_image:
            return load_trigger_image(self.trigger_image, h, w, c)
        return noise_pattern(h, w, c)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        blended = (1 - self.alpha) * images.float() + self.alpha * self.pattern(images).float()
        return blended.round().clamp(0, 255).to(torch.uint8)
