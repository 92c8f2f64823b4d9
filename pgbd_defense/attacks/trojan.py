"""Trojan attack: a watermark-shaped patch, optimized TrojanNN-style or fixed.

TrojanNN (Liu et al., NDSS 2018) picks a neuron of a trained model that is
strongly connected to the output layer and optimizes the pixels inside a
watermark-shaped mask so that the neuron fires hard, then poisons with that
patch. With ``optimize`` (the default) this attack does the same on a reference
model the attacker trains on clean data (``prepare``): the neuron is the input
feature of the final linear layer with the largest summed |weight| to the
logits, and the patch (inside a 7x7 square ring with a centre dot, bottom-right)
is optimized with Adam to drive that feature's activation towards ``target_act``
(squared error). With ``optimize=False`` the patch is fixed white: a BadNets
variant with a larger, sparser patch, not TrojanNN."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..util.hooks import capture, frozen_weights, last_linear
from .base import ATTACKS, Attack

log = logging.getLogger(__name__)


def watermark_mask(size: int = 7) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    mask[size // 2, size // 2] = True
    return mask


def select_neuron(model: torch.nn.Module) -> int:
    """The input feature of the final linear layer with the largest summed |weight| to the logits."""
    return int(last_linear(model)[1].weight.detach().abs().sum(0).argmax())


@ATTACKS.register("trojan")
@dataclass
class TrojanWatermark(Attack):
    size: int = 7
    margin: int = 1
    optimize: bool = True
    steps: int = 300
    target_act: float = 100.0
    reference_images: int = 5000
    reference_epochs: int = 1

    def __post_init__(self):
        super().__post_init__()
        self.pattern: Optional[torch.Tensor] = None  # (C, size, size) uint8 once optimized
        self.neuron: Optional[int] = None

    def _region(self, h: int, w: int):
        top, left = h - self.size - self.margin, w - self.size - self.margin
        return slice(top, top + self.size), slice(left, left + self.size)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        rows, cols = self._region(*images.shape[-2:])
        mask = watermark_mask(self.size)
        region = out[..., rows, cols]
        if self.pattern is None:
            region[..., mask] = 255
        else:
            region[..., mask] = self.pattern.to(region.dtype)[..., mask]
        out[..., rows, cols] = region
        return out

    def prepare(self, clean: ImageSet, make_model: Callable[[], torch.nn.Module], normalize: Normalizer,
                train: Callable, device: str = "cpu") -> None:
        """Train a clean reference model, pick its neuron and optimize the patch for it."""
        if not self.optimize:
            log.info("trojan: optimization off, fixed white watermark")
            return
        gen = torch.Generator().manual_seed(self.seed + 23)
        pick = torch.randperm(len(clean), generator=gen)[: self.reference_images]
        reference = make_model().to(device)
        train(reference, clean.images[pick], clean.labels[pick], normalize, self.reference_epochs)
        self.optimize_pattern(reference, clean.images[pick[:256]], normalize, device)

    def optimize_pattern(self, model: torch.nn.Module, images: torch.Tensor, normalize: Normalizer,
                         device: str = "cpu") -> torch.Tensor:
        """Optimize the masked patch to excite the selected neuron of ``model`` and return it
        ((C, size, size) uint8); ``self.activation`` holds the neuron's mean activation on
        ``images`` with the optimized and with the fixed white patch."""
        model.eval()
        self.neuron = select_neuron(model)
        head = last_linear(model)[0]
        c, h, w = images.shape[1:]
        rows, cols = self._region(h, w)
        mask = torch.zeros(1, 1, h, w, device=device)
        mask[..., rows, cols] = watermark_mask(self.size).float().to(device)
        logit = torch.zeros(1, c, h, w, device=device, requires_grad=True)
        opt = torch.optim.Adam([logit], lr=0.1)
        x01 = images.to(device).float() / 255.0
        mean, std = normalize.mean.to(device), normalize.std.to(device)
        # the weights stay as they are: their gradients would add the weight-gradient half of every
        # backward pass for nothing
        with frozen_weights(model), capture(model, head, inputs=True) as store:
            for _ in range(self.steps):
                stamped = (1 - mask) * x01 + mask * torch.sigmoid(logit)
                model((stamped - mean) / std)
                loss = F.mse_loss(store[head][:, self.neuron], torch.full((len(x01),), self.target_act,
                                                                          device=device))
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.pattern = (torch.sigmoid(logit.detach())[0, :, rows, cols] * 255).round().to(torch.uint8).cpu()
            with torch.no_grad():
                acts = {}
                for name, pattern in (("fixed", None), ("optimized", self.pattern)):
                    self.pattern = pattern
                    model(normalize(self.apply_trigger(images).to(device)))
                    acts[name] = float(store[head][:, self.neuron].mean())
                self.pattern = pattern
        log.info("trojan: neuron %d of the last linear layer's input; mean activation %.2f with the optimized "
                 "patch vs %.2f with a white one", self.neuron, acts["optimized"], acts["fixed"])
        self.activation = acts
        return self.pattern
