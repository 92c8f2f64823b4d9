"""ML-MMDR: the attack's training made to hide poisoned samples in activation space.

Xia et al., "Enhancing Backdoor Attacks With Multi-Level MMD Regularization", IEEE TDSC
2022 (the adaptive attack of PGBD's Table 3): while the backdoored model trains, a penalty
on the maximum mean discrepancy (MMD) between the latent representations of the batch's
clean and poisoned samples, at several layers, pulls the two distributions together, so a
defense that separates them by activations has less to find. Here it is an option of every
data-poisoning attack (``mmdr_lambda`` > 0, ``mmdr_layers``), not a copy of each.

The estimate is the biased (V-statistic) MMD^2 with a sum of Gaussian kernels,
k(a, b) = sum_s exp(-||a - b||^2 / (s * m)), m the mean squared distance between the
batch's points (detached: the bandwidth follows the data, as the common "multi-kernel" MMD
does) and s in ``SCALES``. What differs from the paper: its kernel bandwidths and per-layer
weights are not given in a form we could copy, so these are ours (``docs/attacks.md``).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

SCALES = (0.25, 1.0, 4.0)


def gaussian_mmd2(x: torch.Tensor, y: torch.Tensor, scales: Sequence[float] = SCALES,
                  base: Optional[float] = None) -> torch.Tensor:
    """Biased MMD^2 between the rows of ``x`` (n, d) and ``y`` (m, d) under the kernel sum
    above; ``base`` is m (default: the mean squared pairwise distance of all n + m rows).

    >>> a = torch.zeros(3, 2)
    >>> float(gaussian_mmd2(a, a.clone(), base=1.0))
    0.0
    """
    z = torch.cat([x, y])
    d2 = torch.cdist(z, z).pow(2)
    if base is None:
        n = len(z)
        base = float(d2.detach().sum() / max(n * (n - 1), 1)) or 1.0
    k = sum(torch.exp(-d2 / (s * base)) for s in scales)
    n = len(x)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean()


def mmd_penalty(store: Dict[str, torch.Tensor], layers: Sequence[str], poisoned: torch.Tensor) -> torch.Tensor:
    """Sum over ``layers`` of MMD^2 between the batch's clean and poisoned samples' flattened
    activations (``store``: the captured outputs); zero when the batch lacks either kind."""
    poisoned = poisoned.bool()
    if not poisoned.any() or poisoned.all():
        return torch.zeros(())
    total = torch.zeros(())
    for layer in layers:
        acts = store[layer].flatten(1).float()
        total = total + gaussian_mmd2(acts[~poisoned], acts[poisoned])
    return total
