"""Teach a BackdoorBench checkout the ``rof`` data set at run time, without editing it.

BackdoorBench's scripts find a data set through four functions of
``utils/aggregate_block/dataset_and_transform_generate.py``: ``get_num_classes``,
``get_input_shape``, ``get_dataset_normalization`` (used by ``get_transform``) and
``dataset_and_transform_generate``. :func:`install` wraps them so that ``rof``
is served from ``<dataset_path>`` in ROF's layout (``pgbd_defense/rof.py``) and
every other name goes to the benchmark's own code. Scripts bind these names when
they are imported, so the wrap must come first: run any of the benchmark's
defense scripts through the launcher

    python -m pgbd_defense.bench.rof_support ./defense/ft.py --result_file rof-sunglasses_0_1 \\
        --yaml_path ./config/defense/ft/cifar10.yaml --dataset rof --dataset_path ./data/ROF

(from the checkout root). PGBD's own launcher installs it by itself.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from pathlib import Path
from typing import List, Optional

from ..datasets import INFO, load_split

NAME = "rof"
MODULE = "utils.aggregate_block.dataset_and_transform_generate"


class PILSplit:
    """A split served as the benchmark's data sets are: (PIL image, label) items."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return Image.fromarray(self.images[i].permute(1, 2, 0).numpy(), mode="RGB"), int(self.labels[i])


def install() -> bool:
    """Wrap the checkout's data set functions (on sys.path) once; returns False when the
    checkout has no such module."""
    try:
        mod = importlib.import_module(MODULE)
    except ImportError:
        return False
    if getattr(mod, "_pgbd_rof", False):
        return True
    info = INFO[NAME]
    originals = {n: getattr(mod, n) for n in ("get_num_classes", "get_input_shape", "dataset_and_transform_generate")
                 if hasattr(mod, n)}

    def get_num_classes(dataset_name, *a, **k):
        return info.num_classes if dataset_name == NAME else originals["get_num_classes"](dataset_name, *a, **k)

    def get_input_shape(dataset_name, *a, **k):
        return info.size if dataset_name == NAME else originals["get_input_shape"](dataset_name, *a, **k)

    def dataset_and_transform_generate(args, *a, **k):
        if getattr(args, "dataset", None) != NAME:
            return originals["dataset_and_transform_generate"](args, *a, **k)
        root = getattr(args, "dataset_path", None)
        h, w = info.size[:2]
        train, test = (load_split(NAME, root, train=flag) for flag in (True, False))
        make = getattr(mod, "get_transform", None)
        train_t = make(NAME, h, w, train=True) if make else _transform(True)
        test_t = make(NAME, h, w, train=False) if make else _transform(False)
        return PILSplit(train.images, train.labels), train_t, None, PILSplit(test.images, test.labels), test_t, None

    mod.get_num_classes = get_num_classes
    mod.get_input_shape = get_input_shape
    mod.dataset_and_transform_generate = dataset_and_transform_generate
    if hasattr(mod, "get_dataset_normalization"):
        original_norm = mod.get_dataset_normalization

        def get_dataset_normalization(dataset_name, *a, **k):
            if dataset_name == NAME:
                import torchvision.transforms as T

                return T.Normalize(list(info.mean), list(info.std))
            return original_norm(dataset_name, *a, **k)

        mod.get_dataset_normalization = get_dataset_normalization
    mod._pgbd_rof = True
    return True


def _transform(train: bool):
    import torchvision.transforms as T

    info = INFO[NAME]
    steps = [T.Resize(info.size[:2])] + ([T.RandomHorizontalFlip()] if train else [])
    return T.Compose(steps + [T.ToTensor(), T.Normalize(list(info.mean), list(info.std))])


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].endswith(".py"):
        print("usage: python -m pgbd_defense.bench.rof_support ./defense/<name>.py [its arguments]",
              file=sys.stderr)
        return 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"{script} not found (run from the BackdoorBench checkout root)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path.cwd()))
    if not install():
        print(f"{Path.cwd()} is not a BackdoorBench checkout ({MODULE} is missing)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
