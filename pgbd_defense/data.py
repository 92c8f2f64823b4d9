"""Clean data sets, held in memory as uint8 image tensors (N, C, H, W).

Images stay uint8 in pixel space (attacks poison there, as BackdoorBench does);
normalization and augmentation happen per batch in :mod:`pgbd_defense.batches`.
Nothing is downloaded unless the caller asks for it.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .registry import Registry

DATASETS: Registry = Registry("dataset")

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    size: Tuple[int, int, int]  # H, W, C as the model sees it
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    hflip: bool  # BackdoorBench flips horizontally for cifar10 only


# Normalization constants are BackdoorBench's: a model trained there must be
# fine-tuned and evaluated with exactly these, or its clean accuracy drops.
INFO = {
    "cifar10": DatasetInfo(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True),
    "cifar100": DatasetInfo(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False),
    "gtsrb": DatasetInfo(43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False),
    "tiny": DatasetInfo(200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False),
    "mnist": DatasetInfo(10, (28, 28, 1), (0.5,), (0.5,), False),
    "fashion-mnist": DatasetInfo(10, (28, 28, 1), (0.5,), (0.5,), False),
    # ROF faces (rof.py): no benchmark normalization exists; images are scaled to [-1, 1].
    "rof": DatasetInfo(10, (64, 64, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True),
}


class DataNotFoundError(FileNotFoundError):
    """The data set is not where we looked; the message lists every place and the fix."""


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W) and integer labels of one clean split."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        """BackdoorBench's 5-tuple for a clean sample: (image, label, index, 0, label)."""
        label = int(self.labels[i])
        return self.images[i], label, int(i), 0, label

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def with_channels(self, channels: int) -> "ImageSet":
        """Serve gray images as 3 identical channels (how BackdoorBench feeds MNIST to its zoo)."""
        have = self.images.shape[1]
        if have == channels:
            return self
        if have == 1:
            return ImageSet(self.images.expand(-1, channels, -1, -1).contiguous(), self.labels)
        raise ValueError(f"cannot turn {have}-channel images into {channels} channels")


def dataset_info(name: str) -> DatasetInfo:
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(INFO))}")
    return INFO[name]


# ---------------------------------------------------------------- IDX (MNIST-style)

_IDX_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"{path} declares shape {shape} but holds {body.size} bytes")
    return body.reshape(shape)


def _idx_candidates(name: str, root: Optional[str]) -> List[Path]:
    dirs: List[Path] = []
    if root:
        r = Path(root)
        folder = "FashionMNIST" if name == "fashion-mnist" else "MNIST"
        dirs += [r, r / name, r / name / folder / "raw", r / folder / "raw", r / "raw"]
    if name == "fashion-mnist":
        dirs.append(Path(os.environ.get("PGBD_FASHION_MNIST", DEBIAN_FASHION_MNIST)))
    return dirs


def _find_idx(dirs: Sequence[Path], stem: str) -> Optional[Path]:
    for d in dirs:
        for suffix in ("", ".gz"):
            p = d / (stem + suffix)
            if p.is_file():
                return p
    return None


def _load_idx_dataset(name: str, root: Optional[str], train: bool, download: bool) -> ImageSet:
    dirs = _idx_candidates(name, root)
    img_stem, lbl_stem = _IDX_FILES[train]
    img_path, lbl_path = _find_idx(dirs, img_stem), _find_idx(dirs, lbl_stem)
    if img_path is None or lbl_path is None:
        hint = (
            "install Debian's package (apt-get install dataset-fashion-mnist) or pass --data-root "
            "with the four IDX files"
            if name == "fashion-mnist"
            else "pass --data-root with the four IDX files (train/t10k images/labels, .gz or not)"
        )
        raise DataNotFoundError(
            f"{name} {'train' if train else 'test'} split not found; looked for {img_stem}[.gz] and "
            f"{lbl_stem}[.gz] in: {', '.join(str(d) for d in dirs) or '(no --data-root given)'}. Fix: {hint}."
        )
    images = torch.from_numpy(read_idx(img_path).copy()).unsqueeze(1)
    labels = torch.from_numpy(read_idx(lbl_path).astype(np.int64))
    return ImageSet(images, labels)


@DATASETS.register("fashion-mnist")
def fashion_mnist(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    return _load_idx_dataset("fashion-mnist", root, train, download)


@DATASETS.register("mnist")
def mnist(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    return _load_idx_dataset("mnist", root, train, download)


# ---------------------------------------------------------------- torchvision CIFAR


def _torchvision_cifar(cls_name: str, name: str, root: Optional[str], train: bool, download: bool) -> ImageSet:
    import torchvision

    if not root:
        raise DataNotFoundError(f"{name} needs --data-root (a folder holding torchvision's {name} files, or "
                                "an empty folder together with --download)")
    cls = getattr(torchvision.datasets, cls_name)
    tried = [Path(root), Path(root) / name]
    for candidate in tried:
        try:
            ds = cls(str(candidate), train=train, download=False)
            break
        except RuntimeError:
            continue
    else:
        if not download:
            raise DataNotFoundError(
                f"{name} not found in {', '.join(map(str, tried))} (torchvision's layout, e.g. "
                f"cifar-10-batches-py/). Fix: point --data-root at it, or add --download to fetch it there."
            )
        ds = cls(str(tried[0]), train=train, download=True)
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.as_tensor(ds.targets, dtype=torch.int64))


@DATASETS.register("cifar10")
def cifar10(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    return _torchvision_cifar("CIFAR10", "cifar10", root, train, download)


@DATASETS.register("cifar100")
def cifar100(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    return _torchvision_cifar("CIFAR100", "cifar100", root, train, download)


def load_split(name: str, root: Optional[str], train: bool, download: bool = False,
               channels: Optional[int] = None) -> ImageSet:
    """Load one split of a registered data set, optionally served with ``channels`` channels."""
    if name == "rof":
        from . import rof  # noqa: F401  (registers the data set; kept apart, it needs the attacks)
    loader: Callable = DATASETS.get(name)
    split = loader(root, train, download)
    return split.with_channels(channels) if channels else split
