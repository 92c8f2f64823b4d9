"""PGBD as one of BackdoorBench's defenses.

After ``python -m pgbd_defense.install --bench-root B``, the checkout's
``defense/pgbd.py`` (a thin launcher) calls :func:`main`, so that

    python ./defense/pgbd.py --result_file badnet_0_1 \\
        --yaml_path ./config/defense/pgbd/cifar10.yaml --dataset cifar10

works from the checkout root like any built-in defense. The class follows the
benchmark's defense interface (``add_arguments``, ``set_result``, ``set_trainer``,
``set_logger``, ``mitigation``, ``defense``) and subclasses the checkout's own
``defense.base.defense``. The benchmark's own code supplies the clean data sets
(``dataset_and_transform_generate``, so GTSRB and Tiny-ImageNet load as the benchmark
loads them), the model class (``generate_cls_model``) and the normalization (its test
transform). The record itself is read with this package's restricted loader: the
benchmark's ``load_attack_result`` calls ``torch.load`` without ``weights_only=False``
and fails on torch >= 2.6, and unpickling an untrusted record can run code.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from ..datasets import ImageSet
from ..errors import ConfigError, UserError
from ..formats.records import RecordError, load_attack_record
from ..pipeline import check, defend
from ..settings import PRESET_NAMES, VARIANT_NAMES, Settings, read_yaml, resolve
from ..settings.cli import add_setting_arguments, explicit_values
from ..util.logs import setup_logging
from .checkout import bench_imports, find_checkout, require_checkout
from .rof_support import install as install_rof

log = logging.getLogger("pgbd_defense.bench")

# BackdoorBench's common defense options that mean nothing here (accepted for compatibility).
IGNORED_OPTIONS = {"--num_workers": "data are held in memory"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """BackdoorBench's common defense options, then every setting of the field table in the
    benchmark's spelling (``--batch_size``, ``--freeze_bn true``), then the run's options."""
    parser.add_argument("--yaml_path", type=str, default="./config/defense/pgbd/config.yaml")
    parser.add_argument("--result_file", type=str, help="record folder name under ./record")
    for flag, why in IGNORED_OPTIONS.items():
        parser.add_argument(flag, type=str, help=f"accepted for compatibility ({why})")
    add_setting_arguments(parser, "bench")
    g = parser.add_argument_group("run")
    g.add_argument("--preset", default="paper", choices=PRESET_NAMES,
                   help="defaults under the YAML (default paper)")
    g.add_argument("--variant", choices=sorted({*VARIANT_NAMES, *VARIANT_NAMES.values()}), default=None,
                   help="pgbd (target known), nt (NT-PGBD, no target) or st (ST-PGBD, synthesized trigger)")
    g.add_argument("--defense_name", help="folder under record/<result_file>/defense/ (default: the variant's name)")
    g.add_argument("--trust_record", action="store_true", help="unpickle the record fully (only records you made)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier PGBD result of this record")
    g.add_argument("--resume", action="store_true")
    g.add_argument("--dry_run", action="store_true", help="print the settings the run would use and stop")


def launcher_settings(args) -> Settings:
    """The settings the launcher runs with: the preset, the YAML at --yaml_path, the flags given.
    The data set must be named (BackdoorBench's loaders and shapes depend on it)."""
    yaml_values = read_yaml(args.yaml_path) if args.yaml_path else {}
    explicit = explicit_values(args)
    if "dataset" not in explicit and "dataset" not in yaml_values:
        raise ConfigError("give --dataset (or a YAML with a dataset key): the record's data set as BackdoorBench "
                          "names it (cifar10, cifar100, gtsrb, tiny, mnist)")
    return resolve(args.preset, args.variant, yaml_values, explicit, source=args.yaml_path or "config")


def to_image_set(dataset, channels: int, size: Tuple[int, int]) -> ImageSet:
    """A torchvision-style data set of (PIL image, label, ...) as uint8 (N, C, H, W)."""
    from PIL import Image

    images, labels = [], []
    for i in range(len(dataset)):
        img, label = dataset[i][:2]
        if isinstance(img, Image.Image):
            if img.size != (size[1], size[0]):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img.convert("RGB") if channels == 3 else img.convert("L"))
        else:
            arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.shape[2] != channels:
            arr = np.repeat(arr[:, :, :1], channels, axis=2)
        images.append(arr.transpose(2, 0, 1))
        labels.append(int(label))
    return ImageSet(torch.from_numpy(np.stack(images)).contiguous(), torch.tensor(labels, dtype=torch.int64))


def normalization_of(transform) -> Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]:
    """The Normalize step of a torchvision Compose (the benchmark's test transform)."""
    for t in getattr(transform, "transforms", [transform]):
        if type(t).__name__ == "Normalize":
            return tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
    return None


def defense_class():
    """The benchmark-facing class, subclassing the checkout's ``defense.base.defense``
    (imported now, from the checkout on sys.path)."""
    install_rof()  # before the imports below bind the data set functions
    from defense.base import defense as BenchDefense
    from utils.aggregate_block.dataset_and_transform_generate import (
        dataset_and_transform_generate,
        get_input_shape,
        get_num_classes,
    )
    from utils.aggregate_block.model_trainer_generate import generate_cls_model

    class pgbd(BenchDefense):
        def __init__(self, args):
            self.settings = launcher_settings(args)
            dataset = self.settings["dataset"]
            # What the benchmark's scripts derive from the data set, for its own helpers.
            args.num_classes = get_num_classes(dataset)
            args.input_height, args.input_width, args.input_channel = get_input_shape(dataset)
            args.img_size = (args.input_height, args.input_width, args.input_channel)
            self.args = args
            self.model = None
            if getattr(args, "result_file", None):
                self.set_result(args.result_file)

        add_arguments = staticmethod(add_arguments)

        def set_result(self, result_file):
            self.record_dir = Path("record") / result_file
            if not (self.record_dir / "attack_result.pt").is_file():
                raise RecordError(f"no record at {self.record_dir.resolve()}: run an attack with "
                                  f"--save_folder_name {result_file} first, or check --result_file")
            self.args.save_path = str(self.record_dir / "defense" / self.name())

        def name(self) -> str:
            return self.args.defense_name or self.settings.defense

        def set_trainer(self, model):
            self.model = model

        def set_logger(self):
            setup_logging(False)

        def load(self):
            data_root = self.settings["data_root"] or "./data"
            found = {}

            def clean_splits(raw):
                # As the benchmark's load_attack_result does: the record's data set and image size
                # (a gray data set may have been served as 3 channels), read from ./data/<dataset>.
                size = tuple(int(v) for v in raw["img_size"])
                setting = SimpleNamespace(dataset=raw["clean_data"], dataset_path=f"{data_root}/{raw['clean_data']}",
                                          img_size=size)
                train, _, _, test, test_transform, _ = dataset_and_transform_generate(setting)
                found["normalization"] = normalization_of(test_transform)
                return (to_image_set(train, size[2], size[:2]), to_image_set(test, size[2], size[:2]))

            model = generate_cls_model(self.settings["model"], self.args.num_classes)
            self.set_trainer(model)
            record = load_attack_record(self.record_dir, clean_splits=clean_splits, model=model,
                                        trust=bool(self.args.trust_record), device=self.settings["device"])
            record.normalization = found.get("normalization")
            return record

        def mitigation(self):
            check(self.settings)
            record = self.load()
            result = defend(self.settings, record, self.record_dir, name=self.name(),
                            overwrite=bool(self.args.overwrite), resume=bool(self.args.resume))
            return {"model": result.model, "exit_code": 0}

        def defense(self, result_file):
            self.set_result(result_file)
            self.set_logger()
            return self.mitigation()

    return pgbd


def main(argv: Optional[Sequence[str]] = None) -> int:
    root = find_checkout()
    if root is None:
        print("defense/pgbd.py must run from a BackdoorBench checkout root (cd into it first)", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="defense/pgbd.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    setup_logging(False)
    try:
        require_checkout(root)
        if args.dry_run:
            settings = launcher_settings(args)
            check(settings)
            print(yaml.safe_dump(settings.saved(), sort_keys=True), end="")
            return 0
        if not args.result_file:
            parser.error("--result_file is required (the record folder name under ./record)")
        with bench_imports(root):
            result = defense_class()(args).defense(args.result_file)
        return int(result.get("exit_code", 0))
    except UserError as e:
        log.error("%s", e)
        return 2


def launcher_text() -> str:
    """The file the installer writes to ``<checkout>/defense/pgbd.py``."""
    return '''"""PGBD (ICCV 2025) for BackdoorBench, provided by the installed pgbd-defense package.

Added by `python -m pgbd_defense.install`; removed by `python -m pgbd_defense.install --uninstall`.
Run from the checkout root:
    python ./defense/pgbd.py --result_file badnet_0_1 --yaml_path ./config/defense/pgbd/cifar10.yaml --dataset cifar10
"""
import os
import sys

sys.path.insert(0, os.getcwd())  # the benchmark's modules, as its own scripts find them

from pgbd_defense.bench.plugin import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
'''


def config_names() -> List[str]:
    return ["config.yaml", "cifar10.yaml", "cifar100.yaml", "gtsrb.yaml", "tiny.yaml"]
