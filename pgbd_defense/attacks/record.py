"""Build an attack record: poison a clean data set, train a backdoored model on it,
and write the record in BackdoorBench's format."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from .. import datasets as data_mod
from ..datasets.batches import Normalizer
from ..errors import ConfigError
from ..formats.models import MODELS, build_model
from ..formats.records import write_attack_record
from ..metrics import evaluate
from ..settings.fields import preset_default
from ..util.atomic import atomic_write_text
from ..util.provenance import provenance
from . import ATTACKS
from .training import train_classifier

_D = preset_default

log = logging.getLogger(__name__)


@dataclass
class AttackSettings:
    """How the backdoored model is made; the defaults are the paper preset's (``settings/fields.py``,
    section ``attack``: each field's meaning is there)."""

    attack: str = _D("attack")
    dataset: str = _D("dataset")
    model: str = _D("model")
    width: float = _D("width")
    pratio: float = _D("pratio")
    target: int = _D("attack_target")
    label_mode: str = _D("attack_label_trans")
    epochs: int = _D("attack_epochs")
    lr: float = _D("attack_lr")
    batch_size: int = _D("attack_batch_size")
    train_subset: int = _D("attack_train_subset")  # 0: the whole training split
    augment: bool = _D("attack_augment")
    trigger_image: str = _D("trigger_image")  # Blended: the user's trigger image (default: our generated pattern)
    trojan_optimize: bool = _D("trojan_optimize")  # Trojan: TrojanNN-style patch (False: fixed white watermark)
    overlays: str = _D("overlays")  # rof-tattoo / rof-mask: comma-separated RGBA PNGs instead of our overlays
    amp: bool = _D("amp")  # bfloat16 autocast while training
    iab_mask_epochs: int = _D("iab_mask_epochs")  # inputaware: the mask generator's own epochs first
    mmdr_lambda: float = _D("mmdr_lambda")  # ML-MMDR's penalty weight (0: the plain attack; mmdr.py)
    mmdr_layers: List[str] = field(default_factory=lambda: _D("mmdr_layers"))
    seed: int = _D("random_seed")

    def problems(self) -> List[str]:
        """What is wrong with these settings, checked before any data is read or model trained."""
        found = [f"unknown {kind} {name!r}; choose one of: {', '.join(registry.names())}"
                 for kind, name, registry in (("attack", self.attack, ATTACKS), ("dataset", self.dataset,
                                                                                  data_mod.DATASETS),
                                              ("model", self.model, MODELS)) if name not in registry]
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                found.append(f"attack_{name}={getattr(self, name)} (must be >= 1)")
        if not 0 < self.pratio <= 1:
            found.append(f"pratio={self.pratio} (must lie in (0, 1])")
        if self.lr <= 0 or self.width <= 0:
            found.append(f"attack_lr={self.lr}, width={self.width} (must be > 0)")
        if self.mmdr_lambda < 0 or (self.mmdr_lambda > 0 and not self.mmdr_layers):
            found.append(f"mmdr_lambda={self.mmdr_lambda}, mmdr_layers={list(self.mmdr_layers)} (a weight >= 0 and, "
                         "when it is > 0, at least one layer)")
        if self.iab_mask_epochs < 0:
            found.append(f"iab_mask_epochs={self.iab_mask_epochs} (must be >= 0)")
        trains_with_classifier = getattr(ATTACKS.get(self.attack), "trains_with_classifier", False) \
            if self.attack in ATTACKS else False
        if self.mmdr_lambda > 0 and trains_with_classifier:
            found.append(f"mmdr_lambda={self.mmdr_lambda}: ML-MMDR is an option of the data-poisoning attacks, "
                         f"not of {self.attack} (its trigger is trained with the classifier)")
        if self.train_subset < 0:
            found.append(f"attack_train_subset={self.train_subset} (must be >= 0; 0: all)")
        if self.dataset in data_mod.INFO and not 0 <= self.target < data_mod.INFO[self.dataset].num_classes:
            found.append(f"attack_target={self.target} (the {self.dataset} classes are "
                         f"0..{data_mod.INFO[self.dataset].num_classes - 1})")
        made_for = ATTACKS.get(self.attack).data_sets if self.attack in ATTACKS else ()
        if made_for and self.dataset not in made_for:
            found.append(f"the {self.attack} attack is made for {', '.join(made_for)}, not {self.dataset}")
        if self.trigger_image and self.attack != "blended":
            found.append(f"trigger_image is an option of the blended attack, not of {self.attack!r}")
        if self.trigger_image and not Path(self.trigger_image).is_file():
            found.append(f"trigger_image={self.trigger_image!r} does not exist")
        if self.overlays and self.attack not in ("rof-tattoo", "rof-mask"):
            found.append(f"overlays are an option of rof-tattoo and rof-mask, not of {self.attack!r}")
        missing = [o for o in self.overlays.split(",") if o and not Path(o).is_file()]
        if missing:
            found.append(f"overlays {missing} do not exist")
        return found


def trigger_facts(attack) -> dict:
    """What an optimized trigger is, kept in the record (TrojanNN: its neuron and activations;
    an attack with ``trigger_state``, as IAB's networks, says itself)."""
    if hasattr(attack, "trigger_state"):
        return attack.trigger_state()
    if getattr(attack, "pattern", None) is None or getattr(attack, "neuron", None) is None:
        return {}
    return {"trojan_neuron": attack.neuron, "trojan_activation": attack.activation,
            "trojan_pattern": attack.pattern.clone()}


def record_name(s: AttackSettings) -> str:
    """BackdoorBench-style folder name (``badnet_0_1`` for ratio 0.1) with the data set,
    model and a digest of every other setting, so a reused record was made the same way."""
    ratio = f"{s.pratio:g}".replace(".", "_")
    settings = asdict(s)
    if s.attack != "trojan":  # added later: other attacks' record names stay as they were
        settings.pop("trojan_optimize")
    if s.attack != "inputaware":  # likewise
        settings.pop("iab_mask_epochs")
    if not s.overlays:
        settings.pop("overlays")
    if not s.amp:  # added later still: full-precision records keep their names
        settings.pop("amp")
    if not s.mmdr_lambda:  # and so do the plain attacks' records after ML-MMDR
        settings.pop("mmdr_lambda")
        settings.pop("mmdr_layers")
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{s.attack}_{ratio}_{s.dataset}_{s.model}_{digest}"


def subset(images: torch.Tensor, labels: torch.Tensor, s: AttackSettings, *more: torch.Tensor):
    """A CPU budget: a seeded subset of ``s.train_subset`` samples (the same rows of each tensor;
    all of them when the setting is 0 or not smaller)."""
    if not s.train_subset or s.train_subset >= len(labels):
        return (images, labels, *more)
    keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(s.seed + 1))[: s.train_subset]
    return (images[keep], labels[keep], *(t[keep] for t in more))


PROVENANCE_FILE = "provenance.json"


def read_provenance(folder: Path) -> Optional[dict]:
    """The facts ``build_attack_record`` wrote beside a record; None for a record made before it
    wrote them, or by BackdoorBench."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        facts = json.loads(path.read_text())
    except ValueError:
        facts = None
    if not isinstance(facts, dict):
        log.warning("%s is not a JSON object; the record's provenance is not known", path)
        return None
    return facts


def build_attack_record(folder: Path, s: AttackSettings, data_root: Optional[str] = None,
                        download: bool = False, device: str = "cpu", save_png: bool = True) -> dict:
    """Train a backdoored model and write ``folder/attack_result.pt`` (and ``folder/provenance.json``:
    commit, torch, thread count, device, seconds); returns its test metrics."""
    started = time.time()
    bad = s.problems()
    if bad:
        raise ConfigError("invalid attack settings: " + "; ".join(bad))
    info = data_mod.dataset_info(s.dataset)
    channels = info.size[2]
    train = data_mod.load_split(s.dataset, data_root, train=True, download=download, channels=channels)
    test = data_mod.load_split(s.dataset, data_root, train=False, download=download, channels=channels)
    options = {"trigger_image": s.trigger_image} if s.trigger_image else {}
    if s.attack == "trojan":
        options["optimize"] = s.trojan_optimize
    if s.attack == "rof-sunglasses":
        options["data_root"] = data_root
    if s.overlays:
        options["overlays"] = [p for p in s.overlays.split(",") if p]
    if s.attack == "inputaware":
        options.update(mask_epochs=s.iab_mask_epochs, channels=channels, side=info.size[0])
    attack = ATTACKS.get(s.attack)(num_classes=info.num_classes, target=s.target, ratio=s.pratio,
                                   mode=s.label_mode, seed=s.seed, **options)
    normalize = Normalizer(info.mean, info.std, channels)
    def fresh_model(seed: int = s.seed):
        # Seeded: a model's initialization must not depend on what the process drew before it. An
        # unseeded reference model made TrojanNN's record depend on the process's history (a table
        # worker that had built other records first trained another trigger: CA 88.16 / ASR 99.91
        # vs 88.20 / 99.78 for the same settings at one thread, 2026-12-03).
        torch.manual_seed(seed)
        return build_model(s.model, info.num_classes, channels, s.width)

    if hasattr(attack, "prepare"):  # attacks that need a trained model to make their trigger (TrojanNN)
        def reference_training(model, images, labels, norm, epochs):
            return train_classifier(model, images, labels, norm, epochs, lr=s.lr, batch_size=s.batch_size,
                                    augment=False, seed=s.seed, device=device, desc="reference model", amp=s.amp)

        # the attacker's reference network is its own (another initialization than the victim's)
        attack.prepare(train, lambda: fresh_model(s.seed + 1), normalize, reference_training, device)

    if getattr(attack, "trains_with_classifier", False):
        # IAB: the trigger generator learns together with the classifier on the clean split; the
        # record's poisoned splits are made with the trained generator afterwards.
        images, labels = subset(train.images, train.labels, s)
        model = fresh_model()
        attack.train_with_classifier(model, images, labels, normalize, s.epochs, lr=s.lr, batch_size=s.batch_size,
                                     augment=s.augment, hflip=info.hflip, seed=s.seed, device=device, amp=s.amp)
        bd_train, bd_test = attack.poison_train(train), attack.poison_test(test)
    else:
        bd_train = attack.poison_train(train)
        bd_test = attack.poison_test(test)
        images, labels = attack.training_set(bd_train)
        poisoned = bd_train.poison_indicator  # training_set keeps bd_train's order (WaNet warps in place)
        images, labels, poisoned = subset(images, labels, s, poisoned)
        model = fresh_model()
        train_classifier(model, images, labels, normalize, s.epochs, lr=s.lr, batch_size=s.batch_size,
                         augment=s.augment, hflip=info.hflip, seed=s.seed, device=device, amp=s.amp,
                         poisoned=poisoned, mmdr_lambda=s.mmdr_lambda, mmdr_layers=s.mmdr_layers)
    metrics = evaluate(model, test, bd_test, normalize, device=device)
    log.info("backdoored model: CA %.4f ASR %.4f RA %.4f", metrics["test_acc"], metrics["test_asr"], metrics["test_ra"])
    # Beside the record, not in it: a table reads it for every record without loading the images.
    # Written first: a record counts as made once attack_result.pt exists, and a rebuild rewrites this.
    facts = {**provenance(), "device": device, "seconds": round(time.time() - started, 1)}
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(folder) / PROVENANCE_FILE, json.dumps(facts, indent=1) + "\n")
    write_attack_record(folder, model=model, model_name=s.model, num_classes=info.num_classes,
                        clean_data=s.dataset, data_path=str(data_root or ""), img_size=(*info.size[:2], channels),
                        bd_train=bd_train, bd_test=bd_test, train_size=len(train), test_size=len(test),
                        save_png=save_png, extra={"attack": s.attack, "attack_settings": asdict(s),
                                                  "attack_metrics": metrics, **trigger_facts(attack)})
    return metrics

