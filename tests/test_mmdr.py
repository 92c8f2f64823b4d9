"""ML-MMDR (Xia et al., TDSC 2022): the MMD estimate against hand arithmetic, the penalty's
bookkeeping on batches, and the attack option end to end on tiny data."""

import math

import pytest
import torch

from pgbd_defense.attacks.mmdr import gaussian_mmd2, mmd_penalty
from pgbd_defense.attacks.record import AttackSettings, build_attack_record, record_name
from pgbd_defense.attacks.training import train_classifier
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.experiments.table2 import PRESETS
from pgbd_defense.formats.models import build_model
from pgbd_defense.formats.records import load_attack_record


def _literal_mmd2(x, y, scales, base):
    """Three double loops over the points, as the definition reads."""
    def k(a, b):
        d2 = sum((float(p) - float(q)) ** 2 for p, q in zip(a, b))
        return sum(math.exp(-d2 / (s * base)) for s in scales)

    def mean_k(u, v):
        return sum(k(a, b) for a in u for b in v) / (len(u) * len(v))

    return mean_k(x, x) + mean_k(y, y) - 2 * mean_k(x, y)


def test_mmd_of_one_point_each_by_hand():
    # k(0, 0) = 1, k(0, 1) = e^-1: 1 + 1 - 2 e^-1
    value = gaussian_mmd2(torch.tensor([[0.0]]), torch.tensor([[1.0]]), scales=(1.0,), base=1.0)
    assert float(value) == pytest.approx(2 - 2 * math.exp(-1), rel=1e-6)


def test_mmd_on_4_plus_4_points_equals_the_literal_sum_and_is_zero_for_identical_sets():
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = x + torch.tensor([2.0, 0.5])
    scales = (0.25, 1.0, 4.0)
    assert float(gaussian_mmd2(x, y, scales, base=2.0)) == pytest.approx(_literal_mmd2(x, y, scales, 2.0), rel=1e-6)
    # the default bandwidth: the mean squared distance between the 8 points (off the diagonal)
    z = torch.cat([x, y])
    base = float(torch.cdist(z, z).pow(2).sum()) / (8 * 7)
    assert float(gaussian_mmd2(x, y)) == pytest.approx(_literal_mmd2(x, y, scales, base), rel=1e-6)
    assert float(gaussian_mmd2(x, x.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(gaussian_mmd2(x, y)) > float(gaussian_mmd2(x, x + 0.1))  # farther apart, larger


def test_penalty_sums_layers_and_is_zero_without_both_kinds():
    g = torch.Generator().manual_seed(0)
    store = {"a": torch.randn(6, 2, 2, 2, generator=g), "b": torch.randn(6, 5, generator=g)}
    mask = torch.tensor([0, 1, 0, 0, 1, 0])
    expected = sum(float(gaussian_mmd2(store[n].flatten(1)[mask == 0], store[n].flatten(1)[mask == 1]))
                   for n in ("a", "b"))
    assert float(mmd_penalty(store, ["a", "b"], mask)) == pytest.approx(expected, rel=1e-6)
    assert float(mmd_penalty(store, ["a", "b"], torch.zeros(6))) == 0.0
    assert float(mmd_penalty(store, ["a", "b"], torch.ones(6))) == 0.0


def test_mmdr_training_steps_on_the_penalty():
    """Same data, seed and steps: only the penalty differs, so the weights must differ; and
    the penalty needs the poisoned mask and a layer."""
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (32,), generator=g)
    poisoned = (torch.arange(32) % 4 == 0).long()
    norm = Normalizer((0.5,), (0.5,), 1)

    def trained(lam):
        torch.manual_seed(0)
        model = build_model("preactresnet18", 10, 1, 0.0625)
        return train_classifier(model, images, labels, norm, 1, lr=0.05, batch_size=16, augment=False,
                                poisoned=poisoned, mmdr_lambda=lam, mmdr_layers=["layer3", "layer4"])

    plain, again, adaptive = trained(0.0), trained(0.0), trained(5.0)
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), again.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(plain.parameters(), adaptive.parameters()))
    with pytest.raises(ValueError, match="poisoned"):
        train_classifier(build_model("preactresnet18", 10, 1, 0.0625), images, labels, norm, 1, mmdr_lambda=1.0,
                         mmdr_layers=["layer4"])


def test_adaptive_record_round_trip_and_names(tmp_path, tiny_data):
    plain = AttackSettings(attack="badnet", dataset="mnist", width=0.0625, epochs=1, batch_size=16)
    adaptive = AttackSettings(attack="badnet", dataset="mnist", width=0.0625, epochs=1, batch_size=16,
                              mmdr_lambda=1.0)
    assert record_name(plain) != record_name(adaptive)
    # a plain record's name is what it was before ML-MMDR existed (no new keys in its digest)
    assert record_name(plain) == record_name(AttackSettings(attack="badnet", dataset="mnist", width=0.0625, epochs=1,
                                                            batch_size=16, mmdr_lambda=0.0, mmdr_layers=["x"]))
    folder = tmp_path / record_name(adaptive)
    build_attack_record(folder, adaptive, data_root=str(tiny_data), save_png=False)
    rec = load_attack_record(folder, data_root=str(tiny_data))
    assert rec.bd_test.images.shape[0] > 0
    assert AttackSettings(attack="badnet", mmdr_lambda=1.0, mmdr_layers=[]).problems()
    # Table 2 names the adaptive attacks with a star
    s = PRESETS["ci"].attack_settings("wanet*", "fashion-mnist", 0.1, "equal-budget", 0)
    assert s.attack == "wanet" and s.mmdr_lambda > 0 and s.mmdr_layers
    assert PRESETS["ci"].attack_settings("wanet", "fashion-mnist", 0.1, "equal-budget", 0).mmdr_lambda == 0.0
    # at 1% BadNets* takes the calibrated weight and longer training; plain BadNets keeps its own
    star = PRESETS["ci"].attack_settings("badnet*", "fashion-mnist", 0.01, "equal-budget", 0)
    plain = PRESETS["ci"].attack_settings("badnet", "fashion-mnist", 0.01, "equal-budget", 0)
    assert (star.mmdr_lambda, star.epochs) == (0.1, 5) and (plain.mmdr_lambda, plain.epochs) == (0.0, 3)


def test_separation_is_chance_for_identical_sets_and_perfect_for_shifted_ones():
    from pgbd_defense.method.separation import separation_from_activations

    g = torch.Generator().manual_seed(2)
    plain = torch.randn(200, 6, generator=g)
    same = separation_from_activations(plain, plain.clone())
    assert same["mmd2"] == pytest.approx(0.0, abs=1e-6)
    assert 0.4 <= same["probe_accuracy"] <= 0.6  # twins on one side: nothing to learn
    shifted = separation_from_activations(plain, plain + torch.tensor([10.0, 0, 0, 0, 0, 0]))
    assert shifted["probe_accuracy"] == 1.0 and shifted["mmd2"] > 0.1
    with pytest.raises(ValueError, match="paired rows"):
        separation_from_activations(plain[:3], plain[:3])


def test_separation_command_writes_a_row_per_layer(tiny_record, tiny_data, tmp_path):
    from pgbd_defense.experiments.figures import main as figures

    out = tmp_path / "sep"
    assert figures(["separation", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--layers", "layer3,layer4", "--max-images", "20"]) == 0
    lines = (out / "separation.csv").read_text().splitlines()
    assert lines[0].startswith("layer,mmd2,probe_accuracy,images") and len(lines) == 3
