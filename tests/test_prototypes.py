"""Prototypes, PAVs, cluster matching and blending against hand-computed values."""

import warnings

import pytest
import torch

from pgbd_defense.formats.models import build_model
from pgbd_defense.method.prototypes import Prototypes, blend, estimate_prototypes, match_clusters, pure_pavs
from pgbd_defense.util.hooks import LayerNotFoundError, capture, eval_mode, find_layer


def test_prototype_is_the_mean_of_three_kmeans_centroids():
    # Class 0: three tight groups around (0,0), (10,0), (0,10): centroids are those points,
    # the prototype their mean (10/3, 10/3). Class 1: groups around (100,100), (100,110), (110,100).
    base0 = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    base1 = base0 + 100.0
    jitter = torch.tensor([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.1], [0.0, -0.1]])
    acts = torch.cat([(b + jitter) for b in base0] + [(b + jitter) for b in base1])
    labels = torch.tensor([0] * 12 + [1] * 12)
    protos = estimate_prototypes(acts, labels, num_classes=2, n_clusters=3, seed=0)
    means = protos.means()
    assert torch.allclose(means[0], torch.tensor([10 / 3, 10 / 3]), atol=1e-4)
    assert torch.allclose(means[1], torch.tensor([100 + 10 / 3, 100 + 10 / 3]), atol=1e-4)
    got = sorted(map(tuple, protos.centroids[0].round(decimals=3).tolist()))
    assert got == [(0.0, 0.0), (0.0, 10.0), (10.0, 0.0)]


def test_pure_pavs_point_from_each_class_to_its_target():
    P = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    pavs, active = pure_pavs(P, torch.tensor([0, 0, 0]))
    assert active.tolist() == [False, True, True]
    assert pavs.tolist() == [[0.0, 0.0], [1.0, -2.0], [-2.0, -3.0]]
    # all2all: class c -> c+1 mod 3
    pavs, active = pure_pavs(P, torch.tensor([1, 2, 0]))
    assert active.all()
    assert pavs.tolist() == [[-1.0, 2.0], [3.0, 1.0], [-2.0, -3.0]]
    # unknown target (-1) and a class without prototype get no term
    pavs, active = pure_pavs(P, torch.tensor([-1, 0, 0]), available=torch.tensor([True, True, False]))
    assert active.tolist() == [False, True, False]


def test_match_clusters_recovers_a_permutation():
    old = torch.tensor([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]])
    new = old[[2, 0, 1]] + 0.3  # relabelled and shifted
    perm = match_clusters(old, new)
    assert perm.tolist() == [1, 2, 0]
    assert torch.allclose(new[perm], old + 0.3)


def test_blend_mixes_matched_clusters_at_rate_alpha():
    old = Prototypes([torch.tensor([[0.0, 0.0], [10.0, 0.0]])])
    fresh = Prototypes([torch.tensor([[12.0, 0.0], [2.0, 0.0]])])  # same clusters, listed the other way round
    out = blend(old, fresh, alpha=0.75).centroids[0]
    # cluster at 0 -> 0.75*2 + 0.25*0 = 1.5; cluster at 10 -> 0.75*12 + 0.25*10 = 11.5
    assert out.tolist() == [[1.5, 0.0], [11.5, 0.0]]
    with pytest.raises(ValueError, match="alpha"):
        blend(old, fresh, alpha=1.5)


def test_fewer_samples_than_clusters_falls_back_and_warns():
    acts = torch.tensor([[0.0, 1.0], [2.0, 3.0], [5.0, 5.0], [6.0, 6.0], [7.0, 7.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        protos = estimate_prototypes(acts, labels, num_classes=3, n_clusters=3, seed=0)
    messages = " ".join(str(w.message) for w in caught)
    assert "class 0 has 2 clean samples" in messages and "class 2 has no clean sample" in messages
    assert protos.centroids[0].shape == (2, 2) and protos.centroids[2] is None
    assert protos.means()[0].tolist() == [1.0, 2.0]
    assert protos.available.tolist() == [True, True, False]


def test_capture_removes_its_hook_even_on_error():
    model = build_model("preactresnet18", 10, width=0.0625)
    layer = find_layer(model, "layer4.1.conv2")
    with pytest.raises(RuntimeError):
        with capture(model, "layer4.1.conv2"):
            assert len(layer._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(layer._forward_hooks) == 0


def test_capture_takes_outputs_or_inputs_of_several_layers():
    model = build_model("preactresnet18", 10, width=0.0625).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), capture(model, ["layer4", "avgpool"]) as outs, capture(model, "linear", inputs=True) as ins:
        logits = model(x)
    assert outs["layer4"].shape[:2] == (2, 32) and outs["avgpool"].shape == (2, 32, 1, 1)
    assert torch.equal(ins["linear"].flatten(1), outs["avgpool"].flatten(1))
    assert torch.allclose(model.linear(ins["linear"].flatten(1)), logits)
    assert not find_layer(model, "linear")._forward_pre_hooks and not find_layer(model, "layer4")._forward_hooks


def test_eval_mode_restores_the_mode_it_found_even_on_error():
    model = build_model("preactresnet18", 10, width=0.0625).train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            assert not model.training
            raise RuntimeError("boom")
    assert model.training
    model.eval()
    with eval_mode(model):
        pass
    assert not model.training


def test_unknown_layer_lists_the_valid_ones():
    model = build_model("preactresnet18", 10, width=0.0625)
    with pytest.raises(LayerNotFoundError, match="layer4.1.conv2"):
        find_layer(model, "layer9.conv")


def _identity_model():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Identity())


def _clustered_images(seed=0):
    """2 classes x 3 tight clusters of 4x4 gray images; the activation is the normalized image."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randint(0, 256, (6, 1, 4, 4), generator=gen)
    which = torch.arange(600) % 6
    noise = torch.randint(-3, 4, (600, 1, 4, 4), generator=gen)
    images = (centers[which] + noise).clamp(0, 255).to(torch.uint8)
    return images, (which >= 3).long()


def test_streaming_prototypes_match_in_memory_ones():
    from pgbd_defense.datasets.batches import Normalizer
    from pgbd_defense.method.prototypes import collect_activations, stream_prototypes

    model, norm = _identity_model(), Normalizer((0.5,), (0.5,), 1)
    images, labels = _clustered_images()
    acts = collect_activations(model, "1", images, norm)
    reference = estimate_prototypes(acts, labels, 2, 3, seed=0)
    exact = stream_prototypes(model, "1", images, labels, norm, 2, 3, seed=0, memory_budget_mb=1024)
    for a, b in zip(reference.centroids, exact.centroids):
        assert torch.allclose(a, b, atol=1e-6)
    streamed = stream_prototypes(model, "1", images, labels, norm, 2, 3, seed=0, memory_budget_mb=1e-4,
                                 batch_size=32)
    assert torch.allclose(streamed.means(), reference.means(), atol=0.02)
    for a, b in zip(reference.centroids, streamed.centroids):
        assert torch.allclose(_sorted_rows(a), _sorted_rows(b), atol=0.03)


def _sorted_rows(c):
    return c[c[:, 0].argsort()]
