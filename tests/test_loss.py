"""The batched sanitization loss against the slow per-sample reference that
differentiates the prototype loss with autograd (create_graph), as the release does."""

import pytest
import torch
import torch.nn as nn

from pgbd_defense.formats.models import build_model
from pgbd_defense.method.loss import per_sample_reference_loss, pgbd_loss, sanitization_loss
from pgbd_defense.method.prototypes import pure_pavs
from pgbd_defense.util.hooks import capture


class TinyNet(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                                      nn.Conv2d(5, 6, 3, stride=2, padding=1))
        self.head = nn.Linear(6 * 4 * 4, k)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)).flatten(1))


def _setup(model_fn, layer, k, seed):
    torch.manual_seed(seed)
    model = model_fn().double().eval()
    # Non-trivial BatchNorm statistics, so eval-mode BN actually transforms.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2]) % k  # the target class 0 is in the batch
    with torch.no_grad(), capture(model, layer) as store:
        model(x)
        dim = store[layer].flatten(1).shape[1]
    protos = torch.randn(k, dim, dtype=torch.float64)
    targets = torch.zeros(k, dtype=torch.int64)
    pavs, active = pure_pavs(protos, targets)
    return model, x, y, protos, pavs, active


def _fast(model, layer, x, y, protos, pavs, active, lam, form, reduction):
    with capture(model, layer) as store:
        logits = model(x)
        loss, _, _ = pgbd_loss(logits, store[layer].flatten(1), y, protos, pavs, active, lam, form, reduction)
    return loss


MODELS = [
    (lambda: TinyNet(4), "features.3", 4),
    (lambda: build_model("preactresnet18", 4, in_channels=3, width=0.0625), "layer4.1.conv2", 4),
]


@pytest.mark.parametrize("form", ["cos", "abs_cos", "relu_cos"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("model_idx", [0, 1])
def test_batched_loss_matches_per_sample_autograd_reference(form, reduction, model_idx):
    model_fn, layer, k = MODELS[model_idx]
    model, x, y, protos, pavs, active = _setup(model_fn, layer, k, seed=model_idx)
    lam = 10.0
    fast = _fast(model, layer, x, y, protos, pavs, active, lam, form, reduction)
    fast_grads = torch.autograd.grad(fast, list(model.parameters()))
    ref = per_sample_reference_loss(model, layer, x, y, protos, pavs, active, lam, form, reduction)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert fast.item() == pytest.approx(ref.item(), abs=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), fast_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), name
    # The sanitization term must matter, or the comparison above proves nothing about it.
    plain = _fast(model, layer, x, y, protos, pavs, active, 0.0, form, reduction)
    assert abs(fast.item() - plain.item()) > 1e-3


def test_cos_is_the_cosine_of_the_deviation_with_the_pav():
    acts = torch.tensor([[3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    labels = torch.tensor([1, 1, 0])
    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    pavs, active = pure_pavs(protos, torch.tensor([0, 0]))  # V_1 = P_0 - P_1 = (-1, 0)
    # sample 0: g = 2*(2, 0) -> cos = -1; sample 1: g = 2*(-1, 2) -> cos = 1/sqrt(5); sample 2 is the target class.
    expected_cos = -1.0 + 1.0 / 5 ** 0.5
    expected_abs = 1.0 + 1.0 / 5 ** 0.5
    assert sanitization_loss(acts, labels, protos, pavs, active, "cos", "sum").item() == pytest.approx(expected_cos)
    assert sanitization_loss(acts, labels, protos, pavs, active, "abs_cos", "sum").item() == pytest.approx(expected_abs)
    mean = sanitization_loss(acts, labels, protos, pavs, active, "cos", "mean").item()
    assert mean == pytest.approx(expected_cos / 3)
    # The hinge keeps only the sample that moves towards the target.
    assert sanitization_loss(acts, labels, protos, pavs, active, "relu_cos", "sum").item() == pytest.approx(5 ** -0.5)


def _hand_cos_grad(a, p, v):
    """d cos(2(a - p), v) / d a, written out: 2 * (v / (|g||v|) - cos * g / |g|^2)."""
    g = 2 * (a - p)
    cos = g @ v / (g.norm() * v.norm())
    return 2 * (v / (g.norm() * v.norm()) - cos * g / g.norm() ** 2)


@pytest.mark.parametrize("form", ["cos", "abs_cos", "relu_cos"])
def test_gradients_of_each_form_match_the_hand_derivation(form):
    protos = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    pavs, active = pure_pavs(protos, torch.tensor([0, 0]))  # V_1 = (-1, 0)
    away = torch.tensor([3.0, 0.5])   # g points away from the target: cos < 0
    toward = torch.tensor([0.0, 2.0])  # cos = 1/sqrt(5) > 0
    acts = torch.stack([away, toward]).requires_grad_()
    sanitization_loss(acts, torch.tensor([1, 1]), protos, pavs, active, form, "sum").backward()
    v = pavs[1]
    sign_away = {"cos": 1.0, "abs_cos": -1.0, "relu_cos": 0.0}[form]
    assert torch.allclose(acts.grad[0], sign_away * _hand_cos_grad(away, protos[1], v), atol=1e-6)
    assert torch.allclose(acts.grad[1], _hand_cos_grad(toward, protos[1], v), atol=1e-6)
    if form == "relu_cos":  # no gradient at all for a sample already moving away from the target
        assert torch.all(acts.grad[0] == 0)


def test_batch_of_target_class_only_gives_zero_loss_with_a_graph():
    acts = torch.randn(4, 3, requires_grad=True)
    protos, labels = torch.randn(2, 3), torch.zeros(4, dtype=torch.int64)
    pavs, active = pure_pavs(protos, torch.tensor([0, 0]))
    loss = sanitization_loss(acts, labels, protos, pavs, active)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(acts.grad == 0)


def test_bad_form_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="abs_cos"):
        sanitization_loss(torch.zeros(1, 2), torch.zeros(1, dtype=torch.int64), torch.zeros(2, 2), torch.zeros(2, 2),
                          torch.ones(2, dtype=torch.bool), form="sine")
