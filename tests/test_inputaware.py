"""IAB (attacks/inputaware.py): the generators' shapes, the losses by hand on tiny inputs, the
per-batch bookkeeping of backdoor / cross / clean samples, and the two-stage training on a
tiny problem (the weights move where they should). The registry loops in test_attacks.py cover
its records and test set, and its ASR on Fashion-MNIST."""

import math

import pytest
import torch
from torch import nn

from pgbd_defense.attacks.inputaware import (
    InputAware,
    TriggerNet,
    diversity_loss,
    mask_norm_loss,
    spread_counts,
    threshold,
)
from pgbd_defense.attacks.record import AttackSettings
from pgbd_defense.datasets.batches import Normalizer


@pytest.mark.parametrize("channels, side", [(1, 28), (3, 32), (3, 64), (1, 12)])
def test_trigger_net_keeps_the_image_shape_and_stays_in_unit_range(channels, side):
    torch.manual_seed(0)
    for out in (channels, 1):
        y = TriggerNet(channels, out, side)(torch.randn(3, channels, side, side) * 3)
        assert y.shape == (3, out, side, side)
        assert (y >= 0).all() and (y <= 1).all()


def test_threshold_is_a_steep_step_at_one_half():
    assert float(threshold(torch.tensor(0.5))) == pytest.approx(0.5)
    assert float(threshold(torch.tensor(0.0))) == pytest.approx(0.0, abs=1e-7)
    assert float(threshold(torch.tensor(1.0))) == pytest.approx(1.0, abs=1e-7)
    assert float(threshold(torch.tensor(0.6))) == pytest.approx(math.tanh(2) / 2 + 0.5, abs=1e-6)


def test_diversity_loss_by_hand():
    # two pairs of 1x1x2 "images": distances RMS over the 2 pixels
    x1 = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    x2 = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 3.0]]]])
    p1 = torch.tensor([[[[0.0, 0.0]]], [[[0.0, 0.0]]]])
    p2 = torch.tensor([[[[1.0, 1.0]]], [[[0.0, 2.0]]]])
    # pair 1: sqrt((9 + 16) / 2) / sqrt((1 + 1) / 2); pair 2: sqrt((0 + 4) / 2) / sqrt((0 + 4) / 2)
    expected = (math.sqrt(12.5) / 1.0 + 1.0) / 2
    assert float(diversity_loss(x1, x2, p1, p2)) == pytest.approx(expected, rel=1e-6)
    assert float(diversity_loss(x1[:0], x2[:0], p1[:0], p2[:0])) == 0.0


def test_mask_norm_loss_by_hand():
    masks = torch.tensor([[[[0.0, 0.5], [0.032, 1.0]]]])
    assert float(mask_norm_loss(masks, 0.032)) == pytest.approx((0.5 - 0.032 + 1.0 - 0.032) / 4)


def test_spread_counts_hold_the_exact_share():
    sizes = [128] * 468 + [96]
    for share in (0.01, 0.1, 0.0033):
        counts = spread_counts(sizes, share)
        assert sum(counts) == round(share * sum(sizes))
        assert all(0 <= c <= s for c, s in zip(counts, sizes))
        assert max(counts[:-1]) - min(counts[:-1]) <= 1  # full batches; the last, smaller one in proportion
    assert spread_counts([4, 4], 1.0) == [4, 4]


class _Constant(nn.Module):
    """A stand-in network: every pixel of the output is ``fn(image)``."""

    def __init__(self, fn, channels):
        super().__init__()
        self.fn, self.channels = fn, channels

    def forward(self, x):
        return self.fn(x).view(-1, 1, 1, 1).expand(len(x), self.channels, *x.shape[2:])


def test_training_batch_bookkeeping_by_hand():
    """Backdoor samples carry their own trigger and the target label, cross samples their
    partner's trigger and their own label, the rest pass unchanged."""
    attack = InputAware(num_classes=10, target=3, ratio=0.25)
    attack.masker = _Constant(lambda x: torch.ones(len(x)), 1)  # threshold(1) ~ 1: the pattern replaces the image
    gen = _Constant(lambda x: x.flatten(1).mean(1) / 10, 1)  # pattern: a tenth of the image's mean
    mean, std = torch.tensor(0.0).view(1, 1, 1, 1), torch.tensor(1.0).view(1, 1, 1, 1)
    x = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2).clone()  # image i is all i
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    other = torch.full((2, 1, 2, 2), 50.0)
    inputs, targets, div = attack.training_batch(x, y, other, nb=2, mean=mean, std=std, generator=gen)
    assert torch.allclose(inputs[0], torch.full((1, 2, 2), 0.0), atol=1e-5)
    assert torch.allclose(inputs[1], torch.full((1, 2, 2), 0.1), atol=1e-5)  # its own trigger
    assert torch.allclose(inputs[2:4], torch.full((2, 1, 2, 2), 5.0), atol=1e-5)  # the partner's
    assert torch.equal(inputs[4:], x[4:])
    assert targets.tolist() == [3, 3, 2, 3, 4, 5]
    # diversity over the pairs (x[0], other[0]), (x[1], other[1]): image distance / pattern distance
    expected = ((50 - 0) / (5 - 0) + (50 - 1) / (5 - 0.1)) / 2
    assert float(div) == pytest.approx(expected, rel=1e-5)


def test_joint_training_updates_classifier_and_generator_but_not_the_mask():
    """Stage 2 steps C and G on the same loss and leaves the frozen M as stage 1 left it; after
    training the attack is a fixed per-image function (whether the backdoor takes on real data:
    test_attacks.py's ASR test and the records in docs/attacks.md)."""
    torch.manual_seed(0)
    n, side = 128, 12
    images = torch.randint(0, 256, (n, 1, side, side), dtype=torch.uint8)
    labels = torch.arange(n) % 2
    attack = InputAware(num_classes=2, target=1, ratio=0.25, mask_epochs=0, side=side)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    before = {name: [p.detach().clone() for p in net.parameters()]
              for name, net in (("c", model), ("g", attack.generator), ("m", attack.masker))}
    attack.train_with_classifier(model, images, labels, Normalizer([0.5], [0.5], 1), epochs=1, lr=0.05,
                                 batch_size=32)
    after = {"c": list(model.parameters()), "g": list(attack.generator.parameters()),
             "m": list(attack.masker.parameters())}
    moved = {k: any(not torch.equal(a, b) for a, b in zip(before[k], after[k])) for k in before}
    assert moved == {"c": True, "g": True, "m": False}
    assert not attack.generator.training and not any(p.requires_grad for p in attack.generator.parameters())
    once, again = attack.apply_trigger(images[:8]), attack.apply_trigger(images[:8])
    assert torch.equal(once, again) and once.dtype == torch.uint8 and not torch.equal(once, images[:8])
    # input-aware: two images get different triggers
    with torch.no_grad():
        g = attack.generator(Normalizer([0.5], [0.5], 1)(images[:2]))
    assert (g[0] - g[1]).abs().max() > 1e-4


def test_mask_stage_moves_the_mask_towards_its_density():
    torch.manual_seed(0)
    x = Normalizer([0.5], [0.5], 1)(torch.randint(0, 256, (256, 1, 12, 12), dtype=torch.uint8))
    # the norm loss alone: on random-noise images the diversity loss pulls the other way, and with
    # both the outcome of 24 steps turned on the thread count's rounding
    attack = InputAware(num_classes=2, mask_epochs=3, side=12, lambda_div=0.0)
    with torch.no_grad():
        before = float(threshold(attack.masker(x)).mean())
    stats = attack.train_mask(torch.randint(0, 256, (256, 1, 12, 12), dtype=torch.uint8), Normalizer([0.5], [0.5], 1),
                              32, torch.Generator().manual_seed(0))
    with torch.no_grad():
        after = float(threshold(attack.masker(x)).mean())
    assert after < before and after < 0.2
    assert math.isfinite(stats["mask_diversity"]) and 0 <= stats["mask_share"] <= 1


def test_settings_refuse_mmdr_with_inputaware_and_negative_mask_epochs():
    problems = AttackSettings(attack="inputaware", mmdr_lambda=0.3, iab_mask_epochs=-1).problems()
    assert any("ML-MMDR" in p and "inputaware" in p for p in problems)
    assert any("iab_mask_epochs=-1" in p for p in problems)
    with pytest.raises(ValueError, match="mask_density"):
        InputAware(num_classes=10, mask_density=0)


def test_ci_preset_trains_iab_five_epochs_at_ten_percent():
    """3 joint epochs implant 92% at one thread and 47% at two; the preset must not depend on that."""
    from pgbd_defense.experiments.table2 import PRESETS

    iab = PRESETS["ci"].attack_settings("inputaware", "fashion-mnist", 0.1, "equal-budget", 0)
    assert (iab.epochs, iab.iab_mask_epochs) == (5, 2)
    assert PRESETS["ci"].attack_settings("badnet", "fashion-mnist", 0.1, "equal-budget", 0).epochs == 3


def test_diversity_loss_keeps_a_finite_gradient_for_an_image_paired_with_itself():
    """The partners are drawn at random: an image can meet itself, and its two patterns can be
    equal. The loss is then 0 / eps, and its gradient must stay finite (sqrt(0) has none)."""
    x = torch.randn(3, 1, 4, 4)
    pattern = torch.rand(3, 1, 4, 4, requires_grad=True)
    other = pattern.detach().clone()
    other[1:] += 0.5  # the other two pairs differ
    loss = diversity_loss(torch.cat([x[:1], x[1:]]), torch.cat([x[:1], x[1:] + 1]), pattern, other)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pattern.grad).all()
