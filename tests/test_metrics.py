"""CA, ASR, RA and DEM against hand-computed values."""

import pytest
import torch

from pgbd_defense.metrics import accuracy, attack_success_rate, dem, robust_accuracy


def test_dem_reproduces_the_papers_badnets_row():
    d = dem(92.34, 88.93, 90.66, 0.82)
    assert d.delta_c == pytest.approx(1 - (92.34 - 90.66) / 92.34, abs=1e-12)  # 0.98181
    assert d.delta_a == pytest.approx((88.93 - 0.82) / 88.93, abs=1e-12)  # 0.99078
    assert d.delta_c == pytest.approx(0.98181, abs=1e-5)
    assert d.delta_a == pytest.approx(0.99078, abs=1e-5)
    assert d.value == pytest.approx(0.986, abs=5e-4)


def test_dem_clamps_gains_in_ca_and_rises_in_asr():
    # CA rising after the defense is not rewarded beyond 1; ASR rising is not punished below 0.
    d = dem(90.0, 50.0, 95.0, 60.0)
    assert (d.delta_c, d.delta_a, d.value) == (1.0, 0.0, 0.5)
    # Same figures as fractions give the same DEM (it is scale free).
    assert dem(0.9234, 0.8893, 0.9066, 0.0082).value == pytest.approx(dem(92.34, 88.93, 90.66, 0.82).value)


def test_dem_refuses_a_model_without_a_backdoor():
    with pytest.raises(ValueError, match="ASR > 0"):
        dem(90.0, 0.0, 90.0, 0.0)


def test_asr_and_ra_by_hand():
    attack = torch.tensor([0, 0, 0, 0, 0])
    true = torch.tensor([1, 2, 3, 0, 4])  # the fourth sample's true label is the target: ignored
    pred = torch.tensor([0, 2, 0, 0, 1])
    assert attack_success_rate(pred, attack, true) == pytest.approx(2 / 4)
    assert robust_accuracy(pred, true, attack) == pytest.approx(1 / 4)
    assert accuracy(pred, true) == pytest.approx(2 / 5)
    # all2all: attack label y+1 mod 3
    true = torch.tensor([0, 1, 2])
    attack = (true + 1) % 3
    pred = torch.tensor([1, 1, 0])
    assert attack_success_rate(pred, attack, true) == pytest.approx(2 / 3)
    assert robust_accuracy(pred, true, attack) == pytest.approx(1 / 3)


def test_predictions_and_loss_do_not_depend_on_the_batch_size():
    """The evaluation batch size is a speed setting: predictions are bit-identical and the
    mean loss equal to float64 rounding at any size from 16 up (benchmarks/cost.py picks the
    default). Under 16 images oneDNN takes other kernels and logits move by ~1e-9 here."""
    from pgbd_defense.datasets.batches import Normalizer
    from pgbd_defense.formats.models import build_model
    from pgbd_defense.metrics import predict

    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625).eval()
    images = torch.randint(0, 256, (300, 1, 28, 28), dtype=torch.uint8)
    labels = torch.arange(300) % 10
    norm = Normalizer((0.5,), (0.5,), 1)
    ref_pred, ref_loss = predict(model, images, norm, batch_size=512, labels=labels)
    for batch_size in (16, 64, 128, 300):
        pred, loss = predict(model, images, norm, batch_size=batch_size, labels=labels)
        assert torch.equal(pred, ref_pred), batch_size
        assert loss == pytest.approx(ref_loss, rel=1e-12, abs=0), batch_size
