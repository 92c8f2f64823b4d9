"""PGBD's terms beyond the paper's one (issue 20's study settings): lambda set per batch so the
term is a fixed share of the gradient, the term at more layers, and NT-PGBD's cycling term
added to the known target's. Each against a literal computation on a small model."""

import pytest
import torch
import torch.nn.functional as F

from pgbd_defense import datasets as data_mod
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses.loop import finetune
from pgbd_defense.defenses.pgbd import PGBDConfig, PGBDMethod
from pgbd_defense.errors import ConfigError
from pgbd_defense.formats.models import build_model
from pgbd_defense.method.pav_sources import SanitizationState, nt_target
from pgbd_defense.util.hooks import capture

NORM = Normalizer((0.5,), (0.5,), 1)
SMALL = {"augment": False, "scheduler_interval": "batch", "cos_t_max": 0}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _state(dim, g):
    """Random prototypes and PAVs for 3 classes; class 2 is the target (no term)."""
    means, pavs = torch.randn(3, dim, generator=g), torch.randn(3, dim, generator=g)
    pavs[2] = 0
    return SanitizationState(None, means, pavs, torch.tensor([True, True, False]))


def _literal_term(a, y, state, form):
    """L_s summed over the batch, one sample at a time: cos(2 (a_i - P_c), V_c), shaped."""
    terms = []
    for i in range(len(y)):
        c = int(y[i])
        if bool(state.active[c]):
            cos = F.cosine_similarity(2 * (a[i] - state.means[c]), state.pavs[c], dim=0)
            terms.append(cos.clamp_min(0) if form == "relu_cos" else cos)
    return torch.stack(terms).sum()


def _literal_loss(model, x, y, states, share, form):
    """CE + sum over the layers '1' and '2' of lambda_l * L_s,l with lambda_l from the two
    gradients at that layer, each layer's output taken as the leaf of its own graph."""
    prefix = {"1": lambda v: model[1](model[0](v)), "2": lambda v: model[2](model[1](model[0](v)))}
    suffix = {"1": lambda a: model[3](model[2](a)), "2": lambda a: model[3](a)}
    lams, parts = [], []
    for layer, state in states.items():
        a = prefix[layer](x).detach().requires_grad_(True)
        ce = F.cross_entropy(suffix[layer](a), y)
        ls = _literal_term(a, y, state, form)
        (g_ce,) = torch.autograd.grad(ce, a)
        (g_s,) = torch.autograd.grad(ls, a)
        lam = share / (1 - share) * float(g_ce.norm()) / float(g_s.norm())
        assert float((lam * g_s).norm()) / (float(g_ce.norm()) + float((lam * g_s).norm())) == pytest.approx(share)
        lams.append(lam)
        parts.append(ls.detach())
    ce = F.cross_entropy(model(x), y)
    return ce + sum(lam * p for lam, p in zip(lams, parts)), lams


def _method(**kw):
    kw = {"form": "cos", **kw}
    cfg = PGBDConfig(layer="1", lr=0.1, weight_decay=0.0, grad_clip=0.0, reduction="sum", **kw)
    return PGBDMethod(cfg, torch.tensor([2, 2, -1]))


def test_grad_share_lambda_gives_the_term_its_share_at_every_layer_and_steps_on_that_loss():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    states = {"1": _state(6, g), "2": _state(6, g)}
    method = _method(lambda_mode="grad_share", grad_share=0.3, extra_layers=("2",))
    model = _model()
    for term, layer in zip(method.terms, ("1", "2")):
        term.state = states[layer]
    expected, lams = _literal_loss(model, x, y, states, 0.3, "cos")
    # The update must treat lambda as a constant: SGD's first step is w - lr * grad of the loss above.
    ref = _model()
    ce = F.cross_entropy(ref(x), y)
    total = ce
    for lam, layer in zip(lams, ("1", "2")):
        a = ref[1](ref[0](x)) if layer == "1" else ref[2](ref[1](ref[0](x)))
        total = total + lam * _literal_term(a, y, states[layer], "cos")
    total.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with method.hooks(model) as store:
        out = method.step(model, x, y, store, opt, epoch=0)
    assert float(out["loss"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out["lambda"]) == pytest.approx(sum(lams) / 2, rel=1e-5)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p.detach(), q.detach() - 0.1 * q.grad, atol=1e-6)


def test_grad_share_lambda_is_zero_when_the_hinge_is_silent():
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(6, 1, 4, 4, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])
    model = _model()
    with torch.no_grad(), capture(model, "1") as store:
        model(x)
    acts = store["1"]
    state = _state(6, g)
    state.means[:2] = 0.0
    state.pavs[0], state.pavs[1] = -acts[y == 0].mean(0), -acts[y == 1].mean(0)  # every deviation points away
    method = _method(lambda_mode="grad_share", form="relu_cos")
    method.terms[0].state = state
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with method.hooks(model) as store:
        out = method.step(model, x, y, store, opt, epoch=0)
    assert float(out["sanitization"]) == 0.0 and float(out["lambda"]) == 0.0
    assert float(out["loss"]) == pytest.approx(float(out["ce"]))


def test_fixed_lambda_with_two_layers_sums_both_terms():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 1, 4, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    states = {"1": _state(6, g), "2": _state(6, g)}
    method = _method(lam=2.5, extra_layers=("2",))
    model = _model()
    for term, layer in zip(method.terms, ("1", "2")):
        term.state = states[layer]
    a1 = model[1](model[0](x))
    a2 = model[2](a1)
    expected = F.cross_entropy(model[3](a2), y) + 2.5 * (_literal_term(a1, y, states["1"], "cos")
                                                         + _literal_term(a2, y, states["2"], "cos"))
    with method.hooks(model) as store:
        out = method.step(model, x, y, store, torch.optim.SGD(model.parameters(), lr=0.0), epoch=0)
    assert float(out["loss"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert "lambda" not in out  # the fixed mode logs what it always logged


@pytest.mark.parametrize("kw, words", [
    ({"nt_addition": True, "variant": "nt"}, "nt_addition"),
    ({"grad_share": 1.0}, "grad_share"),
    ({"lambda_mode": "adaptive"}, "lambda_mode"),
    ({"extra_layers": ("1",)}, "repeat"),
])
def test_bad_term_settings_are_refused_naming_the_setting(kw, words):
    with pytest.raises(ConfigError, match=words):
        PGBDConfig(layer="1", **kw)


def _tiny(tiny_data):
    return data_mod.load_split("mnist", str(tiny_data), train=True)


def test_nt_addition_keeps_the_known_target_and_cycles_a_second_term(tiny_data):
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    cfg = PGBDConfig(epochs=3, lr=1e-3, lam=1.0, nt_addition=True, cycle=1, **SMALL)
    seen = []

    class Spy(PGBDMethod):
        def begin_epoch(self, epoch, *a):
            super().begin_epoch(epoch, *a)
            known, cycling = self.terms
            assert known.layer == cycling.layer == self.layer
            m = known.state.means
            expected_known = m[0] - m
            expected_known[0] = 0
            assert torch.allclose(known.state.pavs, expected_known)
            t = nt_target(epoch, 1, range(10))
            expected = cycling.state.means[t] - cycling.state.means
            expected[t] = 0
            assert torch.allclose(cycling.state.pavs, expected)
            seen.append(t)

    method = Spy(cfg, torch.zeros(10, dtype=torch.int64))
    finetune(model, method, _tiny(tiny_data), NORM)
    assert seen == [0, 1, 2]


def test_extra_layer_terms_survive_a_checkpoint_round_trip(tiny_data):
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    cfg = PGBDConfig(epochs=1, lr=1e-3, lam=1.0, extra_layers=("layer3.1.conv2",), **SMALL)
    method = PGBDMethod(cfg, torch.zeros(10, dtype=torch.int64))
    finetune(model, method, _tiny(tiny_data), NORM)
    main, extra = method.terms
    assert extra.layer == "layer3.1.conv2" and main.layer != extra.layer
    assert main.state.pavs.shape[1] != extra.state.pavs.shape[1]  # each term in its own layer's space
    again = PGBDMethod(cfg, torch.zeros(10, dtype=torch.int64))
    again.load_state_dict(method.state_dict(), model, "cpu")
    for a, b in zip(method.terms, again.terms):
        assert a.layer == b.layer
        assert torch.equal(a.state.pavs, b.state.pavs) and torch.equal(a.state.means, b.state.means)
    single = PGBDMethod(PGBDConfig(epochs=1, lam=1.0, **SMALL), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ConfigError, match="terms"):
        single.load_state_dict(method.state_dict(), model, "cpu")
