"""What every attack shares: label modes, choosing the samples to poison, and
building the poisoned train and test splits as :class:`BackdoorSet`s."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Tuple

import torch

from ..datasets import ImageSet
from ..formats.records import LABEL_MODES, BackdoorSet, label_mapping  # noqa: F401
from ..util.registry import Registry

ATTACKS: Registry = Registry("attack")


@dataclass
class Attack:
    """Base of the data-poisoning attacks: subclasses implement :meth:`apply_trigger`."""

    num_classes: int
    target: int = 0
    ratio: float = 0.1
    mode: str = "all2one"
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise ValueError(f"poisoning ratio must lie in (0, 1], got {self.ratio}")
        self.mapping = label_mapping(self.num_classes, self.mode, self.target)

    def apply_trigger(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) clean images -> the same images carrying the trigger."""
        raise NotImplementedError

    # Clean-label attacks (SIG) poison only target-class samples and keep their labels.
    clean_label = False
    # Whether apply_trigger can stamp any image (rof-sunglasses poisons with real photos instead),
    # and the data sets the attack is meant for (empty: any); tests and checks loop on these.
    stamps_any_image = True
    data_sets: ClassVar[Tuple[str, ...]] = ()

    def eligible(self, clean: ImageSet) -> torch.Tensor:
        """Indices of the training samples the attack may poison."""
        if self.clean_label:
            return (clean.labels == self.target).nonzero().flatten()
        return torch.arange(len(clean))

    def poison_train(self, clean: ImageSet) -> BackdoorSet:
        """The whole training split with ``ratio`` of it (drawn with ``seed`` among the
        eligible samples) triggered and, unless clean-label, relabelled."""
        n = len(clean)
        gen = torch.Generator().manual_seed(self.seed)
        pool = self.eligible(clean)
        count = min(int(round(self.ratio * n)), len(pool))
        chosen = pool[torch.randperm(len(pool), generator=gen)[:count]]
        indicator = torch.zeros(n, dtype=torch.int64)
        indicator[chosen] = 1
        images = clean.images.clone()
        labels = clean.labels.clone()
        images[chosen] = self.apply_trigger(clean.images[chosen])
        if not self.clean_label:
            labels[chosen] = self.mapping[clean.labels[chosen]]
        return BackdoorSet(images, labels, torch.arange(n), indicator, clean.labels.clone())

    def training_set(self, bd_train: BackdoorSet):
        """What the backdoored model is trained on: by default the poisoned split itself."""
        return bd_train.images, bd_train.labels

    def poison_test(self, clean: ImageSet) -> BackdoorSet:
        """Every test sample whose attack label differs from its true label, triggered."""
        keep = (self.mapping[clean.labels] != clean.labels).nonzero().flatten()
        return BackdoorSet(self.apply_trigger(clean.images[keep]), self.mapping[clean.labels[keep]], keep,
                           torch.ones(len(keep), dtype=torch.int64), clean.labels[keep].clone())
