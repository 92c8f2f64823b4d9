"""The sanitization term's per-epoch diagnostics (``--diagnostics``): each number against a slow,
literal computation on a small model, and a run with them trains exactly as one without."""

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from pgbd_defense import run as run_module
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.formats.records import load_defense_result
from pgbd_defense.method.diagnostics import pav_trigger_alignment, term_diagnostics

from .test_records import _write

NORM = Normalizer((0.5,), (0.5,), 1)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _literal(model, images, labels, protos, pavs, active, lam, form, reduction):
    """Per sample, from the activations a of layer '1' treated as the leaf: the term's values,
    whether g = 2(a - P_c) points towards V_c, and the gradients of CE and lambda L_s on a."""
    a = model[1](model[0](NORM(images))).detach().requires_grad_(True)
    logits = model[3](model[2](a))
    terms, towards = [], []
    for i in range(len(labels)):
        c = int(labels[i])
        if not bool(active[c]):
            continue
        cos = F.cosine_similarity(2 * (a[i] - protos[c]), pavs[c], dim=0)
        towards.append(float(cos.detach()) > 0)
        terms.append({"cos": cos, "abs_cos": cos.abs(), "relu_cos": cos.clamp_min(0)}[form])
    ls = torch.stack(terms).sum() / (len(labels) if reduction == "mean" else 1)
    (g_ce,) = torch.autograd.grad(F.cross_entropy(logits, labels), a)
    (g_ls,) = torch.autograd.grad(lam * ls, a)
    return ([float(t) for t in terms], towards, float(g_ce.norm()), float(g_ls.norm()))


@pytest.mark.parametrize("form, reduction", [("cos", "sum"), ("relu_cos", "mean"), ("abs_cos", "sum")])
def test_term_numbers_equal_the_literal_computation(form, reduction):
    model = _model()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 1, 2] * 4)
    protos, pavs = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    active = torch.tensor([True, True, False])  # class 2 is the target: no term
    pavs[2] = 0
    out = term_diagnostics(model, "1", images, labels, NORM, protos, pavs, active, 10.0, form, reduction)
    terms, towards, ce_norm, ls_norm = _literal(model, images, labels, protos, pavs, active, 10.0, form, reduction)
    assert out["term_mean"] == pytest.approx(sum(terms) / len(terms), abs=1e-6)
    assert out["term_active_share"] == pytest.approx(sum(towards) / len(towards))
    assert out["term_grad_share"] == pytest.approx(ls_norm / (ce_norm + ls_norm), rel=1e-5)
    assert 0 < out["term_active_share"] < 1  # the random case has samples on both sides
    assert all(p.grad is None for p in model.parameters())  # the parameters' gradients are untouched


def test_no_lambda_no_gradient_share_and_a_known_alignment():
    model = _model()
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    protos, pavs = torch.zeros(3, 6), torch.ones(3, 6)
    active = torch.tensor([True, True, False])
    out = term_diagnostics(model, "1", images, labels, NORM, protos, pavs, active, 0.0, "relu_cos", "sum")
    assert out["term_grad_share"] == 0.0
    # The trigger moves layer 1's activations by the linear map of its pixel change: the PAV set to that
    # shift is aligned (cos 1), its opposite anti-aligned (cos -1).
    plain = torch.full((4, 1, 4, 4), 100, dtype=torch.uint8)
    triggered = plain.clone()
    triggered[:, :, 0, 0] = 255
    shift = model[1](model[0](NORM(triggered))) - model[1](model[0](NORM(plain)))
    true_shift = shift.mean(0).detach()
    which = torch.tensor([0, 0, 1, 1])
    for sign in (1.0, -1.0):
        pavs = torch.stack([sign * true_shift, sign * true_shift, torch.zeros(6)])
        value = pav_trigger_alignment(model, "1", triggered, plain, which, pavs, active, NORM)
        assert value == pytest.approx(sign, abs=1e-5)


def test_a_run_with_diagnostics_trains_exactly_as_without_and_logs_them(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    cli = ["--record", str(folder), "--data-root", str(tiny_data), "--epochs", "2", "--batch-size", "8",
           "--ratio", "1.0", "--lr", "0.05", "--lambda", "1", "--no-progress"]
    assert run_module.main([*cli, "--defense-name", "plain"]) == 0
    assert run_module.main([*cli, "--defense-name", "diagnosed", "--diagnostics"]) == 0
    a = load_defense_result(folder / "defense" / "plain")["model"]
    b = load_defense_result(folder / "defense" / "diagnosed")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((folder / "defense" / "plain" / "summary.json").read_text())
    sb = json.loads((folder / "defense" / "diagnosed" / "summary.json").read_text())
    assert sa["selected_epoch"] == sb["selected_epoch"]
    rows = pd.read_csv(folder / "defense" / "diagnosed" / "diagnosed_df.csv")  # one row per epoch
    assert len(rows) == 2
    for column in ("term_mean", "term_active_share", "term_grad_share", "pav_trigger_alignment"):
        assert rows[column].notna().all() and rows[column].abs().le(1).all(), column
    # the paper's signed cosine keeps a term on every sample (the hinge may fall silent)
    assert run_module.main([*cli, "--defense-name", "signed", "--diagnostics", "--loss-form", "cos"]) == 0
    signed = pd.read_csv(folder / "defense" / "signed" / "signed_df.csv")
    assert (signed["term_mean"] != 0).all() and (signed["term_grad_share"] > 0).all()
