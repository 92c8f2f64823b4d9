"""PGBD's sanitization loss, computed from the ordinary batch forward pass.

For a clean sample (x, c) with a PAV V_c, the prototype loss L_p = ||f(x) - P_c||^2
has the activation gradient g = 2 (f(x) - P_c) in closed form, so
L_s is one of

- ``cos``: cos(g, V_c), the paper's form. Minimizing it turns g against V_c, which
  also rewards pushing every sample *away* from the target: the loss keeps falling
  (to -1 per sample) however far the features are driven, a degenerate minimum
  that can collapse the model to one class at larger learning rates.
- ``abs_cos``: |cos(g, V_c)|, the authors' release: makes g orthogonal to V_c.
- ``relu_cos``: max(cos(g, V_c), 0), a hinge: it penalizes only a deviation that
  points towards the target and has zero gradient once it points away, so it has
  no reward for running off in the opposite direction.

Each is a differentiable function of the activations the batch
forward pass already produced: no per-sample passes and no second-order autograd.
With BatchNorm frozen (eval mode), a sample's activation does not depend on the
rest of its batch, so this equals the per-sample computation exactly;
:func:`per_sample_reference_loss` is that slow computation, kept for tests and
the cost benchmark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..settings.fields import FIELDS
from ..util.hooks import capture

FORMS = FIELDS["loss_form"].choices  # cos, abs_cos, relu_cos
_EPS = 1e-8
REDUCTIONS = FIELDS["reduction"].choices  # sum, mean


def _check(form: str, reduction: str) -> None:
    if form not in FORMS:
        raise ValueError(f"unknown loss form {form!r}; choose one of {FORMS}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")


def _shaped(cos: torch.Tensor, form: str) -> torch.Tensor:
    if form == "abs_cos":
        return cos.abs()
    if form == "relu_cos":
        return cos.clamp_min(0.0)
    return cos


def sample_cosines(acts: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                   pavs: torch.Tensor) -> torch.Tensor:
    """cos(g, V_c) per sample, g = 2 (f(x) - P_c) the closed-form gradient of L_p (0 where V_c = 0)."""
    grad_lp = 2.0 * (acts - prototypes[labels])
    v = pavs[labels]
    return (grad_lp * v).sum(1) / (grad_lp.norm(dim=1) * v.norm(dim=1)).clamp_min(_EPS)


def shaped(cos: torch.Tensor, form: str) -> torch.Tensor:
    """L_s's per-sample value for a form, from the cosines."""
    _check(form, REDUCTIONS[0])
    return _shaped(cos, form)


def sanitization_loss(acts: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                      pavs: torch.Tensor, active: torch.Tensor, form: str = "cos",
                      reduction: str = "sum") -> torch.Tensor:
    """L_s over a batch.

    Args:
        acts: (B, D) flattened layer activations, part of the autograd graph.
        labels: (B,) true classes.
        prototypes: (K, D) P_c, constants.
        pavs: (K, D) V_c, constants.
        active: (K,) bool, classes that get the term (not the target, PAV known).
        form: ``cos``, ``abs_cos`` or ``relu_cos``.
        reduction: ``sum`` over the batch (the release) or ``mean`` (sum / B).
    """
    _check(form, reduction)
    # Masking by multiplication (no boolean indexing) keeps the batch shape static;
    # inactive classes have V_c = 0, so their cosine is 0 before the mask, too.
    weight = active[labels].to(acts.dtype)
    cos = sample_cosines(acts, labels, prototypes, pavs)
    total = (_shaped(cos, form) * weight).sum()
    return total / len(labels) if reduction == "mean" else total


def pgbd_loss(logits: torch.Tensor, acts: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
              pavs: torch.Tensor, active: torch.Tensor, lam: float, form: str = "cos",
              reduction: str = "sum"):
    """L = mean cross-entropy + lambda * L_s; returns (L, CE, L_s) for logging."""
    ce = F.cross_entropy(logits, labels)
    ls = sanitization_loss(acts, labels, prototypes, pavs, active, form, reduction)
    return ce + lam * ls, ce.detach(), ls.detach()


def per_sample_reference_loss(model: torch.nn.Module, layer: str, inputs: torch.Tensor, labels: torch.Tensor,
                              prototypes: torch.Tensor, pavs: torch.Tensor, active: torch.Tensor, lam: float,
                              form: str = "cos", reduction: str = "sum") -> torch.Tensor:
    """The slow, literal computation: one forward pass per sample, g from autograd
    with ``create_graph=True``, as the authors' release does. Same value as
    :func:`pgbd_loss` when the model is in eval mode."""
    _check(form, reduction)
    ce_terms, ls_terms = [], []
    with capture(model, layer) as store:
        for i in range(len(labels)):
            c = int(labels[i])
            logits = model(inputs[i : i + 1])
            ce_terms.append(F.cross_entropy(logits, labels[i : i + 1]))
            if not bool(active[c]):
                continue
            act = store[layer]
            lp = (act.flatten() - prototypes[c]).pow(2).sum()
            (g,) = torch.autograd.grad(lp, act, create_graph=True)
            ls_terms.append(_shaped(F.cosine_similarity(g.flatten(), pavs[c], dim=0), form))
    ls = torch.stack(ls_terms).sum() if ls_terms else torch.zeros(())
    if reduction == "mean":
        ls = ls / len(labels)
    return torch.stack(ce_terms).mean() + lam * ls
