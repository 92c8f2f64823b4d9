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

from ..config import merge, read_yaml
from ..data import ImageSet
from ..records import RecordError, load_attack_record
from .checkout import bench_imports, find_checkout, require_checkout

log = logging.getLogger("pgbd_defense.bench")

# Command-line keys (BackdoorBench spells them with underscores) that become our settings.
SETTINGS = ["epochs", "batch_size", "lr", "lr_scheduler", "sgd_momentum", "wd", "ratio", "index", "random_seed",
            "model", "lambda", "loss_form", "reduction", "layer", "target", "clusters", "update_gap", "alpha",
            "grad_clip", "cycle", "val_share", "select", "collapse_margin", "warmup_epochs", "nt_classes", "nt_topk",
            "mapping", "mapping_components", "mapping_steps", "inversion_steps", "inversion_batch_size",
            "inversion_classes", "st_steps"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """BackdoorBench's common defense options, then PGBD's."""
    parser.add_argument("--device", type=str, help="cpu, cuda, cuda:N")
    parser.add_argument("--yaml_path", type=str, default="./config/defense/pgbd/config.yaml")
    parser.add_argument("--result_file", type=str, help="record folder name under ./record")
    parser.add_argument("--dataset", type=str, help="cifar10, cifar100, gtsrb, tiny, mnist")
    parser.add_argument("--dataset_path", type=str, help="clean data root (default ./data)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--num_workers", type=int, help="accepted for compatibility; data are held in memory")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--lr_scheduler", type=str)
    parser.add_argument("--model", type=str)
    parser.add_argument("--sgd_momentum", type=float)
    parser.add_argument("--wd", type=float)
    parser.add_argument("--random_seed", type=int)
    parser.add_argument("--ratio", type=float, help="clean share of the training split (0.05)")
    parser.add_argument("--index", type=str, help="file of clean-subset indices")
    parser.add_argument("--amp", type=str, help="accepted for compatibility (full precision is used)")
    g = parser.add_argument_group("PGBD")
    g.add_argument("--preset", default="paper", help="defaults under the YAML (paper, bench or cpu; default paper)")
    g.add_argument("--variant", choices=["pgbd", "nt", "st", "nt-pgbd", "st-pgbd"], default=None,
                   help="pgbd (target known), nt (NT-PGBD, no target) or st (ST-PGBD, synthesized trigger)")
    g.add_argument("--lambda", dest="lambda", type=float)
    g.add_argument("--loss_form", choices=["cos", "abs_cos", "relu_cos"])
    g.add_argument("--reduction", choices=["sum", "mean"])
    g.add_argument("--layer", type=str)
    g.add_argument("--target", type=str, help="record (default), a class index, all2all, or auto (inferred)")
    g.add_argument("--nt_classes", type=lambda v: [int(c) for c in v.split(",") if c])
    g.add_argument("--nt_topk", type=int, help="NT-PGBD with --target auto: cycle through the top k classes")
    g.add_argument("--mapping", type=str, help="off, a teacher features file, or torchvision:NAME:WEIGHTS_FILE")
    g.add_argument("--mapping_components", type=int)
    g.add_argument("--mapping_steps", type=int)
    g.add_argument("--inversion_steps", type=int)
    g.add_argument("--inversion_batch_size", type=int)
    g.add_argument("--inversion_classes", type=lambda v: [int(c) for c in v.split(",") if c])
    g.add_argument("--st_steps", type=int)
    g.add_argument("--clusters", type=int)
    g.add_argument("--update_gap", type=int)
    g.add_argument("--alpha", type=float)
    g.add_argument("--grad_clip", type=float)
    g.add_argument("--cycle", type=int)
    g.add_argument("--warmup_epochs", type=int)
    g.add_argument("--val_share", type=float)
    g.add_argument("--select", choices=["best", "last"])
    g.add_argument("--collapse_margin", type=float)
    g.add_argument("--trust_record", action="store_true", help="unpickle the record fully (only records you made)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier PGBD result of this record")
    g.add_argument("--resume", action="store_true")


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
    from .rof_support import install as install_rof

    install_rof()  # before the imports below bind the data set functions
    from defense.base import defense as BenchDefense
    from utils.aggregate_block.dataset_and_transform_generate import (dataset_and_transform_generate,
                                                                       get_input_shape, get_num_classes)
    from utils.aggregate_block.model_trainer_generate import generate_cls_model

    class pgbd(BenchDefense):
        def __init__(self, args):
            self.yaml_values = read_yaml(args.yaml_path) if args.yaml_path else {}
            # Flags given on the command line win over the YAML, as in the benchmark's scripts.
            self.explicit = {k: v for k, v in vars(args).items() if v is not None}
            args.__dict__.update({**self.yaml_values, **self.explicit})
            if not getattr(args, "dataset", None):
                raise SystemExit("give --dataset (or a YAML with a dataset key)")
            args.num_classes = get_num_classes(args.dataset)
            args.input_height, args.input_width, args.input_channel = get_input_shape(args.dataset)
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
            from ..defenses import VARIANT_DEFENSES

            named = self.args.variant or self.yaml_values.get("variant") or "pgbd"
            return VARIANT_DEFENSES.get(named, named)

        def set_trainer(self, model):
            self.model = model

        def set_logger(self):
            from ..run import _setup_logging

            _setup_logging(False)

        def load(self):
            data_root = getattr(self.args, "dataset_path", None) or self.yaml_values.get("dataset_path") or "./data"
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

            model = generate_cls_model(self.args.model, self.args.num_classes)
            self.set_trainer(model)
            record = load_attack_record(self.record_dir, clean_splits=clean_splits, model=model,
                                        trust=bool(getattr(self.args, "trust_record", False)),
                                        device=self.args.device or "cpu")
            record.normalization = found.get("normalization")
            return record

        def mitigation(self):
            from ..run import defend_record

            defense = self.name()
            cli = {k: self.explicit.get(k) for k in SETTINGS}
            yaml_values = {k: v for k, v in self.yaml_values.items() if k not in ("variant", "defense")}
            cfg = merge(self.args.preset, yaml_values, {k: v for k, v in cli.items() if v is not None},
                        defense=defense)
            record = self.load()
            run_args = SimpleNamespace(defense=defense, defense_name=defense, device=self.args.device or "cpu",
                                       overwrite=bool(self.args.overwrite), resume=bool(self.args.resume),
                                       preset=self.args.preset)
            code = defend_record(run_args, cfg, record, self.record_dir)
            return {"model": record.model, "exit_code": code}

        def defense(self, result_file):
            self.set_result(result_file)
            self.set_logger()
            return self.mitigation()

    return pgbd


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..run import USER_ERRORS

    root = find_checkout()
    if root is None:
        print("defense/pgbd.py must run from a BackdoorBench checkout root (cd into it first)", file=sys.stderr)
        return 2
    require_checkout(root)
    parser = argparse.ArgumentParser(prog="defense/pgbd.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    if not args.result_file:
        parser.error("--result_file is required (the record folder name under ./record)")
    try:
        with bench_imports(root):
            cls = defense_class()
            result = cls(args).defense(args.result_file)
        return int(result.get("exit_code", 0))
    except USER_ERRORS as e:
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
