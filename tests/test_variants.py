"""PGBD's variants: trigger inversion and target inference, ST-PGBD's PAVs, the
large-model mapping, and the command line that selects them."""

import json
import math

import pytest
import torch

from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.method.inversion import (
    InversionConfig,
    Trigger,
    anomaly_indices,
    infer_target,
    invert_trigger,
    pixel_count,
    trigger_overlap,
)
from pgbd_defense.method.mapping import (
    LinearMap,
    MappingConfig,
    MappingError,
    features_from_file,
    parse_source,
    reduce_teacher,
    train_map,
)
from pgbd_defense.method.pav_sources import teacher_pavs
from pgbd_defense.method.prototypes import estimate_prototypes, pure_pavs, shift_pavs
from pgbd_defense.run import main

from .conftest import needs_fashion_mnist

IDENTITY = Normalizer([0.0], [1.0], 1)


class CornerDetector(torch.nn.Module):
    """Class ``target``'s logit rises with the brightness of the top-left 3x3 corner;
    every other logit is 0. The evidence for ``target`` sits in that corner only."""

    def __init__(self, target: int, classes: int = 4):
        super().__init__()
        self.target, self.classes = target, classes
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        logits = torch.zeros(len(x), self.classes)
        logits[:, self.target] = self.scale * (x[:, 0, :3, :3].mean((1, 2)) - 0.5)
        return logits


def dark_images(n=64, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 70, (n, 1, 12, 12), generator=g, dtype=torch.uint8),
                    torch.arange(n) % classes)


def test_anomaly_index_by_hand():
    # median 10, absolute deviations [1, 0, 1, 2, 8] -> MAD 1
    got = anomaly_indices([9.0, 10.0, 11.0, 12.0, 2.0])
    assert got.tolist() == pytest.approx([1 / 1.4826, 0.0, 1 / 1.4826, 2 / 1.4826, 8 / 1.4826])
    # even count: median 2.5, deviations [1.5, .5, .5, 1.5] -> MAD 1
    k = 1.4826
    assert anomaly_indices([1.0, 2.0, 3.0, 4.0]).tolist() == pytest.approx([1.5 / k, 0.5 / k, 0.5 / k, 1.5 / k])
    # a MAD below 5% of the median counts as 5% of it (median 10: MAD 0.5)
    assert anomaly_indices([10.0, 10.1, 9.9, 10.0, 2.0], 0.05).tolist() == pytest.approx(
        [0.0, 0.1 / (k * 0.5), 0.1 / (k * 0.5), 0.0, 8 / (k * 0.5)])
    # log scale: the same arithmetic on log norms
    logs = torch.tensor([0.0, 1.0, 2.0, 3.0, -5.0])
    assert anomaly_indices(logs.exp().tolist(), scale="log").tolist() == pytest.approx(
        [1 / k, 0.0, 1 / k, 2 / k, 6 / k])
    # Norms measured on a Fashion-MNIST BadNets model (target 0, 150 steps per class): the linear
    # index misses the 4.6-pixel mask among classes needing 48 to 359, the log index flags it.
    measured = [4.57, 84.1, 57.0, 126.1, 89.0, 194.6, 71.1, 358.7, 48.5, 223.2]
    assert anomaly_indices(measured, scale="linear")[0] < 2 < anomaly_indices(measured, scale="log")[0]
    # every norm equal but one: MAD 0, the odd one out is infinitely anomalous
    assert anomaly_indices([5.0, 5.0, 5.0, 1.0]).tolist() == [0.0, 0.0, 0.0, math.inf]


def test_trigger_stamp_arithmetic():
    mask = torch.zeros(1, 2, 2)
    mask[0, 0, 0] = 1.0
    mask[0, 1, 1] = 0.5
    t = Trigger(0, mask, torch.ones(1, 2, 2), 1.5, 1.0)
    out = t.apply(torch.tensor([[[[10, 20], [30, 40]]]], dtype=torch.uint8))
    # (1 - m) x + m p in [0, 1]: 255 where m = 1, (40 + 255) / 2 where m = 0.5, unchanged elsewhere
    assert out.tolist() == [[[[255, 20], [30, 148]]]]


def test_inverted_trigger_sits_where_the_evidence_is():
    model = CornerDetector(target=2)
    trig = invert_trigger(model, dark_images(), 2, IDENTITY, InversionConfig(steps=300, batch_size=16))
    corner = trig.mask[0, :3, :3].sum() / trig.mask.sum()
    assert trig.flip_rate >= 0.95
    assert corner > 0.9, trig.mask
    assert trig.norm < 9.0  # never more than the corner itself
    assert model.scale.requires_grad and model.training  # the model is left as it was


def test_tao_pixel_count_and_additive_stamp_by_hand():
    # per pixel: max over channels of tanh(raw / 10) / (2 - 1e-7) + 0.5
    raw = torch.tensor([[[0.0, 10.0], [-10.0, 0.0]], [[5.0, -20.0], [0.0, 0.0]]])
    s = [math.tanh(v / 10) / (2 - 1e-7) + 0.5 for v in (0.0, 10.0, -10.0, 5.0, -20.0)]
    expected = max(s[0], s[3]) + max(s[1], s[4]) + max(s[2], s[0]) + s[0]
    assert float(pixel_count(raw)) == pytest.approx(expected, rel=1e-6)
    delta = torch.zeros(1, 2, 2)
    delta[0, 0, 0], delta[0, 1, 1] = 0.5, -1.0
    t = Trigger(0, (delta.abs().sum(0) > 0)[None].float(), delta, 2.0, 1.0, "additive")
    out = t.apply(torch.tensor([[[[10, 200], [30, 40]]]], dtype=torch.uint8))
    # x + delta in [0, 1], clipped: 10/255 + 0.5 -> 137.5 -> 138 (round half to even: 138), 40 - 255 -> 0
    assert out.tolist() == [[[[138, 200], [30, 0]]]]
    region = torch.zeros(2, 2, dtype=torch.bool)
    region[0, 0] = True
    assert trigger_overlap(t, region) == 0.5  # one of the two changed pixels lies in the region


def test_tao_inversion_changes_only_the_corner_and_flips():
    model = CornerDetector(target=2)
    trig = invert_trigger(model, dark_images(), 2, IDENTITY,
                          InversionConfig(steps=300, batch_size=16, method="tao"))
    corner = torch.zeros(12, 12, dtype=torch.bool)
    corner[:3, :3] = True
    assert trig.kind == "additive" and trig.flip_rate >= 0.95
    assert trigger_overlap(trig, corner) > 0.9, trig.mask
    assert trig.norm <= 9  # at most the corner's 9 pixels changed
    assert model.scale.requires_grad and model.training  # the model is left as it was
    with pytest.raises(ValueError, match="method"):
        invert_trigger(model, dark_images(), 2, IDENTITY, InversionConfig(method="abs"))


def test_inference_flags_the_class_with_a_shortcut():
    """Class 2 is reached through a 3x3 corner; classes 1, 3, 4, 5 each need a 12 x 3 column
    block brightened; class 0 is what the dark images are."""

    class Shortcut(torch.nn.Module):
        blocks = {1: 0, 3: 3, 4: 6, 5: 9}

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(len(x), 6) + self.w
            for c, col in self.blocks.items():
                logits[:, c] = 20 * (x[:, 0, :, col : col + 3].mean((1, 2)) - 0.5)
            logits[:, 2] = 20 * (x[:, 0, :3, :3].mean((1, 2)) - 0.5)
            return logits

    data = dark_images(classes=1)
    inference = infer_target(Shortcut(), data, 6, IDENTITY, InversionConfig(steps=200, batch_size=16),
                             classes=[1, 2, 3, 4, 5])
    assert inference.ranking[0] == 2
    assert inference.flagged == [2] and inference.target == 2, inference.rows()
    rows = {r["class"]: r for r in inference.rows()}
    assert rows[2]["rank"] == 1 and rows[2]["anomaly_index"] > 2 and rows[2]["flip_rate"] >= 0.95
    assert all(rows[c]["mask_l1"] > 2 * rows[2]["mask_l1"] for c in (1, 3, 4, 5))


def test_inference_refuses_too_few_classes():
    with pytest.raises(ValueError, match="at least 3"):
        infer_target(CornerDetector(0), dark_images(), 4, IDENTITY, classes=[0, 1])


def test_target_inference_is_cached_per_model_data_and_settings(tmp_path, monkeypatch):
    """A second defense of the same record reuses the search; another model or budget redoes it."""
    from types import SimpleNamespace

    from pgbd_defense.method import targets
    from pgbd_defense.method.inversion import Inference

    calls = []

    def fake_infer(model, clean, k, normalize, inv, classes=None, scale="log", device="cpu"):
        calls.append(inv.steps)
        return Inference(list(range(k)), [9.0, 2.0, 8.0, 7.0], [0.9] * k, [0.5, 4.0, 0.6, 0.7], [1, 3, 2, 0], [1])

    monkeypatch.setattr(targets, "infer_target", fake_infer)
    record = SimpleNamespace(model=CornerDetector(target=1), num_classes=4)
    cfg = {"spec": "auto", "steps": 5, "batch_size": 8, "seed": 0, "classes": (), "scale": "log"}
    data = dark_images()

    def defend(name, **change):
        out = tmp_path / "defense" / name
        out.mkdir(parents=True, exist_ok=True)
        found, inference, order = targets.defended_targets(targets.TargetConfig(**{**cfg, **change}), record, data,
                                                           IDENTITY, out)
        assert order is None  # NT-PGBD's classes come from the ranking only with nt_topk
        assert (out / "target_inference.csv").is_file()
        return found.tolist(), inference.ranking

    first = defend("pgbd")
    assert first == ([1, 1, 1, 1], [1, 3, 2, 0]) and calls == [5]
    assert defend("nt-pgbd") == first and calls == [5]  # reused from <record>/defense/.target_inference_*.json
    defend("pgbd", steps=6)
    assert calls == [5, 6]
    with torch.no_grad():
        record.model.scale.add_(1.0)
    defend("pgbd")
    assert calls == [5, 6, 5]
    assert len(list((tmp_path / "defense").glob(".target_inference_*.json"))) == 3


def test_st_pavs_point_from_clean_to_triggered_prototypes():
    clean = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
    shifted = torch.tensor([[5.0, 5.0], [4.0, 1.0], [2.0, 3.0]])
    pavs, active = shift_pavs(clean, shifted, torch.tensor([0, 0, 0]))
    assert active.tolist() == [False, True, True]
    assert pavs.tolist() == [[0.0, 0.0], [3.0, 0.0], [0.0, 3.0]]


def test_identity_map_gives_the_direct_pavs():
    torch.manual_seed(0)
    acts = torch.randn(60, 4, 3, 3)
    labels = torch.arange(60) % 3
    targets = torch.tensor([0, 0, 0])
    direct, active = pure_pavs(estimate_prototypes(acts.flatten(1), labels, 3).means(), targets)
    fmap = LinearMap.identity(4)
    lifted_means = estimate_prototypes(fmap.to_teacher(acts).detach().flatten(1), labels, 3).means().view(3, 4, 3, 3)
    mapped = teacher_pavs(lifted_means, targets, fmap, active)
    assert torch.allclose(mapped, direct, atol=1e-5)


def test_trained_map_round_trips_the_student():
    torch.manual_seed(0)
    student = torch.randn(200, 6, 4, 4)
    # The teacher sees the student through a fixed invertible per-position linear map (a 3x3
    # convolution cannot undo a general 3x3 blur, so that teacher could not be round-tripped).
    mix = torch.nn.Conv2d(6, 10, 1)
    with torch.no_grad():
        teacher = mix(student) * 3.0
    fit = train_map(student, teacher, MappingConfig(steps=4000, lr=3e-3, patience=400))
    assert fit.losses[-1] < 0.1 * fit.losses[0]
    assert fit.student_error < 0.1 and fit.teacher_error < 0.1, (fit.student_error, fit.teacher_error)


def test_reduce_teacher_pca_and_grid():
    torch.manual_seed(0)
    feats = torch.randn(20, 16, 2, 2)
    out = reduce_teacher(feats, components=5, grid=(4, 4))
    assert out.shape == (20, 5, 4, 4)
    flat = reduce_teacher(torch.randn(20, 8), components=64, grid=(3, 3))
    assert flat.shape == (20, 8, 3, 3) and torch.equal(flat[:, :, 0, 0], flat[:, :, 2, 2])  # one vector per image


def test_features_file_rows_and_errors(tmp_path):
    feats = torch.arange(5.0).view(5, 1) * torch.ones(5, 3)
    path = tmp_path / "f.pt"
    torch.save({"features": feats, "index": [10, 11, 12, 13, 14]}, path)
    # training rows 0, 2 of a subset whose record indices are 12, 13, 14
    assert features_from_file(str(path), [0, 2], [12, 13, 14])[:, 0].tolist() == [2.0, 4.0]
    with pytest.raises(MappingError, match="no features"):
        features_from_file(str(path), [0], [99])
    torch.save(feats, path)
    with pytest.raises(MappingError, match="5 rows but the clean subset has 4"):
        features_from_file(str(path), [0], [1, 2, 3, 4])
    assert parse_source("off") is None
    with pytest.raises(MappingError, match="torchvision:NAME:WEIGHTS_FILE"):
        parse_source("torchvision:resnet18")
    with pytest.raises(MappingError, match="not found"):
        parse_source(f"torchvision:resnet18:{tmp_path / 'missing.pth'}")


def _run(tiny_data, tmp_path, *extra):
    args = ["--attack", "badnet", "--dataset", "mnist", "--data-root", str(tiny_data), "--record-root",
            str(tmp_path / "record"), "--attack-epochs", "1", "--epochs", "1", "--ratio", "0.5", "--no-progress",
            *extra]
    assert main(args) == 0
    (record,) = (tmp_path / "record").iterdir()
    return record


def test_cli_target_auto_and_st_pgbd_write_their_files(tiny_data, tmp_path):
    record = _run(tiny_data, tmp_path, "--variant", "st", "--target", "auto", "--inversion-steps", "15",
                  "--st-steps", "15")
    out = record / "defense" / "st-pgbd"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["defense"] == "st-pgbd"
    inferred = summary["target_inference"]["target"]
    assert summary["targets"] == [inferred] * 10
    assert summary["synthesized_trigger"]["target"] == inferred
    assert (out / "synthesized_trigger.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (out / "target_inference.csv").read_text().splitlines()
    assert rows[0].startswith("class,mask_l1,flip_rate,anomaly_index,rank,flagged") and len(rows) == 11


def test_cli_mapping_from_a_features_file_and_a_backbone(tiny_data, tmp_path):
    import torchvision
    import yaml

    record = _run(tiny_data, tmp_path)
    index = [int(v) for v in (record / "defense" / "pgbd" / "index.txt").read_text().split()]
    feats = tmp_path / "teacher.pt"
    torch.save({"features": torch.randn(len(index), 32, 2, 2), "index": index}, feats)
    assert main(["--record", str(record), "--data-root", str(tiny_data), "--epochs", "1", "--ratio", "0.5",
                 "--mapping", str(feats), "--mapping-components", "8", "--mapping-steps", "200",
                 "--defense-name", "pgbd_mapped", "--no-progress"]) == 0
    summary = json.loads((record / "defense" / "pgbd_mapped" / "summary.json").read_text())
    assert summary["mapping"]["components"] == 8 and summary["mapping"]["steps"] <= 200
    # A randomly initialized torchvision backbone tests the plumbing only (no real teacher here).
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({"teacher_input_size": 32, "mapping_steps": 100, "mapping_components": 4}))
    args = ["--record", str(record), "--data-root", str(tiny_data), "--epochs", "1", "--ratio", "0.5", "--config",
            str(cfg), "--mapping", f"torchvision:resnet18:{weights}", "--defense", "nt-pgbd", "--no-progress"]
    assert main(args + ["--defense-name", "nt_mapped"]) == 0
    cached = list((record / "defense").glob(".teacher_resnet18_*.pt"))
    assert len(cached) == 1
    assert main(args + ["--defense-name", "nt_mapped_again"]) == 0  # served from the cache
    assert list((record / "defense").glob(".teacher_resnet18_*.pt")) == cached
    # Mapping is a PGBD setting: a baseline refuses it instead of silently ignoring it.
    assert main(["--record", str(record), "--data-root", str(tiny_data), "--epochs", "1", "--defense", "ft",
                 "--mapping", str(feats), "--no-progress"]) == 2


def test_cli_variant_and_defense_must_agree(tiny_data, tmp_path):
    assert main(["--attack", "badnet", "--dataset", "mnist", "--data-root", str(tiny_data), "--variant", "st",
                 "--defense", "nt-pgbd", "--no-progress"]) == 2


def test_st_pgbd_refuses_all_to_all_targets(tiny_data, tmp_path):
    record = _run(tiny_data, tmp_path, "--attack-label-trans", "all2all")
    assert main(["--record", str(record), "--data-root", str(tiny_data), "--variant", "st", "--epochs", "1",
                 "--no-progress"]) == 2


@pytest.fixture(scope="module")
def badnets_record(real_badnet):
    from pgbd_defense.formats.records import load_attack_record

    return load_attack_record(real_badnet[1])


@needs_fashion_mnist()
@pytest.mark.slow
def test_inference_and_st_trigger_on_a_real_badnets_model(badnets_record):
    rec = badnets_record
    norm = Normalizer([0.5], [0.5], 1)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(rec.clean_train), generator=g)[:600]
    clean = ImageSet(rec.clean_train.images[idx], rec.clean_train.labels[idx])
    inference = infer_target(rec.model, clean, 10, norm, InversionConfig(steps=150))
    assert inference.ranking[0] == 0, inference.rows()
    trig = inference.triggers[0]
    assert trig.flip_rate >= 0.9 and trig.norm < 20
