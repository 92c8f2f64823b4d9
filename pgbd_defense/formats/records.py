"""BackdoorBench record folders, read and written without importing BackdoorBench.

``record/<name>/attack_result.pt`` holds the backdoored model's state_dict and two
"dataset states" (``bd_train``, ``bd_test``) that list only the poisoned samples,
either in memory as ``(PIL image, poisoned_label, original_label)`` or on disk as
``{"path": png, "other_info": [poisoned_label, original_label]}``. Clean images are
rebuilt from the data set named by ``clean_data``. See ``shared/spec/BACKDOORBENCH.md``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .. import datasets as data_mod
from ..datasets.batches import Normalizer
from ..errors import UserError
from ..util.atomic import atomic_torch_save
from .models import build_model, infer_architecture, load_weights
from .safe_pickle import safe_torch_load

log = logging.getLogger(__name__)


class RecordError(UserError, ValueError):
    """A record folder or file that cannot be used; the message says what to fix."""


@dataclass
class BackdoorSet:
    """A backdoor split as BackdoorBench exposes it: items are 5-tuples
    ``(image, label, original_index, poison_indicator, original_label)``.

    ``images`` is uint8 (N, C, H, W); ``labels`` are what the model is trained or
    scored against (the attack label for poisoned samples)."""

    images: torch.Tensor
    labels: torch.Tensor
    original_index: torch.Tensor
    poison_indicator: torch.Tensor
    original_labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return (self.images[i], int(self.labels[i]), int(self.original_index[i]),
                int(self.poison_indicator[i]), int(self.original_labels[i]))


def _to_chw(img: Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)


def _from_chw(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def resolve_png(saved: str, record_dir: Path) -> Path:
    """Find a poisoned PNG whose saved path may be stale (records are moved between
    machines; BackdoorBench saves paths relative to its checkout root)."""
    p = Path(saved)
    candidates = [p] if p.is_absolute() else [record_dir.parent.parent / p, Path.cwd() / p]
    parts = p.parts
    if record_dir.name in parts:  # ./record/<name>/bd_test_dataset/<label>/<i>.png
        candidates.append(record_dir.joinpath(*parts[len(parts) - parts[::-1].index(record_dir.name):]))
    candidates.append(record_dir.joinpath(*parts[-3:]))
    for c in candidates:
        if c.is_file():
            return c
    raise RecordError(f"poisoned image {saved!r} not found (tried {', '.join(map(str, candidates))}); "
                      "the record folder is incomplete: copy its bd_*_dataset folders along with it")


def _read_poisoned(state: Dict[str, Any], record_dir: Path, channels: int, hw: tuple):
    container = state["bd_data_container"]
    entries = container["data_dict"]
    idx = np.fromiter((int(k) for k in entries), dtype=np.int64, count=len(entries))
    imgs, bd_labels, orig_labels = [], [], []
    for k in entries:
        v = entries[k]
        if isinstance(v, dict):
            with Image.open(resolve_png(str(v["path"]), record_dir)) as im:
                # The header gives the size before any pixel is decoded: refuse a bomb early.
                if (im.height, im.width) != hw:
                    raise RecordError(f"{v['path']} is {im.width}x{im.height}, the data set's images are "
                                      f"{hw[1]}x{hw[0]}")
                imgs.append(_to_chw(im, channels))
            bd_label, orig_label = v["other_info"][:2]
        else:
            if not isinstance(v[0], Image.Image) or (v[0].height, v[0].width) != hw:
                raise RecordError(f"poisoned sample {k} is not a {hw[1]}x{hw[0]} PIL image")
            imgs.append(_to_chw(v[0], channels))
            bd_label, orig_label = v[1], v[2]
        bd_labels.append(int(bd_label))
        orig_labels.append(int(orig_label))
    images = torch.stack(imgs) if imgs else torch.empty(0, dtype=torch.uint8)
    return torch.from_numpy(idx), images, torch.tensor(bd_labels), torch.tensor(orig_labels)


def backdoor_set_from_state(state: Dict[str, Any], clean: data_mod.ImageSet, record_dir: Path) -> BackdoorSet:
    """Rebuild the split a dataset state describes: the clean samples it exposes,
    with the poisoned ones replaced by their stored images and labels."""
    channels = clean.images.shape[1]
    exposed = torch.as_tensor(np.asarray(state["original_index_array"]), dtype=torch.int64)
    indicator_full = torch.as_tensor(np.asarray(state["poison_indicator"]), dtype=torch.int64)
    if len(indicator_full) != len(clean):
        raise RecordError(f"record marks {len(indicator_full)} samples but the clean split has {len(clean)}: "
                          "the data root holds a different data set than the attack used")
    if len(exposed) and (int(exposed.min()) < 0 or int(exposed.max()) >= len(clean)):
        raise RecordError(f"original_index_array holds indices outside the clean split (0..{len(clean) - 1})")
    images = clean.images[exposed].clone()
    labels = clean.labels[exposed].clone()
    original_labels = clean.labels[exposed].clone()
    p_idx, p_images, p_labels, p_orig = _read_poisoned(state, record_dir, channels, tuple(clean.images.shape[2:]))
    if len(p_idx) and (int(p_idx.min()) < 0 or int(p_idx.max()) >= len(clean)):
        raise RecordError(f"poisoned samples name indices outside the clean split (0..{len(clean) - 1})")
    if len(p_idx):
        if p_images.shape[1:] != images.shape[1:]:
            raise RecordError(f"poisoned images are {tuple(p_images.shape[1:])} but clean ones "
                              f"{tuple(images.shape[1:])}")
        position = torch.full((len(clean),), -1, dtype=torch.int64)
        position[exposed] = torch.arange(len(exposed))
        where = position[p_idx]
        keep = where >= 0  # poisoned samples the split does not expose are not served
        images[where[keep]] = p_images[keep]
        labels[where[keep]] = p_labels[keep]
        original_labels[where[keep]] = p_orig[keep]
    return BackdoorSet(images, labels, exposed, indicator_full[exposed], original_labels)


@dataclass
class AttackRecord:
    """An attack record folder, loaded: the model and the splits a defense needs."""

    folder: Path
    raw: Dict[str, Any]
    clean_train: data_mod.ImageSet
    clean_test: data_mod.ImageSet
    bd_test: BackdoorSet
    model: torch.nn.Module
    architecture: Dict[str, Any] = field(default_factory=dict)
    _bd_train: Optional[BackdoorSet] = None
    # (mean, std) when the data set's normalization comes from elsewhere than data.INFO
    # (inside a BackdoorBench checkout: the benchmark's own test transform).
    normalization: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]] = None

    @property
    def name(self) -> str:
        return self.folder.name

    def normalizer(self):
        """The normalization the record's model expects: the checkout's test transform inside
        BackdoorBench, else the data set's (BackdoorBench's constants)."""
        info = data_mod.dataset_info(self.clean_data)
        mean, std = self.normalization or (info.mean, info.std)
        return Normalizer(mean, std, self.clean_test.images.shape[1])

    @property
    def model_name(self) -> str:
        return self.raw["model_name"]

    @property
    def num_classes(self) -> int:
        return int(self.raw["num_classes"])

    @property
    def clean_data(self) -> str:
        return self.raw["clean_data"]

    @property
    def bd_train(self) -> Optional[BackdoorSet]:
        """The poisoned training split (read on first use: it can be thousands of PNGs)."""
        if self._bd_train is None and self.raw.get("bd_train") is not None:
            self._bd_train = _checked_state(self.raw["bd_train"], self.clean_train, self.folder, "bd_train")
        return self._bd_train

    def target_labels(self) -> torch.Tensor:
        """Attack label per class (all2one: one target; all2all: y+1 mod k), read off bd_test."""
        return infer_label_mapping(self.bd_test, self.num_classes)


# BackdoorBench's label transforms (its ``attack_label_trans``).
LABEL_MODES = ("all2one", "all2all")


def label_mapping(num_classes: int, mode: str, target: int) -> torch.Tensor:
    """Attack label of each class: all2one sends every class to ``target``,
    all2all sends class y to (y + 1) mod k."""
    if mode == "all2one":
        if not 0 <= target < num_classes:
            raise ValueError(f"target label {target} is out of range for {num_classes} classes (0..{num_classes - 1})")
        return torch.full((num_classes,), target, dtype=torch.int64)
    if mode == "all2all":
        return (torch.arange(num_classes) + 1) % num_classes
    raise ValueError(f"unknown label mode {mode!r}; choose one of {LABEL_MODES}")


def infer_label_mapping(bd: BackdoorSet, num_classes: int) -> torch.Tensor:
    mapping = torch.full((num_classes,), -1, dtype=torch.int64)
    poisoned = bd.poison_indicator == 1
    for orig, lab in zip(bd.original_labels[poisoned].tolist(), bd.labels[poisoned].tolist()):
        mapping[orig] = lab
    return mapping


REQUIRED_KEYS = {"model_name": str, "num_classes": int, "model": dict, "img_size": (tuple, list),
                 "clean_data": str, "bd_test": dict}


def validate_attack_result(raw: Any, path: Path) -> None:
    """Check the structure a defense relies on, naming the offending key and the expected type."""
    if not isinstance(raw, dict):
        raise RecordError(f"{path} holds a {type(raw).__name__}, not BackdoorBench's attack_result dict")
    for key, kind in REQUIRED_KEYS.items():
        if key not in raw:
            raise RecordError(f"{path} lacks the key {key!r} every BackdoorBench attack_result.pt has")
        if not isinstance(raw[key], kind) or isinstance(raw[key], bool):
            raise RecordError(f"{path}: {key!r} is a {type(raw[key]).__name__}, expected {kind}")
    if not 2 <= raw["num_classes"] <= 100_000:
        raise RecordError(f"{path}: num_classes={raw['num_classes']} is not a plausible class count")
    size = raw["img_size"]
    if len(size) != 3 or not all(isinstance(v, (int, np.integer)) and 0 < int(v) <= 4096 for v in size) \
            or int(size[2]) not in (1, 3):
        raise RecordError(f"{path}: img_size={size!r} must be (height, width, channels) with 1 or 3 channels")
    bad = [k for k, v in raw["model"].items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise RecordError(f"{path}: 'model' must map parameter names to tensors; offending keys {bad[:3]}")
    for split in ("bd_train", "bd_test"):
        state = raw.get(split)
        if state is None and split == "bd_train":
            continue
        if not isinstance(state, dict):
            raise RecordError(f"{path}: {split!r} is a {type(state).__name__}, expected a dataset state dict")
        for key, kind in (("bd_data_container", dict), ("original_index_array", (np.ndarray, list, torch.Tensor)),
                          ("poison_indicator", (np.ndarray, list, torch.Tensor))):
            if not isinstance(state.get(key), kind):
                raise RecordError(f"{path}: {split}[{key!r}] is a {type(state.get(key)).__name__}, expected {kind}")
        if not isinstance(state["bd_data_container"].get("data_dict"), dict):
            raise RecordError(f"{path}: {split}['bd_data_container']['data_dict'] must be a dict")


def _checked_state(state: Dict[str, Any], clean: data_mod.ImageSet, folder: Path, split: str) -> BackdoorSet:
    try:
        return backdoor_set_from_state(state, clean, folder)
    except RecordError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, OSError) as e:
        raise RecordError(f"{folder / 'attack_result.pt'}: the {split} split is malformed "
                          f"({type(e).__name__}: {e})") from None


def load_attack_record(folder, data_root: Optional[str] = None, trust: bool = False,
                       device: str = "cpu", clean_splits=None, model: Optional[torch.nn.Module] = None,
                       ) -> AttackRecord:
    """Load ``<folder>/attack_result.pt``, rebuild its data splits and its model.

    ``data_root`` is where the clean data set lives; without it, the record's own
    ``data_path`` (relative to the BackdoorBench checkout holding the record) is tried.
    Inside a BackdoorBench checkout the benchmark's own data sets and model class are
    passed in as ``clean_splits`` (train, test ImageSets, or a function of the raw
    record returning them) and ``model`` (weights are loaded here)."""
    folder = Path(folder)
    path = folder / "attack_result.pt"
    if not path.is_file():
        raise RecordError(f"no attack_result.pt in {folder}: not a BackdoorBench record folder "
                          "(run an attack first, e.g. python -m pgbd_defense.run --attack badnet)")
    raw = safe_torch_load(path, trust=trust)
    validate_attack_result(raw, path)
    clean_data = raw["clean_data"]
    channels = int(raw["img_size"][2])
    root = data_root
    if root is None and raw.get("data_path"):
        bench_relative = folder.parent.parent / raw["data_path"]
        root = str(bench_relative) if bench_relative.exists() else None
    if callable(clean_splits):  # built from the record's own keys (clean_data, img_size)
        clean_train, clean_test = clean_splits(raw)
    elif clean_splits is not None:
        clean_train, clean_test = clean_splits
    else:
        clean_train = data_mod.load_split(clean_data, root, train=True, channels=channels)
        clean_test = data_mod.load_split(clean_data, root, train=False, channels=channels)
    if model is None:
        arch = infer_architecture(raw["model_name"], raw["model"])
        model = build_model(raw["model_name"], int(raw["num_classes"]), **arch)
    else:
        arch = {}
    load_weights(model, raw["model"], raw["model_name"])
    model.to(device).eval()
    bd_test = _checked_state(raw["bd_test"], clean_test, folder, "bd_test")
    return AttackRecord(folder, raw, clean_train, clean_test, bd_test, model, arch)


# ------------------------------------------------------------------ writing


def dataset_state(bd: BackdoorSet, split_size: int, folder: Path, split: str,
                  save_png: bool, bench_root: Path) -> Dict[str, Any]:
    """Describe ``bd`` the way BackdoorBench's attacks save a backdoor split."""
    save_dir = folder / f"{split}_dataset"
    data_dict: Dict[Any, Any] = {}
    poisoned = (bd.poison_indicator == 1).nonzero().flatten().tolist()
    for pos in poisoned:
        key = np.int64(int(bd.original_index[pos]))
        label, orig = int(bd.labels[pos]), int(bd.original_labels[pos])
        if save_png:
            png = save_dir / str(orig) / f"{int(key)}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            _from_chw(bd.images[pos]).save(png)
            data_dict[key] = {"path": _bench_relative(png, bench_root), "other_info": [label, orig]}
        else:
            data_dict[key] = (_from_chw(bd.images[pos]), label, orig)
    indicator = np.zeros(split_size, dtype=np.float64)
    indicator[bd.original_index.numpy()] = bd.poison_indicator.numpy()
    return {
        "bd_data_container": {"save_folder_path": _bench_relative(save_dir, bench_root),
                              "data_dict": data_dict, "save_file_format": ".png"},
        "getitem_all": True,
        "getitem_all_switch": False,
        "original_index_array": bd.original_index.numpy().astype(np.int64),
        "poison_indicator": indicator,
        "save_folder_path": _bench_relative(save_dir, bench_root),
    }


def _bench_relative(path: Path, bench_root: Path) -> str:
    try:
        return "./" + str(path.resolve().relative_to(bench_root.resolve()))
    except ValueError:
        return str(path.resolve())


def write_attack_record(folder, *, model: torch.nn.Module, model_name: str, num_classes: int,
                        clean_data: str, data_path: str, img_size, bd_train: Optional[BackdoorSet],
                        bd_test: BackdoorSet, train_size: int, test_size: int, save_png: bool = True,
                        extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``<folder>/attack_result.pt`` (and the PNGs) in BackdoorBench's format."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bench_root = folder.parent.parent  # <bench root>/record/<name>
    result = {
        "model_name": model_name,
        "num_classes": int(num_classes),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "data_path": data_path,
        "img_size": tuple(int(s) for s in img_size),
        "clean_data": clean_data,
        "bd_train": dataset_state(bd_train, train_size, folder, "bd_train", save_png, bench_root)
        if bd_train is not None else None,
        "bd_test": dataset_state(bd_test, test_size, folder, "bd_test", save_png, bench_root),
    }
    result.update(extra or {})
    atomic_torch_save(result, folder / "attack_result.pt")
    return folder


def write_defense_result(folder, model: torch.nn.Module, model_name: str, num_classes: int) -> Path:
    path = Path(folder) / "defense_result.pt"
    atomic_torch_save({"model_name": model_name, "num_classes": int(num_classes),
                       "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)
    return path


def load_defense_result(folder, trust: bool = False) -> Dict[str, Any]:
    path = Path(folder) / "defense_result.pt"
    raw = safe_torch_load(path, trust=trust)
    for key, kind in (("model_name", str), ("num_classes", int), ("model", dict)):
        if not isinstance(raw, dict) or not isinstance(raw.get(key), kind):
            raise RecordError(f"{path}: {key!r} missing or not a {kind.__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw["model"].items()):
        raise RecordError(f"{path}: 'model' must map parameter names to tensors")
    return raw
