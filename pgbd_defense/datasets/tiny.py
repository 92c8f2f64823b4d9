"""Tiny-ImageNet-200 from its public folder layout, never downloaded:

    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG
    <root>/tiny-imagenet-200/val/images/*.JPEG and val/val_annotations.txt (as released), or
    <root>/tiny-imagenet-200/val/<wnid>/*.JPEG (as BackdoorBench's loader rearranges it)

(``<root>`` may also be the ``tiny-imagenet-200`` folder itself). Classes are the wnids in
sorted order and images are listed as torchvision's ImageFolder lists them (BackdoorBench's
``dataset/Tiny.py`` is an ImageFolder), so a record's indices mean the same samples;
64x64 RGB (a few images are gray).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from .base import DATASETS, DataError, DataNotFoundError, ImageSet
from .gtsrb import read_images

SIZE = 64
SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's
LAYOUT = ("<root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG and val/ (images/ with val_annotations.txt, or "
          "one folder per wnid)")


def _root(root: Optional[str]) -> Path:
    if not root:
        raise DataNotFoundError(f"tiny needs --data-root; expected {LAYOUT}")
    tried = [Path(root) / "tiny-imagenet-200", Path(root), Path(root) / "tiny" / "tiny-imagenet-200"]
    for candidate in tried:
        if (candidate / "train").is_dir() and (candidate / "val").is_dir():
            return candidate
    raise DataNotFoundError(f"Tiny-ImageNet not found in {', '.join(map(str, tried))}; expected {LAYOUT}. Fix: "
                            "point --data-root at it (it is never downloaded)")


def _walk(folder: Path) -> List[Path]:
    """Image files under ``folder`` in ImageFolder's order (sorted walk, sorted names)."""
    out = []
    for here, _, names in sorted(os.walk(folder, followlinks=True)):
        out += [Path(here) / n for n in sorted(names) if n.lower().endswith(SUFFIXES)]
    return out


def listing(root: Path, train: bool) -> List[Tuple[Path, int]]:
    classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
    if not classes:
        raise DataNotFoundError(f"{root / 'train'} holds no class folders; expected {LAYOUT}")
    index = {wnid: i for i, wnid in enumerate(classes)}
    if train:
        return [(p, index[wnid]) for wnid in classes for p in _walk(root / "train" / wnid)]
    val = root / "val"
    annotations = val / "val_annotations.txt"
    if annotations.is_file():  # as released: one folder of images and a table of their wnids
        by_class = {}
        for line in annotations.read_text().splitlines():
            parts = line.split()
            if len(parts) < 2:
                continue
            if parts[1] not in index:
                raise DataError(f"{annotations}: wnid {parts[1]} is not a training class")
            by_class.setdefault(parts[1], []).append(val / "images" / parts[0])
        return [(p, index[w]) for w in sorted(by_class) for p in sorted(by_class[w], key=lambda q: q.name)]
    return [(p, index[wnid]) for wnid in sorted(d.name for d in val.iterdir() if d.is_dir() and d.name in index)
            for p in _walk(val / wnid)]


@DATASETS.register("tiny")
def tiny(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    if download:
        raise DataNotFoundError(f"Tiny-ImageNet is never downloaded by this package; expected {LAYOUT}")
    items = listing(_root(root), train)
    if not items:
        raise DataNotFoundError(f"no images in the {'train' if train else 'val'} split; expected {LAYOUT}")
    return ImageSet(read_images([p for p, _ in items], SIZE), torch.tensor([y for _, y in items], dtype=torch.int64))
