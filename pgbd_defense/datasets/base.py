"""Clean data sets, held in memory as uint8 image tensors (N, C, H, W): the split type,
each data set's facts (classes, size, BackdoorBench's normalization) and the registry
the loaders (``idx.py``, ``cifar.py``, ``rof.py``) add themselves to.

Images stay uint8 in pixel space (attacks poison there, as BackdoorBench does);
normalization and augmentation happen per batch in :mod:`pgbd_defense.datasets.batches`.
Nothing is downloaded unless the caller asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ..errors import UserError
from ..util.registry import Registry

DATASETS: Registry = Registry("dataset")


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    size: Tuple[int, int, int]  # H, W, C as the model sees it
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    hflip: bool  # BackdoorBench flips horizontally for cifar10 only
    splits: Tuple[int, int] = (0, 0)  # train and test images of the public release (0: depends on the copy)


# Normalization constants are BackdoorBench's: a model trained there must be
# fine-tuned and evaluated with exactly these, or its clean accuracy drops.
INFO = {
    "cifar10": DatasetInfo(10, (32, 32, 3), (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261), True, (50000, 10000)),
    "cifar100": DatasetInfo(100, (32, 32, 3), (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), False,
                            (50000, 10000)),
    "gtsrb": DatasetInfo(43, (32, 32, 3), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), False, (39209, 12630)),
    "tiny": DatasetInfo(200, (64, 64, 3), (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262), False, (100000, 10000)),
    "mnist": DatasetInfo(10, (28, 28, 1), (0.5,), (0.5,), False, (60000, 10000)),
    "fashion-mnist": DatasetInfo(10, (28, 28, 1), (0.5,), (0.5,), False, (60000, 10000)),
    # ROF faces (rof.py): no benchmark normalization exists; images are scaled to [-1, 1].
    "rof": DatasetInfo(10, (64, 64, 3), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), True),
}


class DataNotFoundError(UserError, FileNotFoundError):
    """The data set is not where we looked; the message lists every place and the fix."""


class DataError(UserError, ValueError):
    """A data set file or name that cannot be read or used; the message names it."""


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
            raise ValueError(f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
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
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(sorted(INFO))}")
    return INFO[name]


def load_split(name: str, root: Optional[str], train: bool, download: bool = False,
               channels: Optional[int] = None) -> ImageSet:
    """Load one split of a registered data set, optionally served with ``channels`` channels."""
    loader: Callable = DATASETS.get(name)
    split = loader(root, train, download)
    return split.with_channels(channels) if channels else split
