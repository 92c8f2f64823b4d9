"""The baselines' own terms against hand computation, and each one end to end on a tiny record."""

import json

import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses import DEFENSES
from pgbd_defense.defenses.ftsam import FTSAMConfig, FTSAMMethod, sam_perturbation
from pgbd_defense.defenses.ibau import IBAUConfig, fit_perturbation, implicit_hypergradient, inner_loss, perturbed_count
from pgbd_defense.defenses.ibau import flip_rate as ibau_flip_rate
from pgbd_defense.defenses.nad import attention_loss, attention_map
from pgbd_defense.run import main

from .test_records import _write


def test_attention_map_is_the_normalized_channel_mean_of_squares():
    f = torch.tensor([[[[1.0, 2.0]], [[3.0, -4.0]]]])  # (1, 2 channels, 1, 2)
    # mean over channels of F^2: [(1 + 9)/2, (4 + 16)/2] = [5, 10] -> / sqrt(125)
    expected = torch.tensor([[5.0, 10.0]]) / 125 ** 0.5
    assert torch.allclose(attention_map(f, 2.0), expected)


def test_attention_loss_is_the_mean_squared_difference_of_normalized_maps():
    s = torch.tensor([[[[1.0, 0.0]]]])  # map [1, 0]
    t = torch.tensor([[[[0.0, 3.0]]]])  # map [0, 1]
    assert attention_loss(s, t).item() == pytest.approx((1 + 1) / 2)
    x = torch.randn(3, 4, 5, 5)
    assert attention_loss(x, 7 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-free, as NAD intends


def test_sam_perturbation_has_radius_rho_in_its_geometry():
    torch.manual_seed(0)
    w = [torch.randn(3, 4), torch.randn(5)]
    g = [torch.randn(3, 4), torch.randn(5)]
    plain = sam_perturbation(w, g, rho=0.7, adaptive=False)
    assert torch.sqrt(sum((e ** 2).sum() for e in plain)).item() == pytest.approx(0.7)
    assert torch.allclose(plain[0] / g[0], plain[0].flatten()[0] / g[0].flatten()[0] * torch.ones(3, 4))
    adaptive = sam_perturbation(w, g, rho=2.0, adaptive=True, eta=0.01)
    scaled = [e / (wi.abs() + 0.01) for e, wi in zip(adaptive, w)]
    assert torch.sqrt(sum((s ** 2).sum() for s in scaled)).item() == pytest.approx(2.0)


def test_sam_step_applies_the_gradient_taken_at_the_perturbed_weights():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = FTSAMConfig(lr=0.1, momentum=0.0, weight_decay=0.0, rho=0.5, adaptive=False, label_smoothing=0.0)
    w0 = [p.detach().clone() for p in model.parameters()]
    g0 = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    eps = sam_perturbation(w0, g0, 0.5, adaptive=False)
    probe = nn.Linear(4, 3)
    with torch.no_grad():
        probe.weight.copy_(w0[0] + eps[0])
        probe.bias.copy_(w0[1] + eps[1])
    g_sharp = torch.autograd.grad(F.cross_entropy(probe(x), y), list(probe.parameters()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    FTSAMMethod(cfg).step(model, x, y, {}, opt, 0)
    for p, w, g in zip(model.parameters(), w0, g_sharp):
        assert torch.allclose(p, w - 0.1 * g, atol=1e-6)


def test_implicit_hypergradient_matches_the_closed_form_total_derivative():
    """inner G = 1/2 ||delta - A theta||^2 (minimized) has delta* = A theta; for outer
    L(theta, delta) the total derivative is dL/dtheta + A^T dL/ddelta."""
    torch.manual_seed(0)
    A = torch.randn(3, 2, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    theta = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def inner(d):
        return 0.5 * (d - A @ theta).pow(2).sum()

    def outer(d):
        return (d * b).sum() + (d ** 2).sum() + theta.pow(3).sum()

    delta_star = (A @ theta).detach()
    (got,) = implicit_hypergradient([theta], delta_star, inner, outer, eta=0.5, iters=60)
    total = torch.autograd.grad(outer(A @ theta), theta)[0]  # differentiates through delta*(theta)
    assert torch.allclose(got, total, atol=1e-10)
    (no_implicit,) = implicit_hypergradient([theta], delta_star, inner, outer, eta=0.5, iters=0)
    assert not torch.allclose(no_implicit, total, atol=1e-3)  # the implicit term is what makes it right


def test_implicit_hypergradient_takes_k_neumann_terms():
    """With explicit Jacobians: J = dPsi/ddelta, M = dPsi/dtheta, g = dL/ddelta; K terms give
    dL/dtheta + M^T sum_{k<K} (J^T)^k g (the sources' fixed_point starts v at zero)."""
    torch.manual_seed(1)
    C = torch.randn(3, 3, dtype=torch.float64)
    H = C @ C.T / 3 + torch.eye(3, dtype=torch.float64)  # inner Hessian
    B = torch.randn(3, 2, dtype=torch.float64)
    theta = torch.randn(2, dtype=torch.float64, requires_grad=True)
    delta = torch.randn(3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64)

    def inner(d):
        return 0.5 * d @ H @ d - d @ (B @ theta) + 0.1 * (d ** 4).sum()

    def outer(d):
        return torch.tanh(d) @ w + (theta ** 2).sum() * d.sum()

    eta = 0.2
    d = delta.clone().requires_grad_(True)

    def inner_at(x, th):
        return 0.5 * x @ H @ x - x @ (B @ th) + 0.1 * (x ** 4).sum()

    def psi(x, th):  # the fixed-point map delta - eta grad_delta G
        return x - eta * torch.autograd.functional.jacobian(lambda z: inner_at(z, th), x, create_graph=True)

    J = torch.autograd.functional.jacobian(lambda x: psi(x, theta.detach()), delta)
    M = torch.autograd.functional.jacobian(lambda th: psi(delta, th), theta.detach())
    g = torch.autograd.grad(outer(d), d)[0]
    direct = torch.autograd.grad(outer(delta), theta)[0]
    for K in (0, 1, 3):
        v = sum((torch.linalg.matrix_power(J.T, k) @ g for k in range(K)), torch.zeros(3, dtype=torch.float64))
        (got,) = implicit_hypergradient([theta], delta, inner, outer, eta=eta, iters=K)
        assert torch.allclose(got, direct + M.T @ v, atol=1e-10), K


def test_perturbed_count_is_the_sources_share_but_never_none():
    assert perturbed_count(256, 0.01) == 2  # BackdoorBench's batch
    assert perturbed_count(100, 0.01) == 1  # the release's batch
    assert perturbed_count(64, 0.01) == 1  # the sources would perturb int(0.64) = 0
    assert perturbed_count(16, 0.5) == 8 and perturbed_count(3, 1.0) == 3


def test_ibau_inner_loss_is_negative_cross_entropy_plus_norm_penalty():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    delta = torch.randn(1, 3, 2, 2)
    logits = model(x + delta)
    by_hand = -(-logits.log_softmax(1)[torch.arange(5), y]).mean() + 0.001 * (delta ** 2).sum()
    assert inner_loss(model, x, y, delta, 0.001).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_ibau_perturbation_becomes_a_trigger_on_a_backdoored_model():
    """A linear model whose class 0 fires on one input direction: the fitted delta (one SGD
    step per batch against the model's own predictions) finds that direction and flips
    every image."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([0.0, 1.0]))
        model[1].weight[0, 5] = 3.0  # the "trigger" pixel pushes every input to class 0
    images = torch.randint(0, 60, (64, 1, 4, 4), dtype=torch.uint8)
    data = ImageSet(images, torch.ones(64, dtype=torch.long))
    norm = Normalizer([0.0], [1.0], 1)
    cfg = IBAUConfig(batch_size=16, pert_lr=10.0)
    delta = fit_perturbation(model, data, norm, cfg, torch.Generator().manual_seed(0), False, "cpu")
    assert delta.flatten().abs().argmax().item() == 5
    assert ibau_flip_rate(model, data, delta, norm, "cpu") == 1.0
    assert model[1].weight[0, 5].item() == 3.0  # fitting delta leaves the model alone
    # ... and computes no gradient for its weights (only delta is fitted), which stay trainable after
    assert all(q.grad is None and q.requires_grad for q in model.parameters())


# What a defense writes besides BackdoorBench's common files and its <name>_df.csv.
EXTRA_FILES = {"nad": ["nad_te_df.csv"], "mcl": ["mcl_trigger.png"], "st-pgbd": ["synthesized_trigger.png"]}


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_each_defense_runs_from_the_command_line(tmp_path, tiny_data, defense):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    argv = ["--record", str(folder), "--data-root", str(tiny_data), "--defense", defense, "--epochs", "2",
            "--te-epochs", "1", "--batch-size", "16", "--ratio", "0.5", "--st-steps", "20",
            "--mcl-inversion-steps", "20"]
    assert main([*argv, "--no-progress"]) == 0
    out = folder / "defense" / defense
    for name in ["defense_result.pt", "summary.json", "index.txt", f"{defense}_df.csv",
                 *EXTRA_FILES.get(defense, [])]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == defense and 0 <= summary["ca"] <= 1
    if defense == "i-bau":  # per round: delta's norm and its flip rate on the held-out clean share
        rounds = pd.read_csv(out / "i-bau_df.csv")
        assert (rounds["pert_norm"] > 0).all() and rounds["pert_flip_rate_heldout"].between(0, 1).all()
