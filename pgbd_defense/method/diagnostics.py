"""Whether PGBD's sanitization term is doing anything, per epoch (``--diagnostics``).

Evaluation only: computed after an epoch on fixed samples, in eval mode, without touching
the parameters' gradients, the optimizer or any random state, so a run with diagnostics
trains exactly as one without. Nothing here is read by the epoch selection.

- ``term_mean``: L_s's per-sample value (the run's loss form) averaged over the probe
  samples whose class gets the term.
- ``term_active_share``: the share of those samples whose prototype-loss gradient points
  towards the target (cos(g, V_c) > 0): where the ``relu_cos`` hinge is non-zero, and where
  the paper's ``cos`` still has something to push against.
- ``term_grad_share``: ||lambda dL_s/da|| / (||dCE/da|| + ||lambda dL_s/da||) at the chosen
  layer's activations a, over the probe batch, with the run's reduction and lambda: 0 when
  the term contributes nothing to the update that reaches the layer, 1 when it is all of it.
- ``pav_trigger_alignment`` (when the record's poisoned test images are given): the mean over
  classes c of cos(V_c, mean f(x + trigger) - mean f(x)) over test images x of class c, with
  the PAVs the run is using and the activations of the current model: how well the term's
  direction points along where the trigger really moves a sample.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..datasets.batches import Normalizer
from ..util.hooks import capture, eval_mode
from .alignment import paired_poisoned
from .loss import sample_cosines, shaped
from .prototypes import collect_activations

PROBE_SIZE = 256  # training samples the term is measured on (the first ones: fixed across epochs)
MAX_POISONED = 500  # poisoned test images per epoch for the alignment


def term_diagnostics(model: torch.nn.Module, layer: str, images: torch.Tensor, labels: torch.Tensor,
                     normalize: Normalizer, prototypes: torch.Tensor, pavs: torch.Tensor, active: torch.Tensor,
                     lam: float, form: str, reduction: str, device: str = "cpu") -> Dict[str, float]:
    """The term's size, active share and gradient share on ``images`` (one batch, uint8)."""
    labels = labels.to(device)
    x = normalize(images.to(device))
    weight = active.to(device)[labels].float()
    with eval_mode(model), capture(model, layer) as store, torch.enable_grad():
        logits = model(x)
        acts = store[layer]
        flat = acts.flatten(1)
        cos = sample_cosines(flat, labels, prototypes.to(device), pavs.to(device))
        per_sample = shaped(cos, form) * weight
        ls = per_sample.sum() / (len(labels) if reduction == "mean" else 1)
        per_sample, cos = per_sample.detach(), cos.detach()
        ce = F.cross_entropy(logits, labels)
        (g_ce,) = torch.autograd.grad(ce, acts, retain_graph=True)
        g_ls = torch.autograd.grad(lam * ls, acts, allow_unused=True)[0] if lam else None
    n_active = float(weight.sum())
    ce_norm = float(g_ce.norm())
    ls_norm = float(g_ls.norm()) if g_ls is not None else 0.0
    return {
        "term_mean": float(per_sample.sum()) / n_active if n_active else float("nan"),
        "term_active_share": float(((cos > 0).float() * weight).sum()) / n_active if n_active else float("nan"),
        "term_grad_share": ls_norm / (ce_norm + ls_norm) if ce_norm + ls_norm > 0 else float("nan"),
    }


def pav_trigger_alignment(model: torch.nn.Module, layer: str, triggered: torch.Tensor, plain: torch.Tensor,
                          labels: torch.Tensor, pavs: torch.Tensor, active: torch.Tensor, normalize: Normalizer,
                          device: str = "cpu") -> float:
    """Mean over the active classes with poisoned test images of cos(V_c, the true trigger shift)."""
    shift = (collect_activations(model, layer, triggered, normalize, device=device)
             - collect_activations(model, layer, plain, normalize, device=device))
    values = []
    for c in range(len(pavs)):
        rows = labels == c
        if not bool(active[c]) or not bool(rows.any()) or float(pavs[c].norm()) == 0:
            continue
        values.append(float(F.cosine_similarity(pavs[c].cpu().float(), shift[rows].mean(0), dim=0)))
    return sum(values) / len(values) if values else float("nan")


def poisoned_pairs(bd_test, clean_test, limit: int = MAX_POISONED) -> Optional[Tuple[torch.Tensor, ...]]:
    """(triggered, the same images clean, their true labels): the first ``limit`` of the record's
    poisoned test set, or None when it has none."""
    if bd_test is None or len(bd_test) == 0:
        return None
    return tuple(t[:limit] for t in paired_poisoned(bd_test, clean_test))
