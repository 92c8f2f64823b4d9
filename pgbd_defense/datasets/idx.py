"""MNIST-layout IDX files (Fashion-MNIST, MNIST), ``.gz`` or not: from ``--data-root`` or,
for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .base import DATASETS, DataError, DataNotFoundError, ImageSet

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

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
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    expected = int(np.prod(shape))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise DataError(f"{path} declares shape {shape} but holds {body.size} bytes")
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
