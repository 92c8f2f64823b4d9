"""GTSRB (German Traffic Sign Recognition Benchmark) from the layout BackdoorBench reads it
in (its ``dataset/GTSRB.py``, from the WaNet release), never downloaded:

    <root>/Train/<class, 5 digits>/GT-<class>.csv   ';'-separated: Filename;...;ClassId
    <root>/Train/<class, 5 digits>/*.ppm
    <root>/Test/GT-final_test.csv                    ';'-separated: Filename;...;ClassId
    <root>/Test/*.ppm

(the official ``Final_Training/Images`` folder is ``Train``, the test images with their
ground truth are ``Test``). ``<root>`` may also be the folder holding ``gtsrb/`` or
``GTSRB/``. Images are read in BackdoorBench's order (classes 0..42, each in its CSV's
order; the test CSV's order), so a record's indices mean the same samples, and resized to
32x32 RGB as its transform does.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from .base import DATASETS, DataError, DataNotFoundError, ImageSet

CLASSES = 43
SIZE = 32
LAYOUT = ("<root>/Train/<00000..00042>/GT-<class>.csv with the class's .ppm images, and <root>/Test/"
          "GT-final_test.csv with the test .ppm images (BackdoorBench's layout: the official Final_Training/"
          "Images as Train, the final test set and its ground truth as Test)")


def _root(root: Optional[str]) -> Path:
    if not root:
        raise DataNotFoundError(f"gtsrb needs --data-root; expected {LAYOUT}")
    tried = [Path(root), Path(root) / "gtsrb", Path(root) / "GTSRB"]
    for candidate in tried:
        if (candidate / "Train").is_dir() and (candidate / "Test").is_dir():
            return candidate
    raise DataNotFoundError(f"GTSRB not found in {', '.join(map(str, tried))}; expected {LAYOUT}. Fix: point "
                            "--data-root at it (it is never downloaded)")


def _rows(csv_path: Path) -> List[Tuple[str, int]]:
    if not csv_path.is_file():
        raise DataNotFoundError(f"{csv_path} not found; expected {LAYOUT}")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f, delimiter=";")
        next(reader, None)  # the header
        try:
            return [(row[0], int(row[7])) for row in reader if row]
        except (IndexError, ValueError) as e:
            raise DataError(f"{csv_path}: expected ';'-separated rows Filename;...;ClassId ({e})") from None


def listing(root: Path, train: bool) -> List[Tuple[Path, int]]:
    """(image path, label) in BackdoorBench's order."""
    if train:
        out = []
        for c in range(CLASSES):
            folder = root / "Train" / f"{c:05d}"
            out += [(folder / name, label) for name, label in _rows(folder / f"GT-{c:05d}.csv")]
        return out
    return [(root / "Test" / name, label) for name, label in _rows(root / "Test" / "GT-final_test.csv")]


def read_images(paths: List[Path], size: int) -> torch.Tensor:
    from PIL import Image

    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                images[i] = np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR)).transpose(2, 0, 1)
        except OSError as e:
            raise DataError(f"cannot read the image {path}: {e}") from None
    return torch.from_numpy(images)


@DATASETS.register("gtsrb")
def gtsrb(root: Optional[str], train: bool, download: bool = False) -> ImageSet:
    if download:
        raise DataNotFoundError(f"GTSRB is never downloaded by this package; expected {LAYOUT} under --data-root")
    items = listing(_root(root), train)
    bad = [label for _, label in items if not 0 <= label < CLASSES]
    if bad:
        raise DataError(f"GTSRB class ids must lie in 0..{CLASSES - 1}; found {sorted(set(bad))[:5]}")
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    return ImageSet(read_images([p for p, _ in items], SIZE), labels)
