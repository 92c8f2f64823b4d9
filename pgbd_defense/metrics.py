"""CA, ASR, RA and the paper's Defense Efficacy Measure (DEM).

CA: accuracy on the clean test set. ASR: share of poisoned test samples (whose
true label differs from their attack label) classified as their attack label.
RA: share of poisoned test samples classified as their true label. All three are
fractions in [0, 1], as in BackdoorBench's CSVs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .datasets.batches import EVAL_BATCH_SIZE, Normalizer, iterate
from .util.hooks import eval_mode
from .util.progress import progress


@dataclass(frozen=True)
class DEM:
    delta_c: float
    delta_a: float

    @property
    def value(self) -> float:
        return (self.delta_c + self.delta_a) / 2


def dem(ca_poisoned: float, asr_poisoned: float, ca_defended: float, asr_defended: float) -> DEM:
    """DEM from CA/ASR before (poisoned) and after (defended) the defense.

    dC = (CA_P - CA_D)/CA_P, dA = (ASR_P - ASR_D)/ASR_P,
    delta_C = 1 - max(dC, 0), delta_A = max(dA, 0), DEM = (delta_C + delta_A)/2.

    >>> round(dem(92.34, 88.93, 90.66, 0.82).value, 3)
    0.986
    """
    if ca_poisoned <= 0 or asr_poisoned <= 0:
        raise ValueError(f"DEM needs a poisoned model with CA > 0 and ASR > 0, got CA={ca_poisoned}, "
                         f"ASR={asr_poisoned}")
    d_c = (ca_poisoned - ca_defended) / ca_poisoned
    d_a = (asr_poisoned - asr_defended) / asr_poisoned
    return DEM(delta_c=1 - max(d_c, 0.0), delta_a=max(d_a, 0.0))


@torch.inference_mode()  # only predictions and a float leave: nothing here is trained on
def predict(model: torch.nn.Module, images: torch.Tensor, normalize: Normalizer, batch_size: int = EVAL_BATCH_SIZE,
            device: str = "cpu", labels: Optional[torch.Tensor] = None, desc: Optional[str] = None):
    """Predictions (and the mean cross-entropy against ``labels`` if given), in eval mode."""
    preds, losses = [], []
    dummy = labels if labels is not None else torch.zeros(len(images), dtype=torch.int64)
    batches = iterate(images, dummy, batch_size, normalize, device=device)
    with eval_mode(model):
        for x, y, _ in progress(batches, total=-(-len(images) // batch_size), desc=desc, leave=False):
            logits = model(x)
            losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
            preds.append(logits.argmax(1).cpu())
    out = torch.cat(preds) if preds else torch.empty(0, dtype=torch.int64)
    # Summed per sample in float64 at the end, so the mean does not depend on the batch size.
    loss_sum = torch.cat(losses).double().sum().item() if losses else 0.0
    return out, loss_sum / max(len(images), 1)


def evaluate(model, clean_test, bd_test, normalize: Normalizer, batch_size: int = EVAL_BATCH_SIZE,
             device: str = "cpu") -> Dict[str, float]:
    """Everything BackdoorBench logs per epoch about a model's test behaviour."""
    clean_pred, clean_loss = predict(model, clean_test.images, normalize, batch_size, device,
                                     clean_test.labels, desc="eval clean")
    bd_pred, bd_loss = predict(model, bd_test.images, normalize, batch_size, device, bd_test.labels,
                               desc="eval poisoned")
    return {
        "clean_test_loss_avg_over_batch": clean_loss,
        "bd_test_loss_avg_over_batch": bd_loss,
        "test_acc": accuracy(clean_pred, clean_test.labels),
        "test_asr": attack_success_rate(bd_pred, bd_test.labels, bd_test.original_labels),
        "test_ra": robust_accuracy(bd_pred, bd_test.original_labels, bd_test.labels),
    }


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred == labels).float().mean().item() if len(labels) else float("nan")


def _attacked(attack_labels: torch.Tensor, true_labels: torch.Tensor) -> torch.Tensor:
    # A sample whose attack label equals its true label says nothing about the backdoor.
    return attack_labels != true_labels


def attack_success_rate(pred: torch.Tensor, attack_labels: torch.Tensor, true_labels: torch.Tensor) -> float:
    keep = _attacked(attack_labels, true_labels)
    return accuracy(pred[keep], attack_labels[keep])


def robust_accuracy(pred: torch.Tensor, true_labels: torch.Tensor, attack_labels: torch.Tensor) -> float:
    keep = _attacked(attack_labels, true_labels)
    return accuracy(pred[keep], true_labels[keep])
