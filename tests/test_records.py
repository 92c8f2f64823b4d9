"""Record write/read round trips, stale PNG paths, the restricted loader, and the
genuine BackdoorBench record in ../shared."""

import os
import shutil

import pytest
import torch

from pgbd_defense import datasets as data_mod
from pgbd_defense.attacks import ATTACKS
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.formats.models import ModelMismatchError, build_model
from pgbd_defense.formats.records import (
    RecordError,
    load_attack_record,
    load_defense_result,
    write_attack_record,
    write_defense_result,
)
from pgbd_defense.formats.safe_pickle import UnsafeRecordError, safe_torch_load
from pgbd_defense.metrics import evaluate

from .conftest import FASHION_MNIST, FIXTURE_RECORD, needs_fashion_mnist, needs_fixture


def _write(tmp_path, data_root, save_png, mode="all2one", model_name="preactresnet18"):
    train = data_mod.load_split("mnist", str(data_root), train=True)
    test = data_mod.load_split("mnist", str(data_root), train=False)
    attack = ATTACKS.get("badnet")(num_classes=10, target=3, ratio=0.2, mode=mode, seed=1)
    bd_train, bd_test = attack.poison_train(train), attack.poison_test(test)
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    folder = tmp_path / "bench" / "record" / "tiny"
    write_attack_record(folder, model=model, model_name=model_name, num_classes=10, clean_data="mnist",
                        data_path="./data/mnist", img_size=(28, 28, 1), bd_train=bd_train, bd_test=bd_test,
                        train_size=len(train), test_size=len(test), save_png=save_png)
    return folder, model, bd_train, bd_test


@pytest.mark.parametrize("save_png", [False, True])
def test_round_trip_restores_model_and_5_tuples(tmp_path, tiny_data, save_png):
    folder, model, bd_train, bd_test = _write(tmp_path, tiny_data, save_png)
    assert (folder / "bd_test_dataset").is_dir() == save_png
    rec = load_attack_record(folder, data_root=str(tiny_data))
    for k, v in model.state_dict().items():
        assert torch.equal(rec.model.state_dict()[k], v), k
    assert rec.architecture == {"in_channels": 1, "width": 0.0625}
    assert torch.equal(rec.bd_test.images, bd_test.images)
    assert torch.equal(rec.bd_test.labels, bd_test.labels)
    assert torch.equal(rec.bd_test.original_index, bd_test.original_index)
    img, label, orig_index, indicator, orig_label = rec.bd_test[0]
    assert (label, orig_index, indicator) == (3, int(bd_test.original_index[0]), 1)
    assert orig_label == int(rec.clean_test.labels[orig_index]) != 3
    assert torch.all(img[:, -3:, -3:] == 255)
    # bd_train exposes every training sample, the poisoned ones replaced
    assert torch.equal(rec.bd_train.images, bd_train.images)
    assert torch.equal(rec.bd_train.labels, bd_train.labels)
    assert int(rec.bd_train.poison_indicator.sum()) == 24  # 20% of 120
    assert rec.target_labels().tolist() == [3, 3, 3, -1, 3, 3, 3, 3, 3, 3]


def test_all2all_mapping_survives_the_round_trip(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False, mode="all2all")
    rec = load_attack_record(folder, data_root=str(tiny_data))
    assert rec.target_labels().tolist() == [(c + 1) % 10 for c in range(10)]


def test_png_paths_resolve_after_the_record_moves(tmp_path, tiny_data):
    folder, _, _, bd_test = _write(tmp_path, tiny_data, save_png=True)
    moved = tmp_path / "elsewhere" / "renamed_parent" / "tiny"
    shutil.copytree(folder, moved)
    shutil.rmtree(tmp_path / "bench")
    rec = load_attack_record(moved, data_root=str(tiny_data))
    assert torch.equal(rec.bd_test.images, bd_test.images)


def test_missing_png_is_a_clear_error(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=True)
    shutil.rmtree(folder / "bd_test_dataset")
    with pytest.raises(RecordError, match="bd_test_dataset"):
        load_attack_record(folder, data_root=str(tiny_data))


def test_model_name_mismatch_is_reported(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False, model_name="vgg19_bn")
    with pytest.raises(ModelMismatchError, match="vgg19_bn"):
        load_attack_record(folder, data_root=str(tiny_data))


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_restricted_loader_refuses_a_malicious_record(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    raw = torch.load(folder / "attack_result.pt", weights_only=False)
    raw["payload"] = _RunsCode()
    torch.save(raw, folder / "attack_result.pt")
    with pytest.raises(UnsafeRecordError, match="posix.system|os.system|--trust-record"):
        load_attack_record(folder, data_root=str(tiny_data))
    # The user can still opt in for a file they made.
    rec = load_attack_record(folder, data_root=str(tiny_data), trust=True)
    assert rec.num_classes == 10


def test_not_a_record_folder(tmp_path):
    with pytest.raises(RecordError, match="no attack_result.pt"):
        load_attack_record(tmp_path)


def test_record_with_missing_key_names_it(tmp_path):
    (tmp_path / "r").mkdir()
    torch.save({"model_name": "preactresnet18", "num_classes": 10}, tmp_path / "r" / "attack_result.pt")
    with pytest.raises(RecordError, match="'model'"):
        load_attack_record(tmp_path / "r")


def test_defense_result_round_trip(tmp_path):
    model = build_model("preactresnet18", 10, width=0.0625)
    write_defense_result(tmp_path, model, "preactresnet18", 10)
    raw = load_defense_result(tmp_path)
    assert raw["model_name"] == "preactresnet18" and raw["num_classes"] == 10
    assert set(raw["model"]) == set(model.state_dict())


@needs_fixture()
def test_genuine_backdoorbench_record_loads_safely():
    raw = safe_torch_load(FIXTURE_RECORD / "attack_result.pt")
    assert raw["model_name"] == "preactresnet18" and raw["clean_data"] == "mnist"
    keys = set(raw["model"])
    ours = set(build_model("preactresnet18", 10).state_dict())
    assert keys == ours, "module names differ from BackdoorBench's preactresnet18"


@needs_fixture()
@needs_fashion_mnist()
def test_genuine_record_reproduces_backdoorbench_metrics_on_a_slice():
    rec = load_attack_record(FIXTURE_RECORD, data_root=str(FASHION_MNIST))
    assert len(rec.bd_test) == 9000 and rec.target_labels().tolist() == [-1] + [0] * 9
    assert rec.clean_test.images.shape == (10000, 3, 28, 28)  # gray served as 3 channels
    sl = slice(0, 400)
    clean = data_mod.ImageSet(rec.clean_test.images[sl], rec.clean_test.labels[sl])
    bd = type(rec.bd_test)(*(getattr(rec.bd_test, f)[sl] for f in
                             ("images", "labels", "original_index", "poison_indicator", "original_labels")))
    m = evaluate(rec.model, clean, bd, Normalizer((0.5,), (0.5,), 3))
    # BackdoorBench measured CA 84.75 / ASR 99.96 on the full sets.
    assert 0.78 <= m["test_acc"] <= 0.92
    assert m["test_asr"] >= 0.99


def test_clean_splits_serve_5_tuples_too(tiny_data):
    test = data_mod.load_split("mnist", str(tiny_data), train=False)
    img, label, index, indicator, original = test[5]
    assert img.shape == (1, 28, 28) and img.dtype == torch.uint8
    assert (label, index, indicator, original) == (5, 5, 0, 5)
