"""IDX reading, data-not-found messages, channel serving, batch augmentation."""

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgbd_defense import datasets as data_mod
from pgbd_defense.datasets import DataNotFoundError
from pgbd_defense.datasets.batches import Normalizer, random_crop_flip
from pgbd_defense.datasets.idx import read_idx

from .conftest import needs_fashion_mnist, write_idx


def test_idx_round_trip_and_truncation(tmp_path):
    arr = np.arange(2 * 3 * 4).reshape(2, 3, 4).astype(np.uint8)
    write_idx(tmp_path / "a.gz", arr)
    assert np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    raw = gzip.open(tmp_path / "a.gz").read()
    (tmp_path / "b").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="declares shape"):
        read_idx(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"not an idx file")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "c")


def test_missing_data_lists_every_place(tmp_path):
    with pytest.raises(DataNotFoundError) as e:
        data_mod.load_split("mnist", str(tmp_path), train=True)
    msg = str(e.value)
    assert str(tmp_path) in msg and str(tmp_path / "mnist" / "MNIST" / "raw") in msg and "--data-root" in msg
    with pytest.raises(DataNotFoundError, match="--download"):
        data_mod.load_split("cifar10", str(tmp_path), train=True)


def test_gray_served_as_three_channels(tiny_data):
    one = data_mod.load_split("mnist", str(tiny_data), train=False)
    three = data_mod.load_split("mnist", str(tiny_data), train=False, channels=3)
    assert three.images.shape[1] == 3 and torch.equal(three.images[:, 2], one.images[:, 0])
    n = Normalizer((0.5,), (0.5,), 3)
    assert torch.allclose(n(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)), torch.ones(1, 3, 2, 2))


def test_random_crop_matches_a_per_image_crop():
    gen = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (5, 2, 6, 7), dtype=torch.uint8, generator=gen)
    out = random_crop_flip(images, torch.Generator().manual_seed(9), padding=2)
    replay = torch.Generator().manual_seed(9)
    dy = torch.randint(0, 5, (5,), generator=replay)
    dx = torch.randint(0, 5, (5,), generator=replay)
    padded = F.pad(images, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7])


@needs_fashion_mnist()
def test_debian_fashion_mnist_is_found_without_a_root():
    test = data_mod.load_split("fashion-mnist", None, train=False)
    assert test.images.shape == (10000, 1, 28, 28) and test.labels.bincount().tolist() == [1000] * 10


# How a test lays out each registered loader's data; CIFAR's torchvision reader verifies the
# real files' checksums, so only its missing-data answer can be tested offline.
def _idx_tree(tmp_path):
    from .conftest import make_idx_dataset

    return make_idx_dataset(tmp_path / "idx")


def _rof_tree(tmp_path):
    from .test_rof import make_rof_tree

    return make_rof_tree(tmp_path / "rof")


LAYOUTS = {"mnist": _idx_tree, "fashion-mnist": _idx_tree, "rof": _rof_tree}
CHECKSUMMED = {"cifar10", "cifar100"}


@pytest.mark.parametrize("name", data_mod.DATASETS.names())
def test_every_registered_loader_reads_its_layout_or_names_the_fix(tmp_path, monkeypatch, name):
    assert name in LAYOUTS or name in CHECKSUMMED, f"{name}: add its layout to this test"
    monkeypatch.setenv("PGBD_FASHION_MNIST", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="--data-root"):
        data_mod.load_split(name, str(tmp_path / "empty"), train=True)
    if name in CHECKSUMMED:
        return
    root = LAYOUTS[name](tmp_path)
    info = data_mod.dataset_info(name)
    for train in (True, False):
        split = data_mod.load_split(name, str(root), train=train, channels=info.size[2])
        assert split.images.dtype == torch.uint8 and tuple(split.images.shape[1:]) == (info.size[2], *info.size[:2])
        assert len(split) > 0 and 0 <= int(split.labels.min()) and int(split.labels.max()) < info.num_classes
