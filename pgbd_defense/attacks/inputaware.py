"""Input-aware dynamic backdoor (IAB): Nguyen & Tran, "Input-Aware Dynamic Backdoor Attack",
NeurIPS 2020 (https://arxiv.org/abs/2010.08138).

Every input gets its own trigger: a generator network G maps the image to a pattern and a
second network M to a mask, and the poisoned image is ``x + (G(x) - x) * M(x)``. Training
has two stages (the layout, losses and defaults are the facts of BackdoorBench's
``attack/inputaware.py`` and ``config/attack/inputaware/default.yaml``):

1. M alone, ``mask_epochs`` epochs (BackdoorBench's ``clean_train_epochs``, 25): the masks
   of two images must differ as much as the images do (the *diversity* loss
   ``mean(||x1 - x2|| / ||m1 - m2||)``, RMS distances) and cover at most ``mask_density``
   of the pixels (``lambda_norm * mean(relu(m - density))``). M is frozen afterwards.
2. The classifier C and G together: in every batch a share ``ratio`` of the samples carry
   their own trigger and the attack label, as many again (``cross_ratio``) carry *another*
   image's trigger and keep their true label (the cross-trigger mode: a trigger only works
   on the image it was made for), the rest stay clean; the loss is C's cross-entropy plus
   the diversity loss on G's patterns.

After training G and M are fixed, so :meth:`apply_trigger` is a per-image function like any
other attack's: the record's poisoned train and test splits are materialized with it.

What differs from BackdoorBench (``docs/attacks.md``): the per-batch counts are spread so the
epoch holds exactly ``ratio`` of the samples (BackdoorBench: ``int(ratio * batch)`` per
batch, or one sample with that probability below one per batch); a cross sample's partner
image comes from a second shuffled pass over the same training images (BackdoorBench: a
second data loader, likewise); C follows our attacks' cosine schedule (BackdoorBench: steps
at epoch 100, 200, ... that a CPU run never reaches); the record lists the backdoor samples
only (BackdoorBench also marks the cross samples, whose labels are their true ones).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.batches import Normalizer, batch_indices, random_crop_flip
from ..util.hooks import mixed_precision
from ..util.progress import progress
from .base import ATTACKS, Attack

log = logging.getLogger(__name__)

EPSILON = 1e-7


def conv_block(c_in: int, c_out: int, relu: bool = True) -> nn.Sequential:
    """3x3 convolution, batch norm (momentum 0.05) and ReLU: the generators' building block."""
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out, momentum=0.05)]
    return nn.Sequential(*layers, *([nn.ReLU()] if relu else []))


class TriggerNet(nn.Module):
    """Encoder-decoder from an image (normalized, (N, C, H, W)) to a pattern in [0, 1]
    ((N, ``out_channels``, H, W)): ``steps`` times two blocks and a 2x max-pool (channels
    ``base``, 2 ``base``, ...), a middle block, then ``steps`` times a 2x bilinear upsampling
    and two blocks halving the channels, the last without ReLU; ``tanh / 2 + 0.5`` on top.
    BackdoorBench uses 2 steps from 16 channels for MNIST and 3 from 32 otherwise; here the
    image side decides (a side not divisible by 8, as 28, cannot take 3 poolings).

    >>> TriggerNet(1, 1, 28)(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 1, 28, 28])
    """

    def __init__(self, in_channels: int, out_channels: int, side: int):
        super().__init__()
        steps, base = (3, 32) if side % 8 == 0 else (2, 16)
        layers = []
        current, nxt = in_channels, base
        for step in range(steps):
            layers += [conv_block(current, nxt), conv_block(nxt, nxt), nn.MaxPool2d(2)]
            if step < steps - 1:
                current, nxt = nxt, nxt * 2
        layers.append(conv_block(nxt, nxt))
        current, nxt = nxt, nxt // 2
        for step in range(steps):
            last = step == steps - 1
            layers += [nn.Upsample(scale_factor=2, mode="bilinear"), conv_block(current, current),
                       conv_block(current, nxt, relu=not last)]
            current, nxt = nxt, nxt // 2
            if step == steps - 2:
                nxt = out_channels
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.body(x)) / (2 + EPSILON) + 0.5


def threshold(m: torch.Tensor) -> torch.Tensor:
    """Push a mask in [0, 1] towards 0 or 1 (a steep tanh around 0.5), keeping it differentiable."""
    return torch.tanh(m * 20 - 10) / (2 + EPSILON) + 0.5


def rms_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean squared difference of two (N, ...) batches -> (N,). The square root
    of zero has an infinite slope: an image paired with itself (the partners are drawn at random)
    gets the same pattern twice and would put NaN into G's gradient, hence the 1e-12 under it."""
    return (a - b).pow(2).flatten(1).mean(1).add(1e-12).sqrt()


def diversity_loss(x1: torch.Tensor, x2: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``||x1 - x2|| / ||p1 - p2||`` (RMS): small when two images' triggers
    differ as much as the images; zero for no pairs."""
    if len(x1) == 0:
        return torch.zeros((), device=x1.device)
    return (rms_distance(x1, x2) / (rms_distance(p1, p2) + EPSILON)).mean()


def mask_norm_loss(masks: torch.Tensor, density: float) -> torch.Tensor:
    """Mean of ``relu(mask - density)``: the mask's excess over its allowed pixel share."""
    return F.relu(masks - density).mean()


def spread_counts(batch_sizes, share: float) -> list:
    """Per-batch counts summing to round(``share`` x total), spread evenly over the batches
    (the count before each batch's end is round(share x samples so far)).

    >>> spread_counts([128] * 4, 0.01)
    [1, 2, 1, 1]
    """
    counts, seen, given = [], 0, 0
    for size in batch_sizes:
        seen += size
        due = min(int(math.floor(share * seen + 0.5)), seen)
        counts.append(min(due - given, size))
        given += counts[-1]
    return counts


@ATTACKS.register("inputaware")
@dataclass
class InputAware(Attack):
    """IAB. ``ratio``: the share of each epoch's samples that carry their own trigger (and of
    the record's training split); the other arguments are BackdoorBench's YAML defaults."""

    mask_epochs: int = 25
    cross_ratio: float = 1.0
    mask_density: float = 0.032
    lambda_div: float = 1.0
    lambda_norm: float = 100.0
    lr_generator: float = 0.01
    lr_mask: float = 0.01
    channels: int = 1
    side: int = 28

    # The trigger exists only after training with the classifier (record.py calls train_with_classifier).
    trains_with_classifier = True

    def __post_init__(self):
        super().__post_init__()
        if self.mask_epochs < 0 or self.cross_ratio < 0 or not 0 < self.mask_density < 1:
            raise ValueError(f"inputaware: mask_epochs={self.mask_epochs}, cross_ratio={self.cross_ratio} must be "
                             f">= 0 and mask_density={self.mask_density} in (0, 1)")
        # Seeded initialization: an untrained attack is still a fixed function of the image.
        with torch.random.fork_rng():
            torch.manual_seed(self.seed + 31)
            self.generator = TriggerNet(self.channels, self.channels, self.side).eval()
            self.masker = TriggerNet(self.channels, 1, self.side).eval()
        self.normalize: Optional[Normalizer] = None  # the data set's, set by train_with_classifier

    # ------------------------------------------------------------------ the trigger

    def stamp(self, x: torch.Tensor, source: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              generator: Optional[nn.Module] = None):
        """``x`` (normalized) carrying the trigger made from ``source`` (normalized, same length):
        ``x + (G(source) - x) * M(source)`` in normalized space (as the pixels: the map is affine),
        and G's pattern (normalized). Empty inputs come back unchanged (batch norm needs a sample)."""
        if len(x) == 0:
            return x, x
        pattern = ((generator or self.generator)(source) - mean) / std
        return x + (pattern - x) * threshold(self.masker(source)), pattern

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        c = images.shape[1]
        norm = self.normalize or Normalizer([0.5] * c, [0.5] * c, c)
        device = next(self.generator.parameters()).device
        mean, std = norm.mean.to(device), norm.std.to(device)
        self.generator.eval()
        self.masker.eval()
        out = [images[:0].clone()]
        with torch.no_grad():
            for start in range(0, len(images), 256):
                x = norm(images[start:start + 256].to(device))
                pixels = self.stamp(x, x, mean, std)[0] * std + mean
                out.append((pixels * 255).round().clamp(0, 255).to(torch.uint8).cpu())
        return torch.cat(out)

    def trigger_state(self) -> Dict[str, object]:
        """What the record keeps to re-make the trigger: both networks' weights."""
        return {"inputaware_generator": {k: v.cpu() for k, v in self.generator.state_dict().items()},
                "inputaware_mask": {k: v.cpu() for k, v in self.masker.state_dict().items()}}

    # ------------------------------------------------------------------ training

    def train_mask(self, images: torch.Tensor, normalize: Normalizer, batch_size: int,
                   generator: torch.Generator, device: str = "cpu") -> Dict[str, float]:
        """Stage 1: M alone on pairs of batches (norm + diversity); returns the last epoch's means."""
        masker = self.masker.to(device).train()
        opt = torch.optim.Adam(masker.parameters(), lr=self.lr_mask, betas=(0.5, 0.9))
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [10, 20], 0.1)
        stats = {"mask_norm": float("nan"), "mask_diversity": float("nan"), "mask_share": float("nan")}
        for epoch in range(self.mask_epochs):
            sums = torch.zeros(3)
            # two shuffled passes of the same batch sizes: each batch paired with another
            batches = zip(batch_indices(len(images), batch_size, True, generator),
                          batch_indices(len(images), batch_size, True, generator))
            count = 0
            for idx1, idx2 in progress(batches, total=math.ceil(len(images) / batch_size),
                                       desc=f"inputaware mask {epoch + 1}/{self.mask_epochs}"):
                x1, x2 = normalize(images[idx1].to(device)), normalize(images[idx2].to(device))
                m1, m2 = threshold(masker(x1)), threshold(masker(x2))
                norm_loss = mask_norm_loss(m1, self.mask_density)
                div_loss = diversity_loss(x1, x2, m1, m2)
                loss = self.lambda_norm * norm_loss + self.lambda_div * div_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums += torch.tensor([norm_loss.item(), div_loss.item(), (m1 > 0.5).float().mean().item()])
                count += 1
            sched.step()
            stats = dict(zip(stats, (sums / max(count, 1)).tolist()))
            log.info("inputaware mask epoch %d: norm %.4f, diversity %.3f, share of pixels masked %.4f",
                     epoch + 1, *stats.values())
        masker.eval().requires_grad_(False)
        return stats

    def training_batch(self, x: torch.Tensor, y: torch.Tensor, other: torch.Tensor, nb: int, mean: torch.Tensor,
                       std: torch.Tensor, generator: nn.Module):
        """One batch of stage 2: the first ``nb`` samples of ``x`` (normalized) carry their own
        trigger and the attack label, the next ``len(other)`` carry the trigger made from
        ``other`` (the partner images) and keep their label, the rest stay as they are.
        Returns the inputs, their labels and the diversity loss of the bd/partner pairs.

        G runs on the backdoor images and on the partners, as two batches (BackdoorBench's way):
        its batch norm sees 1-2 images a batch at 1% poisoning. Running it once on the whole batch
        (so that its statistics match the running averages it is applied with later) was tried
        and implanted worse at 10% (ASR 66.5% against 94.6%, 5 epochs, 2 threads; docs/attacks.md)."""
        nc = len(other)
        bd, pattern_bd = self.stamp(x[:nb], x[:nb], mean, std, generator)
        cross, pattern_other = self.stamp(x[nb:nb + nc], other, mean, std, generator)
        inputs = torch.cat([bd, cross, x[nb + nc:]])
        targets = torch.cat([self.mapping.to(y.device)[y[:nb]], y[nb:]])
        k = min(nb, nc)
        return inputs, targets, diversity_loss(x[:k], other[:k], pattern_bd[:k], pattern_other[:k])

    def train_with_classifier(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                              normalize: Normalizer, epochs: int, lr: float, batch_size: int,
                              weight_decay: float = 5e-4, augment: bool = False, hflip: bool = False,
                              seed: int = 0, device: str = "cpu", amp: bool = False) -> nn.Module:
        """Stage 1, then stage 2 on ``images`` (uint8) / ``labels``; leaves G and M trained and
        frozen and returns ``model`` (C) in eval mode."""
        self.normalize = normalize
        gen = torch.Generator().manual_seed(seed)
        mean, std = normalize.mean.to(device), normalize.std.to(device)
        self.train_mask(images, normalize, batch_size, gen, device)
        model.to(device).train()
        g = self.generator.to(device).train()
        opt_c = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        steps = epochs * math.ceil(len(labels) / batch_size)
        sched_c = torch.optim.lr_scheduler.CosineAnnealingLR(opt_c, T_max=max(steps, 1))
        opt_g = torch.optim.Adam(g.parameters(), lr=self.lr_generator, betas=(0.5, 0.9))
        for epoch in range(epochs):
            order = list(batch_indices(len(labels), batch_size, True, gen))
            partners = torch.randperm(len(labels), generator=gen)
            n_bd = spread_counts([len(i) for i in order], self.ratio)
            n_cross = spread_counts([len(i) for i in order], self.ratio * self.cross_ratio)
            used = 0
            sums, count = torch.zeros(2), 0
            hits = torch.zeros(4)  # backdoor samples sent to their attack label, of how many; cross kept, of how many
            for idx, nb, nc in progress(zip(order, n_bd, n_cross), total=len(order),
                                        desc=f"inputaware training {epoch + 1}/{epochs}"):
                nc = min(nc, len(idx) - nb)
                raw = random_crop_flip(images[idx], gen, hflip=hflip) if augment else images[idx]
                x, y = normalize(raw.to(device)), labels[idx].to(device)
                other = normalize(images[partners[used:used + nc]].to(device))
                used += nc
                with mixed_precision(amp, device):
                    inputs, targets, div = self.training_batch(x, y, other, nb, mean, std, g)
                    logits = model(inputs)
                    ce = F.cross_entropy(logits, targets)
                    loss = ce + self.lambda_div * div
                right = (logits.detach().argmax(1) == targets).float()
                hits += torch.tensor([right[:nb].sum().item(), nb, right[nb:nb + nc].sum().item(), nc])
                opt_c.zero_grad(set_to_none=True)
                opt_g.zero_grad(set_to_none=True)
                loss.backward()
                opt_c.step()
                opt_g.step()
                sched_c.step()
                sums += torch.tensor([ce.item(), div.item()])
                count += 1
            log.info("inputaware epoch %d: cross-entropy %.4f, diversity %.3f; training ASR %.4f (backdoor samples), "
                     "cross accuracy %.4f", epoch + 1, *(sums / max(count, 1)).tolist(),
                     hits[0] / max(hits[1], 1), hits[2] / max(hits[3], 1))
        g.eval().requires_grad_(False)
        self.generator, self.masker = g.cpu(), self.masker.cpu()
        return model.eval()
