"""Figures: the alignment measure and Grad-CAM against known answers, and every
figure command writing a PNG and its CSV from a tiny record."""

import csv

import pytest
import torch

from pgbd_defense.experiments.figures import embed_2d
from pgbd_defense.experiments.figures import main as figures
from pgbd_defense.experiments.gradcam import grad_cam
from pgbd_defense.formats.models import build_model
from pgbd_defense.method.alignment import alignment_from_activations, last_stage_convs

PNG = b"\x89PNG\r\n\x1a\n"


def _clusters(centers, per_class=30, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.cat([c + noise * torch.randn(per_class, len(c), generator=g) for c in centers])
    labels = torch.arange(len(centers)).repeat_interleave(per_class)
    return acts, labels


def test_alignment_is_one_when_the_trigger_moves_towards_the_target_and_zero_when_orthogonal():
    centers = torch.tensor([[0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]])
    acts, labels = _clusters(centers)
    plain, bd_labels = _clusters(centers[1:], seed=1)
    bd_labels = bd_labels + 1
    # The trigger carries every image exactly onto the target's prototype direction (target 0).
    toward = plain + (centers[0] - centers[bd_labels])
    res = alignment_from_activations(acts, labels, toward, plain, bd_labels, target=0, num_classes=3)
    assert res.per_class == pytest.approx({1: 1.0, 2: 1.0}, abs=1e-2)
    # reference: class 1's PAV towards class 2 is (-4, 4) vs the shift (-4, 0): cos = 1/sqrt(2)
    assert res.reference[1] == pytest.approx(2 ** -0.5, abs=2e-2)
    # A trigger that moves along an unused dimension is orthogonal to every PAV.
    sideways = plain + torch.tensor([0.0, 0.0, 0.0, 3.0])
    res = alignment_from_activations(acts, labels, sideways, plain, bd_labels, target=0, num_classes=3)
    assert res.mean == pytest.approx(0.0, abs=3e-2)


def test_last_stage_convs_of_preact_resnet():
    assert last_stage_convs(build_model("preactresnet18", 10, 1, 0.125)) == [
        "layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"]


class LinearHead(torch.nn.Module):
    """conv (2 channels) -> ReLU -> global mean -> logits = V @ channel means."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight[:] = torch.tensor([1.0, -1.0]).view(2, 1, 1, 1)
            self.conv.bias.zero_()
        self.v = torch.tensor([[2.0, 1.0], [-1.0, 3.0]])

    def forward(self, x):
        return self.conv(x).relu().mean((2, 3)) @ self.v.T


def test_grad_cam_equals_the_hand_formula_and_finds_the_corner():
    x = torch.full((3, 1, 8, 8), 0.05)
    x[:, :, :3, :3] = 1.0  # the evidence sits in the top-left corner
    model = LinearHead()
    cam = grad_cam(model, "conv", x, classes=torch.tensor([0, 0, 0]))
    # d logit_0 / d A_k = V[0, k] / (H W): weights V[0]/64; A_1 = relu(-x) = 0, so the map is 2 x / 64.
    expected = (2.0 * x[:, 0] / 64).relu()
    assert torch.allclose(cam, expected / expected.flatten(1).max(1).values.view(-1, 1, 1), atol=1e-6)
    assert (cam[:, :3, :3] == 1).all() and cam[:, 4:, 4:].max() < 0.1
    assert model.training  # mode restored


def test_grad_cam_of_a_real_network_is_a_valid_map():
    model = build_model("preactresnet18", 10, 1, 0.125)
    cam = grad_cam(model, "layer4.1.conv2", torch.randn(2, 1, 28, 28))
    assert cam.shape == (2, 28, 28) and cam.min() >= 0 and cam.max() <= 1 + 1e-6


def _csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))




def test_tsne_keeps_clusters_and_places_each_prototype_among_its_class():
    g = torch.Generator().manual_seed(0)
    centres = torch.zeros(3, 8)
    centres[0, 0], centres[1, 1], centres[2, 2] = 10.0, 10.0, 10.0
    labels = torch.arange(3).repeat_interleave(15)
    acts = centres[labels] + 0.5 * torch.randn(45, 8, generator=g)
    bd = centres[0] + 0.5 * torch.randn(6, 8, generator=g)  # poisoned images sit with class 0
    means = torch.stack([acts[labels == c].mean(0) for c in range(3)])
    a2, b2, p2 = embed_2d(acts, bd, means, "tsne")
    assert a2.shape == (45, 2) and b2.shape == (6, 2) and p2.shape == (3, 2)
    a2, b2, p2 = (torch.as_tensor(v) for v in (a2, b2, p2))

    def nearest_class(points):
        return labels[torch.cdist(points, a2).argmin(1)].tolist()

    d = torch.cdist(a2, a2).fill_diagonal_(float("inf"))
    assert labels[d.argmin(1)].tolist() == labels.tolist()  # every point's nearest other point is of its class
    assert nearest_class(p2) == [0, 1, 2]
    assert nearest_class(b2) == [0] * 6
    with pytest.raises(ValueError, match="projection"):
        embed_2d(acts, bd, means, "umap")


def test_true_trigger_region_by_hand():
    from pgbd_defense.experiments.figures import true_trigger_region

    plain = torch.zeros(2, 1, 3, 3, dtype=torch.uint8)
    triggered = plain.clone()
    triggered[:, 0, 2, 2] = 200  # the patch
    triggered[0, 0, 0, 0] = 10  # mean change 5: under a tenth of 200
    region = true_trigger_region(triggered, plain)
    assert region.tolist() == [[False, False, False], [False, False, False], [False, False, True]]


def test_inversion_command_compares_both_methods(tiny_record, tiny_data, tmp_path):
    out = tmp_path / "inv"
    assert figures(["inversion", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--ratio", "0.5", "--steps", "20"]) == 0
    rows = _csv_rows(out / "inversion.csv")
    assert [r["method"] for r in rows] == ["nc", "tao"]
    assert all(0 <= float(r["overlap_true_region"]) <= 1 and 0 <= float(r["flip_rate"]) <= 1 for r in rows)
    assert int(rows[0]["true_region_pixels"]) > 0
    for m in ("nc", "tao"):
        assert (out / f"inversion_{m}.png").read_bytes()[:8] == PNG
    assert figures(["inversion", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--methods", "nc,abs"]) == 2


def test_alignment_and_gradcam_commands_write_png_and_csv(tiny_record, tiny_data, tmp_path):
    out = tmp_path / "fig"
    assert figures(["alignment", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--ratio", "0.5", "--projection", "both"]) == 0
    for name in ("alignment.png", "projection.png", "projection_tsne.png"):
        assert (out / name).read_bytes()[:8] == PNG
    rows = _csv_rows(out / "alignment.csv")
    assert {r["layer"] for r in rows} == {"layer2.1.conv2", "layer3.1.conv2", "layer4.1.conv2"}
    assert all(-1 <= float(r["cos_pav_gt"]) <= 1 for r in rows)
    assert figures(["gradcam", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--count", "4"]) == 0
    assert (out / "gradcam.png").read_bytes()[:8] == PNG
    rows = _csv_rows(out / "gradcam.csv")
    assert len(rows) == 4 and all(0 <= float(r["cam_on_trigger_after"]) <= 1 for r in rows)
    # A missing defense folder is a clear error, not a traceback.
    assert figures(["gradcam", "--record", str(tiny_record), "--data-root", str(tiny_data), "--out", str(out),
                    "--defense-dir", str(tmp_path / "nowhere")]) == 2


def test_ablation_and_mapping_commands_write_png_and_csv(tiny_record, tiny_data, tmp_path):
    out = tmp_path / "fig"
    base = ["--data-root", str(tiny_data), "--out", str(out)]
    assert figures(["ablation", "--record", str(tiny_record), "--param", "lambda", "--values", "0,1", *base]) == 0
    rows = _csv_rows(out / "ablation_lambda.csv")
    assert [r["value"] for r in rows] == ["0.0", "1.0"] and all(r["status"] == "ok" for r in rows)
    assert (out / "ablation_lambda.png").read_bytes()[:8] == PNG
    # cached: a second call reads the cells
    assert figures(["ablation", "--record", str(tiny_record), "--param", "lambda", "--values", "0,1", *base]) == 0
    assert all(r["status"] == "cached" for r in _csv_rows(out / "ablation_lambda.csv"))
    assert figures(["ablation", "--param", "poison-ratio", "--values", "0.1,0.2", "--dataset", "mnist",
                    "--record-root", str(tmp_path / "records2"), *base]) == 0
    assert len(_csv_rows(out / "ablation_poison-ratio.csv")) == 2
    assert len(list((tmp_path / "records2").glob("*/attack_result.pt"))) == 2  # one record per poisoning ratio
    index = (tiny_record / "clean_subset_0.05_0.txt")
    n = len(index.read_text().split())
    feats = tmp_path / "teacher.pt"
    torch.save({"features": torch.randn(n, 16, 2, 2), "index": [int(i) for i in index.read_text().split()]}, feats)
    assert figures(["mapping", "--record", str(tiny_record), "--teacher", str(feats), *base]) == 0
    rows = _csv_rows(out / "mapping.csv")
    assert [r["setting"] for r in rows] == ["without mapping", "with mapping"]
    assert (out / "mapping.png").read_bytes()[:8] == PNG
    # A setting that needs a record says so.
    assert figures(["ablation", "--param", "lambda", "--values", "1", *base]) == 2
