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


def _gtsrb_tree(tmp_path, per_class=2, test=20):
    """BackdoorBench's GTSRB layout: Train/<class>/GT-<class>.csv and Test/GT-final_test.csv."""
    from PIL import Image

    root = tmp_path / "gtsrb"
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    for c in range(43):
        folder = root / "Train" / f"{c:05d}"
        folder.mkdir(parents=True)
        rows = [header]
        for j in range(per_class):
            name = f"{c:05d}_{j:05d}.ppm"
            Image.new("RGB", (30 + j, 34), (c * 5, 100, 200 - c)).save(folder / name)
            rows.append(f"{name};{30 + j};34;1;1;20;20;{c}\n")
        (folder / f"GT-{c:05d}.csv").write_text("".join(rows))
    (root / "Test").mkdir()
    rows = [header]
    for i in range(test):
        Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(root / "Test" / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;40;40;1;1;20;20;{(7 * i) % 43}\n")
    (root / "Test" / "GT-final_test.csv").write_text("".join(rows))
    return tmp_path


def _tiny_tree(tmp_path, wnids=("n02", "n01", "n03"), per_class=3, released_val=True):
    """Tiny-ImageNet's layout: train/<wnid>/images/*.JPEG, val/images + val_annotations.txt."""
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    for k, w in enumerate(wnids):
        (root / "train" / w / "images").mkdir(parents=True)
        for j in range(per_class):
            mode = "L" if j == 0 else "RGB"  # a few Tiny images are gray
            Image.new(mode, (64, 64), 40 * k + j if mode == "L" else (40 * k, j, 9)).save(
                root / "train" / w / "images" / f"{w}_{j}.JPEG")
    lines = []
    for i, w in enumerate([wnids[i % len(wnids)] for i in range(6)]):
        if released_val:
            (root / "val" / "images").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (i, i, i)).save(root / "val" / "images" / f"val_{i}.JPEG")
            lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
        else:
            (root / "val" / w).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), (i, i, i)).save(root / "val" / w / f"val_{i}.JPEG")
    if released_val:
        (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


LAYOUTS = {"mnist": _idx_tree, "fashion-mnist": _idx_tree, "rof": _rof_tree, "gtsrb": _gtsrb_tree,
           "tiny": _tiny_tree}
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


def test_gtsrb_reads_backdoorbenchs_layout_in_its_order_at_32x32(tmp_path):
    _gtsrb_tree(tmp_path)
    train = data_mod.load_split("gtsrb", str(tmp_path), train=True)
    assert train.images.shape == (86, 3, 32, 32) and train.labels[:4].tolist() == [0, 0, 1, 1]
    assert train.images[2, 0, 0, 0] == 5  # class 1's colour, resized
    test = data_mod.load_split("gtsrb", str(tmp_path / "gtsrb"), train=False)
    assert test.labels.tolist() == [(7 * i) % 43 for i in range(20)]


@pytest.mark.parametrize("released_val", [True, False])
def test_tiny_lists_images_as_torchvisions_imagefolder_does(tmp_path, released_val):
    from torchvision.datasets import ImageFolder

    _tiny_tree(tmp_path, released_val=released_val)
    root = tmp_path / "tiny-imagenet-200"
    train = data_mod.load_split("tiny", str(tmp_path), train=True)
    folder = ImageFolder(str(root / "train"))
    assert train.labels.tolist() == folder.targets and train.images.shape == (9, 3, 64, 64)
    assert folder.classes == ["n01", "n02", "n03"]
    val = data_mod.load_split("tiny", str(root), train=False)
    # val_i belongs to wnids[i % 3] = n02, n01, n03, ...: labels 1, 0, 2, grouped by class as ImageFolder would
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert [int(v) for v in val.images[:, 0, 0, 0]] == [1, 4, 0, 3, 2, 5]


@pytest.mark.parametrize("dataset", ["gtsrb", "tiny"])
def test_every_attack_makes_a_record_on_the_paper_presets_other_data_sets(tmp_path, dataset):
    """The paper preset names GTSRB (43 classes, 32x32) and Tiny-ImageNet (64x64): every attack of
    Table 2 trains (with augmentation) and writes a record on their layouts (generated trees),
    its poisoned test set at the data set's size."""
    from pgbd_defense.attacks import ATTACKS
    from pgbd_defense.attacks.record import AttackSettings
    from pgbd_defense.experiments.cells import ensure_record
    from pgbd_defense.formats.records import load_attack_record

    root = LAYOUTS[dataset](tmp_path)
    info = data_mod.dataset_info(dataset)
    for attack in ATTACKS.names():
        if attack.startswith("rof"):
            continue  # ROF's overlays are made for its face images only (datasets/rof.py)
        # one mask epoch for IAB (default 25): the layout is under test here, not the mask's density
        settings = AttackSettings(attack=attack, dataset=dataset, width=0.0625, epochs=1, batch_size=8,
                                  augment=True, pratio=0.3, train_subset=0, iab_mask_epochs=1)
        record = load_attack_record(ensure_record(settings, tmp_path / "record", str(root)), data_root=str(root))
        h, w, c = info.size
        assert tuple(record.bd_test.images.shape[1:]) == (c, h, w), attack
        assert len(record.bd_test) > 0 and bool((record.bd_test.labels == 0).all()), attack
