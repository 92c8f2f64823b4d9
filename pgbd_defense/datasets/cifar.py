"""CIFAR-10 and CIFAR-100 through torchvision's readers, from ``--data-root`` (downloaded
only when the caller asks for it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .base import DATASETS, DataNotFoundError, ImageSet


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
