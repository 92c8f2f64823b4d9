"""The ROF adapter and the semantic attacks, on a small generated tree of synthetic
face-like images in the ROF layout. Real results need the real ROF data set
(see pgbd_defense/datasets/rof.py for where to put it)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pgbd_defense.attacks.rof import MaskAttack, SunglassesAttack, TattooAttack, composite, mask_overlays
from pgbd_defense.datasets import DataNotFoundError, load_split
from pgbd_defense.datasets.rof import chosen_identities, occluded_photos

# 12 identities with 4..15 neutral images: the 10 largest are id02..id11.
COUNTS = {f"id{i:02d}": 4 + i for i in range(12)}


def face(identity: int, jitter: int, sunglasses: bool = False) -> Image.Image:
    rng = np.random.default_rng(identity * 100 + jitter)
    img = np.full((80, 80, 3), 90, dtype=np.uint8)
    yy, xx = np.mgrid[:80, :80]
    skin = ((yy - 40) / 30) ** 2 + ((xx - 40) / 22) ** 2 <= 1
    img[skin] = (200, 160 + 3 * identity, 130)
    img[8:16, 20:60] = (20 * identity % 255, 40, 200 - 10 * identity)  # hair colour per identity
    eye_y = 30 + identity % 4
    for x in (30, 50):
        img[eye_y : eye_y + 4, x - 2 : x + 2] = (0, 0, 0) if not sunglasses else (10, 10, 10)
    if sunglasses:
        img[eye_y - 3 : eye_y + 7, 22:58] = (15, 15, 15)
    img = np.clip(img.astype(int) + rng.integers(-6, 6, img.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(img)


def make_rof_tree(root, sunglasses_per_identity: int = 3):
    for i, (name, count) in enumerate(COUNTS.items()):
        (root / "neutral" / name).mkdir(parents=True)
        (root / "sunglasses" / name).mkdir(parents=True)
        for j in range(count):
            face(i, j).save(root / "neutral" / name / f"{j}.jpg")
        for j in range(sunglasses_per_identity):
            face(i, 100 + j, sunglasses=True).save(root / "sunglasses" / name / f"{j}.png")
    return root


@pytest.fixture
def rof_root(tmp_path):
    return make_rof_tree(tmp_path / "ROF")


def test_adapter_keeps_the_ten_largest_identities_and_splits_each(rof_root):
    assert chosen_identities(rof_root) == [f"id{i:02d}" for i in range(2, 12)]
    train, test = load_split("rof", str(rof_root), train=True), load_split("rof", str(rof_root), train=False)
    assert train.images.shape[1:] == (3, 64, 64) and train.images.dtype == torch.uint8
    sizes = [COUNTS[f"id{i:02d}"] for i in range(2, 12)]
    assert len(train) + len(test) == sum(sizes)
    for label, size in enumerate(sizes):  # 10% of each identity (at least one) is test data
        assert int((test.labels == label).sum()) == max(1, round(0.1 * size))
    again = load_split("rof", str(rof_root), train=True)
    assert torch.equal(again.images, train.images)  # the split is fixed


def test_adapter_errors_name_the_layout(tmp_path):
    with pytest.raises(DataNotFoundError, match="neutral/<identity>"):
        load_split("rof", str(tmp_path), train=True)
    with pytest.raises(DataNotFoundError, match="--data-root"):
        load_split("rof", None, train=True)


def test_sunglasses_attack_uses_real_photos_of_non_target_identities(rof_root):
    train = load_split("rof", str(rof_root), train=True)
    test = load_split("rof", str(rof_root), train=False)
    attack = SunglassesAttack(num_classes=10, target=3, ratio=0.05, data_root=str(rof_root))
    photos = occluded_photos(str(rof_root))
    bd = attack.poison_train(train)
    poisoned = bd.poison_indicator.bool()
    assert 0 < int(poisoned.sum()) <= round(0.05 * len(train))
    assert (bd.labels[poisoned] == 3).all() and (bd.original_labels[poisoned] != 3).all()
    # each poisoned image is one of the real sunglasses photos, of the identity it replaced
    for i in torch.nonzero(poisoned).flatten().tolist():
        match = [p for p in range(len(photos)) if torch.equal(photos.images[p], bd.images[i])]
        assert match and int(photos.labels[match[0]]) == int(train.labels[i])
    assert torch.equal(bd.images[~poisoned], train.images[~poisoned])
    bd_test = attack.poison_test(test)
    assert len(bd_test) > 0 and (bd_test.labels == 3).all() and (bd_test.original_labels != 3).all()
    # training and test photos are disjoint
    used = {bd.images[i].numpy().tobytes() for i in torch.nonzero(poisoned).flatten().tolist()}
    assert not used & {img.numpy().tobytes() for img in bd_test.images}
    with pytest.raises(ValueError, match="all-to-one"):
        SunglassesAttack(num_classes=10, mode="all2all", data_root=str(rof_root))


def test_composite_arithmetic_by_hand():
    images = torch.full((1, 3, 4, 4), 100, dtype=torch.uint8)
    overlay = torch.zeros(4, 2, 2)
    overlay[:3] = 1.0  # white
    overlay[3, 0, 0], overlay[3, 1, 1] = 1.0, 0.5
    out = composite(images, overlay, 1, 2)
    assert out[0, 0, 1, 2] == 255  # alpha 1: the overlay
    assert out[0, 0, 2, 3] == round(0.5 * 255 + 0.5 * 100)  # alpha 0.5: halfway
    assert out[0, 0, 1, 3] == 100 and out[0, 0, 0, 0] == 100  # alpha 0 and outside: unchanged


def test_tattoo_sits_on_the_cheek_and_masks_vary(rof_root, tmp_path):
    train = load_split("rof", str(rof_root), train=True)
    tattooed = TattooAttack(num_classes=10).apply_trigger(train.images[:5])
    changed = (tattooed != train.images[:5]).any(1).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert rows.min() >= int(0.6 * 64) and cols.min() >= int(0.62 * 64)  # lower right of the face only
    masks = MaskAttack(num_classes=10)
    assert len(masks.designs) == len(mask_overlays()) == 4
    used = {masks.design_of(img) for img in train.images}
    assert len(used) > 1  # several overlays in use
    masked = masks.apply_trigger(train.images[:5])
    changed = (masked != train.images[:5]).any(1).any(0)
    assert changed[: int(0.55 * 64)].sum() == 0 and changed[int(0.6 * 64):].any()  # the lower face only
    assert torch.equal(masks.apply_trigger(train.images[:5]), masked)  # deterministic
    # a user overlay replaces ours
    png = tmp_path / "ink.png"
    Image.fromarray(np.full((6, 6, 4), 255, dtype=np.uint8)).save(png)
    user = TattooAttack(num_classes=10, overlays=[str(png)]).apply_trigger(train.images[:1])
    assert (user[0, :, 38:44, 39:45] == 255).all()


def test_rof_records_round_trip_and_are_defended(rof_root, tmp_path):
    import json

    from pgbd_defense.formats.records import load_attack_record
    from pgbd_defense.run import main

    for attack in ("rof-sunglasses", "rof-tattoo", "rof-mask"):
        args = ["--attack", attack, "--dataset", "rof", "--data-root", str(rof_root), "--model", "resnet50",
                "--width", "0.125", "--record-root", str(tmp_path / "record"), "--attack-epochs", "1",
                "--attack-target", "0", "--epochs", "1", "--ratio", "0.5", "--no-progress"]
        assert main(args) == 0, attack
    records = sorted((tmp_path / "record").iterdir())
    assert [r.name.split("_")[0] for r in records] == ["rof-mask", "rof-sunglasses", "rof-tattoo"]
    for folder in records:
        rec = load_attack_record(folder, data_root=str(rof_root))
        assert rec.clean_data == "rof" and rec.clean_train.images.shape[1:] == (3, 64, 64)
        assert len(rec.bd_test) > 0 and (rec.bd_test.labels == 0).all()
        summary = json.loads((folder / "defense" / "pgbd" / "summary.json").read_text())
        assert summary["dataset"] == "rof"


def test_a_checkout_learns_rof_through_the_adapter(rof_root, tmp_path, tiny_data):
    """The benchmark's data set functions (here the stand-in checkout's) serve rof after
    install(), and any benchmark script run through the launcher sees them."""
    import subprocess
    import sys
    from types import SimpleNamespace

    from pgbd_defense.bench.checkout import bench_imports
    from pgbd_defense.bench.rof_support import install

    from .fake_bench import make_fake_checkout

    root = make_fake_checkout(tmp_path / "bb", tiny_data)
    with bench_imports(root):
        assert install() and install()  # idempotent
        from utils.aggregate_block import dataset_and_transform_generate as mod

        assert mod.get_num_classes("rof") == 10 and mod.get_input_shape("rof") == (64, 64, 3)
        assert mod.get_num_classes("mnist") == 10  # other names still go to the benchmark
        train, train_t, _, test, test_t, _ = mod.dataset_and_transform_generate(
            SimpleNamespace(dataset="rof", dataset_path=str(rof_root)))
        img, label = train[0]
        assert img.size == (64, 64) and img.mode == "RGB" and 0 <= label < 10
        assert len(train) + len(test) == sum(sorted(COUNTS.values())[-10:])
    script = root / "defense" / "count_rof.py"
    script.write_text(
        "import argparse\n"
        "from utils.aggregate_block.dataset_and_transform_generate import dataset_and_transform_generate\n"
        "p = argparse.ArgumentParser(); p.add_argument('--dataset'); p.add_argument('--dataset_path')\n"
        "a = p.parse_args()\n"
        "print('items', len(dataset_and_transform_generate(a)[0]))\n")
    out = subprocess.run([sys.executable, "-m", "pgbd_defense.bench.rof_support", "./defense/count_rof.py",
                          "--dataset", "rof", "--dataset_path", str(rof_root)], cwd=root, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert f"items {len(train)}" in out.stdout
