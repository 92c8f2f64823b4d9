"""How far apart a model keeps clean and poisoned inputs in activation space: what ML-MMDR
(``attacks/mmdr.py``) claims to shrink and what a prototype-based defense relies on.

For each layer, on the record's poisoned test images and the same images without the
trigger: the MMD^2 between the two sets of activations (``gaussian_mmd2``, the attack's own
estimate, with its data-driven bandwidth), and a linear probe's held-out accuracy at telling
them apart (logistic regression on standardized activations, trained on one half of the
pairs and scored on the other; 0.5 is chance).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..attacks.mmdr import gaussian_mmd2
from ..datasets.batches import Normalizer
from .prototypes import collect_activations


def separation_from_activations(plain: torch.Tensor, triggered: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """MMD^2 and the probe's held-out accuracy for paired rows (N x D each, row i the same image)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n = len(plain)
    if n < 4 or len(triggered) != n:
        raise ValueError(f"need at least 4 paired rows, got {n} and {len(triggered)}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, held = order[: n // 2], order[n // 2:]  # a pair stays on one side: the probe cannot match twins

    def xy(rows):
        x = torch.cat([plain[rows], triggered[rows]]).double().numpy()
        return x, [0] * len(rows) + [1] * len(rows)

    x_fit, y_fit = xy(fit)
    x_held, y_held = xy(held)
    scaler = StandardScaler().fit(x_fit)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(x_fit), y_fit)
    return {"mmd2": float(gaussian_mmd2(plain.float(), triggered.float())),
            "probe_accuracy": float(probe.score(scaler.transform(x_held), y_held))}


def layer_separation(model: torch.nn.Module, layers: Sequence[str], triggered: torch.Tensor, plain: torch.Tensor,
                     normalize: Normalizer, max_images: int = 500, seed: int = 0,
                     device: str = "cpu") -> List[Dict[str, float]]:
    """One row per layer: ``layer``, ``mmd2``, ``probe_accuracy``, ``images`` (pairs used)."""
    triggered, plain = triggered[:max_images], plain[:max_images]
    rows = []
    for layer in layers:
        a = collect_activations(model, layer, plain, normalize, device=device)
        b = collect_activations(model, layer, triggered, normalize, device=device)
        rows.append({"layer": layer, **separation_from_activations(a, b, seed), "images": len(a)})
    return rows
