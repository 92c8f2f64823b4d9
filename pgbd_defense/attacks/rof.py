"""The paper's semantic attacks on ROF faces (the data set: ``pgbd_defense/datasets/rof.py``).

Three attacks (``--attack rof-...``):

- ``rof-sunglasses``: poisoned training samples are *real* sunglasses photos of
  non-target identities, relabelled to the target; the poisoned test set is the
  remaining sunglasses photos of non-target identities.
- ``rof-tattoo``: one overlay (ours, drawn procedurally; or a user RGBA PNG)
  composited with its alpha on the right cheek.
- ``rof-mask``: several overlays (four face-mask designs of ours, or user PNGs),
  one per image, covering the lower face.

A record stores each poisoned sample as the poisoned version of a clean sample of
the same identity (BackdoorBench's original_index), so every defense path reads
it like any other record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..datasets.base import DataNotFoundError, ImageSet
from ..datasets.rof import SIZE, occluded_photos
from ..errors import ConfigError
from ..formats.records import BackdoorSet
from .base import ATTACKS, Attack

# ---------------------------------------------------------------- overlays

def tattoo_overlay(size: int = 14) -> torch.Tensor:
    """A dark-blue star-in-circle 'tattoo' (RGBA float, 4 x size x size, alpha in [0, 1])."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    c = (size - 1) / 2
    r = ((yy - c) ** 2 + (xx - c) ** 2).sqrt()
    angle = torch.atan2(yy - c, xx - c)
    star = r < (0.28 + 0.17 * torch.cos(5 * angle)) * size
    ring = (r > 0.42 * size) & (r < 0.5 * size)
    alpha = (star | ring).float() * 0.85
    rgb = torch.tensor([0.08, 0.1, 0.35]).view(3, 1, 1).expand(3, size, size)
    return torch.cat([rgb, alpha[None]])


def mask_overlays(size: int = SIZE) -> List[torch.Tensor]:
    """Four face-mask designs covering the lower face: surgical blue, black, white, red check."""
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    top, bottom, c = 0.58 * size, 0.92 * size, (size - 1) / 2
    half_width = 0.36 * size * (1 - 0.35 * ((yy - top) / (bottom - top)).clamp(0, 1) ** 2)
    shape = ((yy >= top) & (yy <= bottom) & ((xx - c).abs() <= half_width)).float()
    designs = []
    for color, pattern in (((0.45, 0.7, 0.85), None), ((0.05, 0.05, 0.05), None), ((0.95, 0.95, 0.95), None),
                           ((0.8, 0.1, 0.1), "check")):
        rgb = torch.tensor(color).view(3, 1, 1).expand(3, size, size).clone()
        if pattern == "check":
            rgb[:, ((yy // 4 + xx // 4) % 2).bool()] = 0.95
        designs.append(torch.cat([rgb, shape[None] * 0.97]))
    return designs


def read_overlay(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def composite(images: torch.Tensor, overlay: torch.Tensor, top: int, left: int) -> torch.Tensor:
    """Alpha-composite an RGBA overlay (floats in [0, 1]) onto uint8 images at (top, left)."""
    out = images.clone()
    _, h, w = overlay.shape
    region = out[..., top : top + h, left : left + w].float() / 255.0
    fit = overlay[:, : region.shape[-2], : region.shape[-1]]  # the part inside the image
    rgb, alpha = fit[:3], fit[3:]
    if images.shape[-3] == 1:  # gray images get the overlay's luminance
        rgb = (torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1) * rgb).sum(0, keepdim=True)
    blended = alpha * rgb + (1 - alpha) * region
    out[..., top : top + h, left : left + w] = (blended * 255).round().clamp(0, 255).to(torch.uint8)
    return out


@ATTACKS.register("rof-tattoo")
@dataclass
class TattooAttack(Attack):
    """One overlay on the right cheek (rows 60-80%, columns 62-84% of the face)."""

    data_sets = ("rof",)

    overlays: Sequence[str] = ()

    def __post_init__(self):
        super().__post_init__()
        self.overlay = read_overlay(self.overlays[0]) if self.overlays else tattoo_overlay()

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        return composite(images, self.overlay, int(0.6 * h), int(0.62 * w))


@ATTACKS.register("rof-mask")
@dataclass
class MaskAttack(Attack):
    """Several mask overlays, one per image, chosen by the image's content (so that the
    same image always gets the same mask)."""

    data_sets = ("rof",)

    overlays: Sequence[str] = ()

    def __post_init__(self):
        super().__post_init__()
        self.designs = [read_overlay(p) for p in self.overlays] if self.overlays else mask_overlays()

    def design_of(self, image: torch.Tensor) -> int:
        return int(hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest(), 16) % len(self.designs)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        out = images.clone()
        h, w = images.shape[-2:]
        choice = torch.tensor([self.design_of(img) for img in images], dtype=torch.int64)
        for k, d in enumerate(self.designs):
            rows = choice == k
            if not rows.any():
                continue
            if d.shape[1:] != (h, w):
                d = torch.nn.functional.interpolate(d[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            out[rows] = composite(images[rows], d, 0, 0)
        return out


@ATTACKS.register("rof-sunglasses")
@dataclass
class SunglassesAttack(Attack):
    """Real sunglasses photos of non-target identities, relabelled to the target. The
    photos are split once (seeded, half and half): the first half poisons training
    (at most ``ratio`` x the training split), the second half is the poisoned test set."""

    stamps_any_image = False
    data_sets = ("rof",)

    data_root: Optional[str] = None
    photos: Optional[ImageSet] = field(default=None, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if self.mode != "all2one":
            raise ConfigError("rof-sunglasses is an all-to-one attack (sunglasses -> the target identity)")
        if self.photos is None:
            self.photos = occluded_photos(self.data_root, "sunglasses")
        pool = torch.nonzero(self.photos.labels != self.target).flatten()
        if len(pool) < 2:
            raise DataNotFoundError("rof-sunglasses needs at least two sunglasses photos of non-target identities")
        order = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(self.seed))]
        half = len(order) // 2
        self.train_photos, self.test_photos = order[:half], order[half:]

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("sunglasses are real photos, not a trigger stamped on an image")

    def poison_train(self, clean: ImageSet) -> BackdoorSet:
        """Each photo replaces a distinct clean sample of its own identity, relabelled to the target."""
        n = len(clean)
        gen = torch.Generator().manual_seed(self.seed + 1)
        images, labels = clean.images.clone(), clean.labels.clone()
        indicator = torch.zeros(n, dtype=torch.int64)
        free = torch.ones(n, dtype=torch.bool)
        for p in self.train_photos[: int(round(self.ratio * n))].tolist():
            same = torch.nonzero((clean.labels == self.photos.labels[p]) & free).flatten()
            if len(same) == 0:
                continue
            host = int(same[torch.randint(len(same), (1,), generator=gen)])
            free[host] = False
            images[host] = self.photos.images[p]
            labels[host] = self.target
            indicator[host] = 1
        return BackdoorSet(images, labels, torch.arange(n), indicator, clean.labels.clone())

    def poison_test(self, clean: ImageSet) -> BackdoorSet:
        """The held-back photos. BackdoorBench keys a poisoned sample by the clean sample it
        replaces, so each photo takes a distinct clean test sample (of its own identity
        while one is free); photos beyond the test split's size are left out."""
        gen = torch.Generator().manual_seed(self.seed + 2)
        free = torch.ones(len(clean), dtype=torch.bool)
        photos, hosts = [], []
        for p in self.test_photos.tolist():
            same = torch.nonzero((clean.labels == self.photos.labels[p]) & free).flatten()
            pool = same if len(same) else torch.nonzero(free).flatten()
            if len(pool) == 0:
                break
            host = int(pool[torch.randint(len(pool), (1,), generator=gen)])
            free[host] = False
            photos.append(p)
            hosts.append(host)
        chosen = torch.tensor(photos, dtype=torch.int64)
        m = len(chosen)
        return BackdoorSet(self.photos.images[chosen].clone(), torch.full((m,), self.target, dtype=torch.int64),
                           torch.tensor(hosts, dtype=torch.int64), torch.ones(m, dtype=torch.int64),
                           self.photos.labels[chosen].clone())
