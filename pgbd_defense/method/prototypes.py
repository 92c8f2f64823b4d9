"""Class prototypes and Prototype Activation Vectors (PAVs) in one layer's activation space.

For class c, the activations f(x) (flattened output of the chosen layer, model in
eval mode) of the clean samples of c are clustered with k-means (3 clusters);
the prototype P_c is the mean of the centroids. The pure PAV of class c is
V_c = P_t(c) - P_c, with t(c) the attack label of class c.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans, MiniBatchKMeans

from ..datasets.batches import EVAL_BATCH_SIZE, Normalizer, iterate
from ..util.hooks import capture, eval_mode

log = logging.getLogger(__name__)


@torch.no_grad()  # not inference_mode: callers train on these activations (the mapping)
def collect_activations(model: torch.nn.Module, layer_name: str, images: torch.Tensor,
                        normalize: Normalizer, batch_size: int = EVAL_BATCH_SIZE, device: str = "cpu",
                        flatten: bool = True) -> torch.Tensor:
    """Activations of ``layer_name`` for ``images`` (N x D, or the layer's own shape with
    ``flatten=False``), model in eval mode."""
    out: List[torch.Tensor] = []
    dummy = torch.zeros(len(images), dtype=torch.int64)
    with eval_mode(model), capture(model, layer_name) as store:
        for x, _, _ in iterate(images, dummy, batch_size, normalize, device=device):
            model(x)
            out.append((store[layer_name].flatten(1) if flatten else store[layer_name]).cpu())
    return torch.cat(out)


def kmeans_centroids(acts: torch.Tensor, n_clusters: int, seed: int) -> torch.Tensor:
    """k-means centroids (k x D) of ``acts``; fewer clusters when there are fewer samples."""
    k = min(n_clusters, len(acts))
    if k < 1:
        raise ValueError("no activations to cluster")
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(acts.double().numpy())
    return torch.from_numpy(km.cluster_centers_).float()


@dataclass
class Prototypes:
    """Per-class k-means centroids; ``None`` for a class with no clean sample."""

    centroids: List[Optional[torch.Tensor]]

    @property
    def num_classes(self) -> int:
        return len(self.centroids)

    @property
    def available(self) -> torch.Tensor:
        return torch.tensor([c is not None for c in self.centroids])

    def means(self) -> torch.Tensor:
        """P (K x D): each class's prototype, the mean of its centroids (zeros where unavailable)."""
        dim = next(c.shape[1] for c in self.centroids if c is not None)
        return torch.stack([c.mean(0) if c is not None else torch.zeros(dim) for c in self.centroids])


def _check_class_size(c: int, n: int, n_clusters: int) -> bool:
    if n == 0:
        warnings.warn(f"class {c} has no clean sample: it gets no prototype and no sanitization term")
        return False
    if n < n_clusters:
        warnings.warn(f"class {c} has {n} clean samples, fewer than {n_clusters} clusters: using {n} cluster(s) for it")
    return True


def estimate_prototypes(acts: torch.Tensor, labels: torch.Tensor, num_classes: int,
                        n_clusters: int = 3, seed: int = 0) -> Prototypes:
    """Prototypes from activations already in memory (N x D)."""
    centroids: List[Optional[torch.Tensor]] = []
    for c in range(num_classes):
        a = acts[labels == c]
        centroids.append(kmeans_centroids(a, n_clusters, seed) if _check_class_size(c, len(a), n_clusters) else None)
    return Prototypes(centroids)


# k-means holds the float32 activations and a float64 copy: 12 bytes per value.
_BYTES_PER_VALUE = 12


def stream_prototypes(model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor,
                      normalize: Normalizer, num_classes: int, n_clusters: int = 3, seed: int = 0,
                      memory_budget_mb: float = 1024, batch_size: int = 256, device: str = "cpu",
                      passes: int = 3) -> Prototypes:
    """Prototypes without holding the activations of all of D_S at once.

    Each class is clustered on its own; a class whose activations would need more
    than ``memory_budget_mb`` is clustered by scikit-learn's MiniBatchKMeans, fed
    batch by batch from the forward pass (``passes`` times over the class), so peak
    memory stays near one batch of activations. The choice is logged per class."""
    dim = collect_activations(model, layer, images[:1], normalize, 1, device).shape[1]
    centroids: List[Optional[torch.Tensor]] = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        if not _check_class_size(c, len(idx), n_clusters):
            centroids.append(None)
            continue
        need_mb = len(idx) * dim * _BYTES_PER_VALUE / 2**20
        if need_mb <= memory_budget_mb:
            acts = collect_activations(model, layer, images[idx], normalize, device=device)
            centroids.append(kmeans_centroids(acts, n_clusters, seed))
            continue
        log.info("class %d: %d x %d activations need %.0f MB > budget %.0f MB: streaming MiniBatchKMeans",
                 c, len(idx), dim, need_mb, memory_budget_mb)
        centroids.append(_minibatch_centroids(model, layer, images[idx], normalize, n_clusters, seed,
                                              max(batch_size, n_clusters), device, passes))
    return Prototypes(centroids)


def _minibatch_centroids(model, layer, images, normalize, n_clusters, seed, batch_size, device, passes):
    k = min(n_clusters, len(images))
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(passes):
        order = torch.randperm(len(images), generator=gen)
        for start in range(0, len(images), batch_size):
            chunk = order[start : start + batch_size]
            km.partial_fit(collect_activations(model, layer, images[chunk], normalize, batch_size, device).numpy())
    return torch.from_numpy(km.cluster_centers_).float()


def match_clusters(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Permutation ``perm`` so that ``new[perm[i]]`` is the cluster of the new k-means
    run closest to ``old[i]`` (a minimum-cost one-to-one assignment): k-means labels
    its clusters arbitrarily, so blending by index would mix unrelated clusters."""
    cost = torch.cdist(old.double(), new.double()).pow(2).numpy()
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def blend(old: Prototypes, fresh: Prototypes, alpha: float) -> Prototypes:
    """Moving average of centroids, matched cluster to cluster: alpha*fresh + (1-alpha)*old."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    out: List[Optional[torch.Tensor]] = []
    for o, f in zip(old.centroids, fresh.centroids):
        if o is None or f is None or o.shape != f.shape:
            out.append(f if f is not None else o)
            continue
        out.append(alpha * f[match_clusters(o, f)] + (1 - alpha) * o)
    return Prototypes(out)


def pure_pavs(prototypes: torch.Tensor, targets: torch.Tensor, available: Optional[torch.Tensor] = None):
    """PAVs V_c = P_t(c) - P_c (K x D) and the mask of classes that get a sanitization term.

    ``targets[c]`` is the attack label of class c (all2one: the same t for every c;
    all2all: c+1 mod K), or -1 where unknown. The target class itself, classes
    without a target and classes lacking a prototype are masked out."""
    k = prototypes.shape[0]
    if targets.shape != (k,):
        raise ValueError(f"targets must map each of the {k} classes to a label, got shape {tuple(targets.shape)}")
    if available is None:
        available = torch.ones(k, dtype=torch.bool)
    valid_target = (targets >= 0) & (targets < k)
    safe_t = targets.clamp(0, k - 1)
    active = valid_target & (safe_t != torch.arange(k)) & available & available[safe_t]
    pavs = prototypes[safe_t] - prototypes
    pavs[~active] = 0.0
    return pavs, active


def shift_pavs(clean_means: torch.Tensor, shifted_means: torch.Tensor, targets: torch.Tensor,
               available: Optional[torch.Tensor] = None):
    """ST-PGBD's PAVs V_c = P'_c - P_c, with P'_c the prototype of class c's samples carrying
    the synthesized trigger, and the mask of classes that get a sanitization term (the
    target class, classes without a target and classes lacking either prototype are out)."""
    k = clean_means.shape[0]
    if targets.shape != (k,) or shifted_means.shape != clean_means.shape:
        raise ValueError(f"need {k} targets and matching prototype sets, got {tuple(targets.shape)}, "
                         f"{tuple(clean_means.shape)} and {tuple(shifted_means.shape)}")
    if available is None:
        available = torch.ones(k, dtype=torch.bool)
    active = (targets >= 0) & (targets < k) & (targets != torch.arange(k)) & available
    pavs = shifted_means - clean_means
    pavs[~active] = 0.0
    return pavs, active
