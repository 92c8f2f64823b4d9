"""Every registered attack: trigger pixels checked by hand, poisoning bookkeeping,
records that round-trip."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pgbd_defense import datasets as data_mod
from pgbd_defense.attacks import ATTACKS

# Every registered attack that stamps a trigger on any image (rof-sunglasses poisons with real
# photos: tests/test_rof.py), by the capability each attack declares.
STAMPED = [n for n in ATTACKS.names() if ATTACKS.get(n).stamps_any_image]
from pgbd_defense.attacks.blended import Blended
from pgbd_defense.attacks.sig import SIG
from pgbd_defense.attacks.trojan import TrojanWatermark, watermark_mask
from pgbd_defense.attacks.wanet import WaNet, identity_grid, warp
from pgbd_defense.datasets import ImageSet
from pgbd_defense.formats.models import build_model
from pgbd_defense.formats.records import load_attack_record, write_attack_record
from pgbd_defense.util.threads import torch_threads


def _images(n=20, c=1, h=28, w=28, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)


def _clean(n=100):
    return ImageSet(_images(n), torch.arange(n) % 10)


@pytest.mark.parametrize("name", STAMPED)
def test_every_attack_changes_images_deterministically(name):
    attack = ATTACKS.get(name)(num_classes=10)
    x = _images()
    out = attack.apply_trigger(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)
    assert torch.equal(out, ATTACKS.get(name)(num_classes=10).apply_trigger(x))


@pytest.mark.parametrize("name", STAMPED)
def test_poison_test_holds_every_non_target_sample_relabelled(name):
    clean = _clean()
    bd = ATTACKS.get(name)(num_classes=10, target=2).poison_test(clean)
    assert len(bd) == 90 and (bd.original_labels != 2).all() and (bd.labels == 2).all()
    assert (bd.poison_indicator == 1).all()


def test_badnet_square_is_exactly_the_bottom_right_3x3():
    x = _images()
    out = ATTACKS.get("badnet")(num_classes=10).apply_trigger(x)
    assert (out[..., 25:, 25:] == 255).all()
    mask = torch.ones(28, 28, dtype=torch.bool)
    mask[25:, 25:] = False
    assert torch.equal(out[..., mask], x[..., mask])


def test_blended_arithmetic_with_a_user_image(tmp_path):
    Image.fromarray(np.full((10, 10), 200, np.uint8)).save(tmp_path / "t.png")
    x = torch.full((2, 1, 28, 28), 100, dtype=torch.uint8)
    out = Blended(num_classes=10, trigger_image=str(tmp_path / "t.png")).apply_trigger(x)
    assert (out == 120).all()  # 0.8 * 100 + 0.2 * 200
    with pytest.raises(ValueError, match="cannot read trigger image"):
        Blended(num_classes=10, trigger_image=str(tmp_path / "missing.png")).apply_trigger(x)


def test_blended_default_pattern_arithmetic():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    attack = Blended(num_classes=10)
    pattern = attack.pattern(x).float()
    assert torch.equal(attack.apply_trigger(x)[0], (0.2 * pattern).round().to(torch.uint8))


def test_sig_adds_the_sinusoid_column_by_column():
    x = torch.full((1, 1, 4, 28), 100, dtype=torch.uint8)
    out = SIG(num_classes=10).apply_trigger(x)
    for j in (0, 1, 5, 27):
        expected = round(100 + 40 * math.sin(2 * math.pi * j * 6 / 28))
        assert (out[0, 0, :, j] == expected).all(), j


def test_sig_poisons_only_target_class_and_keeps_labels():
    clean = _clean()
    bd = SIG(num_classes=10, target=3, ratio=0.05).poison_train(clean)
    poisoned = bd.poison_indicator == 1
    assert int(poisoned.sum()) == 5
    assert (clean.labels[poisoned] == 3).all() and torch.equal(bd.labels, clean.labels)
    assert not torch.equal(bd.images[poisoned], clean.images[poisoned])
    with pytest.raises(ValueError, match="all2one"):
        SIG(num_classes=10, mode="all2all")


def test_wanet_identity_at_zero_strength_and_noise_mode():
    x = _images()
    assert torch.equal(warp(x, identity_grid(28, 28)), x)
    assert torch.equal(WaNet(num_classes=10, s=0.0).apply_trigger(x), x)
    warped = WaNet(num_classes=10).apply_trigger(x)
    assert 0 < (warped.float() - x.float()).abs().mean() < 40  # a small warp, not a new image
    clean = _clean()
    attack = WaNet(num_classes=10, ratio=0.1, cross_ratio=2.0)
    bd = attack.poison_train(clean)
    images, labels = attack.training_set(bd)
    changed = (images != bd.images).flatten(1).any(1)
    assert int(changed.sum()) <= 20 and int(changed.sum()) >= 15  # 2 x 10 noise samples (a few may round back)
    assert (bd.poison_indicator[changed] == 0).all() and torch.equal(labels, bd.labels)


def test_trojan_watermark_pixels():
    x = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    out = TrojanWatermark(num_classes=10).apply_trigger(x)[0, 0]
    assert torch.equal(out[20:27, 20:27] == 255, watermark_mask(7))
    assert int((out == 255).sum()) == int(watermark_mask(7).sum())


@pytest.mark.parametrize("name", STAMPED)
def test_records_round_trip_for_every_attack(tmp_path, tiny_data, name):
    train = data_mod.load_split("mnist", str(tiny_data), train=True)
    test = data_mod.load_split("mnist", str(tiny_data), train=False)
    attack = ATTACKS.get(name)(num_classes=10, target=1, ratio=0.1)
    bd_train, bd_test = attack.poison_train(train), attack.poison_test(test)
    folder = tmp_path / "record" / name
    write_attack_record(folder, model=build_model("preactresnet18", 10, 1, 0.0625), model_name="preactresnet18",
                        num_classes=10, clean_data="mnist", data_path="", img_size=(28, 28, 1), bd_train=bd_train,
                        bd_test=bd_test, train_size=len(train), test_size=len(test), save_png=True)
    rec = load_attack_record(folder, data_root=str(tiny_data))
    assert torch.equal(rec.bd_test.images, bd_test.images)
    assert torch.equal(rec.bd_train.images, bd_train.images) and torch.equal(rec.bd_train.labels, bd_train.labels)


@pytest.mark.parametrize("name", [n for n in STAMPED if not ATTACKS.get(n).data_sets])  # ROF's: test_rof.py
def test_a_record_does_not_depend_on_what_the_process_drew_before(tmp_path, tiny_data, name):
    # A table worker builds records after other work: the same settings must give the same record
    # whatever the global random state (an unseeded TrojanNN reference model once broke this).
    from pgbd_defense.attacks.record import AttackSettings, build_attack_record
    from pgbd_defense.experiments.archive import record_fingerprint

    settings = AttackSettings(attack=name, dataset="mnist", width=0.0625, epochs=1, lr=0.05, batch_size=16,
                              augment=False, pratio=0.1, iab_mask_epochs=1)
    prints = []
    for i, history in enumerate((0, 12345)):
        torch.manual_seed(history)
        torch.rand(1000)
        folder = tmp_path / f"run{i}"
        with torch_threads(1):
            build_attack_record(folder, settings, data_root=str(tiny_data), save_png=False)
        prints.append(record_fingerprint(folder))
    assert prints[0] == prints[1]


from .conftest import needs_fashion_mnist  # noqa: E402

# The ASR each attack must reach on a Fashion-MNIST subset (BadNets: the session's shared record,
# below). WaNet's warp is subtle: it needs more of the data than the patch attacks to be learnt.
ASR_BUDGETS = {"blended": (0.9, 15000, 2), "sig": (0.8, 15000, 2), "wanet": (0.8, 30000, 3),
               "trojan": (0.9, 15000, 2), "inputaware": (0.8, 20000, 5)}
# Settings an attack's budget needs beyond these (IAB: its mask generator's own epochs).
ASR_EXTRA = {"inputaware": {"iab_mask_epochs": 2}}
# Torch threads an attack's test runs at. IAB's early epochs decide whether it implants, and the
# order of floating-point sums (the thread count) tips them: at 5 epochs, one thread gives 96.4%
# ASR (training ASR 80% after epoch 1, the Table 2 row's record), two give 59.9% (training ASR
# 25% -> 68%), both deterministic (CI reproduced the two-thread value to the last digit; measured
# 2026-12-02/03, docs/attacks.md). The test pins the thread count the committed Table 2 row's record
# was built at (table2 --threads 1), so it guards that record; the fragility itself is documented.
ASR_THREADS = {"inputaware": 1}


def test_every_attack_for_any_data_set_has_an_asr_test():
    """A newly registered attack must get an ASR test (or declare the data sets it is made for)."""
    general = {n for n in ATTACKS.names() if not ATTACKS.get(n).data_sets}
    assert general == {*ASR_BUDGETS, "badnet"}


@needs_fashion_mnist()
@pytest.mark.slow
@pytest.mark.parametrize("name, min_asr, subset, epochs", [(n, *b) for n, b in ASR_BUDGETS.items()])
def test_attack_reaches_high_asr_on_a_fashion_mnist_subset(tmp_path, name, min_asr, subset, epochs):
    from pgbd_defense.attacks.record import AttackSettings, build_attack_record

    settings = AttackSettings(attack=name, width=0.125, epochs=epochs, lr=0.02, augment=False, train_subset=subset,
                              **ASR_EXTRA.get(name, {}))
    with torch_threads(ASR_THREADS.get(name)):
        metrics = build_attack_record(tmp_path / "record" / name, settings, save_png=False)
    assert metrics["test_asr"] >= min_asr, metrics
    assert metrics["test_acc"] >= 0.75, metrics


@pytest.mark.slow
def test_badnet_reaches_high_asr_on_a_fashion_mnist_subset(real_badnet):
    _, _, metrics = real_badnet  # the session's shared record: BadNets, 15,000 images, 2 epochs
    assert metrics["test_asr"] >= 0.9, metrics
    assert metrics["test_acc"] >= 0.75, metrics


def test_trojan_optimization_excites_its_neuron_and_stays_in_the_mask():
    from pgbd_defense.attacks.trojan import TrojanWatermark, select_neuron, watermark_mask
    from pgbd_defense.datasets.batches import Normalizer
    from pgbd_defense.formats.models import build_model

    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, 1, 0.125).eval()
    images = torch.randint(0, 120, (16, 1, 28, 28), dtype=torch.uint8)
    attack = TrojanWatermark(num_classes=10, steps=60)
    pattern = attack.optimize_pattern(model, images, Normalizer([0.5], [0.5], 1))
    assert attack.neuron == select_neuron(model)
    # the chosen neuron has the largest summed |weight| to the logits
    assert attack.neuron == int(model.linear.weight.abs().sum(0).argmax())
    assert attack.activation["optimized"] > attack.activation["fixed"]
    assert pattern.shape == (1, 7, 7) and pattern.dtype == torch.uint8
    # the search computes no gradient for the reference model's weights, which stay trainable after
    assert all(q.grad is None and q.requires_grad for q in model.parameters())
    out = attack.apply_trigger(images)
    changed = (out != images).any(1).any(0)
    region = torch.zeros(28, 28, dtype=torch.bool)
    region[20:27, 20:27] = watermark_mask(7)
    assert not changed[~region].any()  # nothing outside the watermark's pixels moves
    assert torch.equal(out[:, :, 20:27, 20:27][..., watermark_mask(7)],
                       pattern[..., watermark_mask(7)].expand(16, 1, -1))
