"""ROF ("Real-world Occluded Faces") as a data set; the paper's semantic attacks on it
are in ``pgbd_defense/attacks/rof.py``.

Layout under ``--data-root`` (the public ROF release; put it there by hand, it is
not downloadable here):

    <root>/neutral/<identity>/*.jpg       faces without occlusion (the clean data)
    <root>/sunglasses/<identity>/*.jpg    the same identities wearing sunglasses (real photos)

As in the paper, the 10 identities with the most neutral images are kept (ties
broken by name), labelled 0..9 in name order, resized to 64x64 RGB, and split
90/10 per identity with a fixed seed.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import DATASETS, DataNotFoundError, ImageSet

SIZE = 64
IDENTITIES = 10
TEST_SHARE = 0.1
SPLIT_SEED = 0
SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

LAYOUT_HELP = ("expected <root>/neutral/<identity>/*.jpg (and <root>/sunglasses/<identity>/*.jpg for the "
               "sunglasses attack): download the ROF data set and give its folder as --data-root")


def _images_of(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES) if folder.is_dir() else []


def _root(root: Optional[str]) -> Path:
    if not root:
        raise DataNotFoundError(f"rof needs --data-root; {LAYOUT_HELP}")
    path = Path(root).expanduser()
    if not (path / "neutral").is_dir():
        raise DataNotFoundError(f"{path / 'neutral'} not found; {LAYOUT_HELP}")
    return path


def chosen_identities(root: Path, count: int = IDENTITIES) -> List[str]:
    """The ``count`` identities with the most neutral images, in name order (their labels)."""
    sizes = {d.name: len(_images_of(d)) for d in (root / "neutral").iterdir() if d.is_dir()}
    sizes = {k: v for k, v in sizes.items() if v > 0}
    if len(sizes) < count:
        raise DataNotFoundError(f"{root / 'neutral'} has {len(sizes)} identities with images; {count} are needed")
    top = sorted(sizes, key=lambda k: (-sizes[k], k))[:count]
    return sorted(top)


def read_face(path: Path, size: int = SIZE) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)


@lru_cache(maxsize=4)
def _load(root: str, kind: str, identities: Tuple[str, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(identities):
        for p in _images_of(Path(root) / kind / name):
            images.append(read_face(p))
            labels.append(label)
    if not images:
        return torch.zeros(0, 3, SIZE, SIZE, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.from_numpy(np.stack(images)).contiguous(), torch.tensor(labels, dtype=torch.int64)


def split_positions(labels: torch.Tensor, share: float = TEST_SHARE, seed: int = SPLIT_SEED):
    """(train, test) positions, ``share`` of each identity (at least one) held out for testing."""
    gen = torch.Generator().manual_seed(seed)
    test = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test.append(idx[: max(1, int(round(share * len(idx))))])
    test_idx = torch.cat(test).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test_idx] = False
    return torch.nonzero(keep).flatten(), test_idx


@DATASETS.register("rof")
def rof(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    if download:
        raise DataNotFoundError(f"ROF cannot be downloaded by this package; {LAYOUT_HELP}")
    path = _root(root)
    images, labels = _load(str(path), "neutral", tuple(chosen_identities(path)))
    tr, te = split_positions(labels)
    pick = tr if train else te
    return ImageSet(images[pick], labels[pick])


def occluded_photos(root: Optional[str], kind: str = "sunglasses") -> ImageSet:
    """The chosen identities' occluded photos (labels as in the clean data)."""
    path = _root(root)
    images, labels = _load(str(path), kind, tuple(chosen_identities(path)))
    if len(labels) == 0:
        raise DataNotFoundError(f"no photos under {path / kind}/<identity>/; {LAYOUT_HELP}")
    return ImageSet(images, labels)
