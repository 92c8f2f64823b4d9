"""MCL's loss against its closed form, and what its update may and may not touch."""

import math

import pytest
import torch
import torch.nn as nn

from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import Normalizer, iterate
from pgbd_defense.defenses.loop import make_optimizer
from pgbd_defense.defenses.mcl import MCLConfig, MCLMethod, contrastive_loss, features, penultimate
from pgbd_defense.formats.models import build_model
from pgbd_defense.method.inversion import Trigger
from pgbd_defense.method.pav_sources import single_target


def test_contrastive_loss_is_softplus_of_the_cosine_gap_over_tau():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pos = torch.tensor([[1.0, 1.0], [0.0, 1.0]])  # cos 1/sqrt2, 1
    neg = torch.tensor([[0.0, 3.0], [1.0, 0.0]])  # cos 0, 0
    tau = 0.5
    by_hand = (math.log(1 + math.exp((0 - 2 ** -0.5) / tau)) + math.log(1 + math.exp((0 - 1) / tau))) / 2
    assert contrastive_loss(z, pos, neg, tau).item() == pytest.approx(by_hand, rel=1e-6)
    # the release's form: cross-entropy of [cos+, cos-] / tau with the positive as the label
    logits = torch.stack([torch.cosine_similarity(z, pos), torch.cosine_similarity(z, neg)], 1) / tau
    release = nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long))
    assert contrastive_loss(z, pos, neg, tau).item() == pytest.approx(release.item(), rel=1e-6)


def test_rectified_loss_is_the_loss_on_relu_features():
    torch.manual_seed(0)
    z, pos, neg = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    relu = nn.functional.relu
    assert contrastive_loss(z, pos, neg, 0.5, rectify=True).item() == \
        pytest.approx(contrastive_loss(relu(z), relu(pos), relu(neg), 0.5).item(), rel=1e-6)


def test_penultimate_features_are_the_heads_input():
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.125).eval()
    x = torch.randn(3, 1, 28, 28)
    with penultimate(model) as store:
        logits = model(x)
    assert torch.allclose(model.linear(features(store, model)), logits, atol=1e-6)
    assert features(store, model).shape == (3, model.linear.in_features)


def test_known_target_refuses_all_to_all():
    assert single_target(torch.tensor([-1, 0, 0]), "MCL") == 0
    with pytest.raises(ValueError, match="one target class"):
        single_target(torch.tensor([1, 2, 0]), "MCL")
    with pytest.raises(ValueError, match="MCL needs the trigger of one target class"):
        MCLMethod(MCLConfig(), torch.tensor([1, 2, 0]))


def _method(model, cfg):
    """An MCL method whose stage 1 is a given trigger (stage 2 is what is tested here)."""
    method = MCLMethod(cfg, torch.tensor([-1, 0, 0]))
    mask = torch.zeros(1, 8, 8)
    mask[:, 6:, 6:] = 1.0
    method.trigger = Trigger(target=0, mask=mask, pattern=torch.ones(1, 8, 8), norm=4.0, flip_rate=1.0)
    method._freeze(model, "cpu")
    method.normalizer = Normalizer([0.5], [0.5], 1)
    return method


def test_stage_two_moves_the_features_only_and_never_the_frozen_copy_or_the_head():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    cfg = MCLConfig(lr=0.1, weight_decay=1e-2, batch_size=8)  # weight decay would move a head that got a grad
    method = _method(model, cfg)
    frozen_before = {k: v.clone() for k, v in method.frozen.state_dict().items()}
    head_before = [p.detach().clone() for p in model[5].parameters()]
    conv_before = model[0].weight.detach().clone()
    opt = make_optimizer(model, cfg)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    model.train()
    with method.hooks(model) as store:
        for x, y, _ in iterate(images, torch.zeros(16, dtype=torch.long), 8, method.normalizer):
            out = method.step(model, x, y, store, opt, 0)
            assert torch.isfinite(out["loss"])
    for k, v in method.frozen.state_dict().items():
        assert torch.equal(v, frozen_before[k]), k
    for p, before in zip(model[5].parameters(), head_before):
        assert p.grad is None and torch.equal(p.detach(), before)
    assert not torch.equal(model[0].weight, conv_before)


def test_stamp_is_the_trigger_blend_in_normalized_space():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    method = _method(model, MCLConfig())
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    x = method.normalizer(images)
    expected = method.normalizer(method.trigger.apply(images))  # uint8 stamp; equal here (mask is 0 or 1)
    assert torch.allclose(method.stamp(x), expected, atol=1e-6)


def test_mcl_resumes_with_its_trigger_and_frozen_copy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    method = _method(model, MCLConfig())
    state = method.state_dict()
    with torch.no_grad():
        model[1].weight.add_(1.0)  # the model moved since; the frozen copy must not follow it
    other = MCLMethod(MCLConfig(), torch.tensor([-1, 0, 0]))
    other.load_state_dict(state, model, "cpu")
    assert torch.equal(other.frozen[1].weight, method.frozen[1].weight)
    assert torch.equal(other.trigger.mask, method.trigger.mask) and other.trigger.target == 0
    assert not any(p.requires_grad for p in other.frozen.parameters())


def test_mcl_start_inverts_a_trigger_for_the_target(tmp_path):
    """Stage 1 on a tiny model: it runs the Neural Cleanse search for the given target."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    data = ImageSet(torch.randint(0, 256, (24, 1, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2] * 8))
    method = MCLMethod(MCLConfig(inversion_steps=5, inversion_batch_size=8), torch.tensor([-1, 0, 0]))
    method.normalizer = Normalizer([0.5], [0.5], 1)
    method.start(model, data, method.normalizer, False, "cpu")
    assert method.trigger.target == 0 and method.trigger.mask.shape == (1, 8, 8)
    facts = method.write_artifacts(tmp_path)
    assert (tmp_path / "mcl_trigger.png").is_file() and facts["mcl_trigger"]["target"] == 0
