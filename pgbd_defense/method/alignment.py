"""How well a PAV predicts where a trigger moves activations (the paper's Fig. 2).

For class c != t in one layer: the pure PAV V_c = P_t - P_c from the defender's
clean subset, and the ground-truth shift V_c^gt = mean f(x + trigger) - mean f(x)
over test images x of class c, taken with and without the trigger (the record's
poisoned test set and the same images clean). The alignment is cos(V_c, V_c^gt);
as a reference, the same cosine with the PAV towards a class that is not the
target (the next one, c' = c+1 skipping t), which any class-generic drift would
also align with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..formats.records import BackdoorSet
from .prototypes import collect_activations, estimate_prototypes


@dataclass
class LayerAlignment:
    layer: str
    per_class: Dict[int, float]  # cos(V_c, V_c^gt)
    reference: Dict[int, float]  # cos(P_c' - P_c, V_c^gt), c' a non-target class

    @property
    def mean(self) -> float:
        return sum(self.per_class.values()) / max(1, len(self.per_class))

    @property
    def reference_mean(self) -> float:
        return sum(self.reference.values()) / max(1, len(self.reference))


def paired_poisoned(bd_test: BackdoorSet, clean_test: ImageSet):
    """(triggered images, the same images clean, their true labels) from a record's test splits."""
    idx = bd_test.original_index.long()
    return bd_test.images, clean_test.images[idx], bd_test.original_labels.long()


def alignment_from_activations(clean_acts: torch.Tensor, clean_labels: torch.Tensor, bd_acts: torch.Tensor,
                               plain_acts: torch.Tensor, bd_labels: torch.Tensor, target: int, num_classes: int,
                               clusters: int = 3, seed: int = 0, layer: str = "") -> LayerAlignment:
    """The alignment of one layer from activations already computed (N x D each)."""
    means = estimate_prototypes(clean_acts, clean_labels, num_classes, clusters, seed).means()
    per_class, reference = {}, {}
    others = [c for c in range(num_classes) if c != target]
    for c in others:
        rows = bd_labels == c
        if not rows.any():
            continue
        gt = (bd_acts[rows] - plain_acts[rows]).mean(0)
        per_class[c] = float(F.cosine_similarity(means[target] - means[c], gt, dim=0))
        decoy = others[(others.index(c) + 1) % len(others)]
        reference[c] = float(F.cosine_similarity(means[decoy] - means[c], gt, dim=0))
    return LayerAlignment(layer, per_class, reference)


def layer_alignment(model: torch.nn.Module, layers: Sequence[str], clean: ImageSet, bd_test: BackdoorSet,
                    clean_test: ImageSet, target: int, num_classes: int, normalize: Normalizer,
                    max_poisoned: int = 2000, device: str = "cpu") -> List[LayerAlignment]:
    triggered, plain, labels = paired_poisoned(bd_test, clean_test)
    triggered, plain, labels = triggered[:max_poisoned], plain[:max_poisoned], labels[:max_poisoned]
    out = []
    for layer in layers:
        acts = collect_activations(model, layer, clean.images, normalize, device=device)
        bd = collect_activations(model, layer, triggered, normalize, device=device)
        pl = collect_activations(model, layer, plain, normalize, device=device)
        out.append(alignment_from_activations(acts, clean.labels, bd, pl, labels, target, num_classes, layer=layer))
    return out


def last_stage_convs(model: torch.nn.Module, count: int = 3) -> List[str]:
    """The last convolution of each of the model's last ``count`` stages (top-level children
    holding convolutions), e.g. layer2.1.conv2, layer3.1.conv2, layer4.1.conv2."""
    stages = []
    for name, child in model.named_children():
        convs = [f"{name}.{n}" if n else name for n, m in child.named_modules() if isinstance(m, torch.nn.Conv2d)]
        if convs:
            stages.append(convs[-1])
    if len(stages) < count:  # a flat model (e.g. vgg's features): its last convolutions
        stages = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return stages[-count:]
