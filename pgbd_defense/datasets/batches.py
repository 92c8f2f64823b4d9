"""Batches from in-memory uint8 images: normalization and BackdoorBench's train
augmentation (random crop with 4-pixel padding, optional horizontal flip) done on
whole batches, which is far faster on a CPU than per-image PIL transforms."""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Images per forward pass when only predictions are needed (test sets, held-out accuracy,
# activations). Measured on 2 cores (benchmarks/cost.py, results/cost.md): 128 runs
# PreAct-ResNet18 1.2x (width 0.125) to 1.4x (full width) faster than 512, whose
# activations overflow the caches. The logits are bit-identical at any batch size from
# 16 up (tests/test_metrics.py); below 16, as a pass's last partial batch may be at any
# size, oneDNN takes other kernels and logits move by ~1e-9 (as they did at 512).
EVAL_BATCH_SIZE = 128


class Normalizer:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1] then standardized per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels: int):
        if len(mean) == 1 and channels > 1:  # gray statistics served on replicated channels
            mean, std = list(mean) * channels, list(std) * channels
        if len(mean) != channels:
            raise ValueError(f"{len(mean)} normalization means for {channels}-channel images")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4,
                     hflip: bool = False) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, and an optional random flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    out = padded[batch, chan, rows, cols]
    if hflip:
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def batch_indices(n: int, batch_size: int, shuffle: bool,
                  generator: Optional[torch.Generator] = None) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def iterate(images: torch.Tensor, labels: torch.Tensor, batch_size: int, normalize: Normalizer,
            shuffle: bool = False, augment: bool = False, hflip: bool = False,
            generator: Optional[torch.Generator] = None,
            device: str = "cpu") -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(inputs, labels, indices)`` batches ready for the model."""
    if augment and generator is None:
        raise ValueError("augmentation needs a torch.Generator for reproducibility")
    for idx in batch_indices(len(labels), batch_size, shuffle, generator):
        x = images[idx]
        if augment:
            x = random_crop_flip(x, generator, hflip=hflip)
        yield normalize(x.to(device)), labels[idx].to(device), idx
