"""Fuzzing the loaders of everything a user hands us: records, configs, index files.
Whatever the bytes, the only outcome is one of our clear errors, and nothing is written."""

import io
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgbd_defense.datasets import DataNotFoundError
from pgbd_defense.formats.defense_folder import read_index
from pgbd_defense.formats.models import ModelMismatchError
from pgbd_defense.formats.records import RecordError, load_attack_record
from pgbd_defense.formats.safe_pickle import UnreadableFileError, UnsafeRecordError
from pgbd_defense.run import main
from pgbd_defense.settings import ConfigError, read_yaml, resolve
from pgbd_defense.util.registry import UnknownNameError

from .conftest import make_idx_dataset
from .test_records import _write

# Each of these carries a message naming the problem; the CLI turns them into exit code 2.
CLEAR_ERRORS = (RecordError, UnsafeRecordError, UnreadableFileError, ModelMismatchError, UnknownNameError,
                DataNotFoundError)
FUZZ = settings(max_examples=int(os.environ.get("PGBD_FUZZ_EXAMPLES", "30")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def valid_record(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    data_root = make_idx_dataset(tmp / "data")
    folder, *_ = _write(tmp, data_root, save_png=False)
    return folder, data_root, (folder / "attack_result.pt").read_bytes()


def _snapshot(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*"))


def _load_expecting_clear_error(folder, data_root, payload: bytes):
    (folder / "attack_result.pt").write_bytes(payload)
    before = _snapshot(folder)
    try:
        load_attack_record(folder, data_root=str(data_root))
    except CLEAR_ERRORS:
        pass
    assert _snapshot(folder) == before


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes(valid_record, tmp_path, payload):
    folder = tmp_path / "r"
    folder.mkdir(exist_ok=True)
    _load_expecting_clear_error(folder, valid_record[1], payload)


@FUZZ
@given(st.integers(min_value=0, max_value=10**9))
def test_truncated_record(valid_record, tmp_path, cut):
    _, data_root, good = valid_record
    folder = tmp_path / "r"
    folder.mkdir(exist_ok=True)
    _load_expecting_clear_error(folder, data_root, good[: cut % len(good)])


JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-5, 10**6), max_size=4),
                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=3))
PATHS = st.sampled_from([("model_name",), ("num_classes",), ("img_size",), ("model",), ("clean_data",),
                         ("bd_test",), ("bd_test", "original_index_array"), ("bd_test", "poison_indicator"),
                         ("bd_test", "bd_data_container"), ("bd_test", "bd_data_container", "data_dict"),
                         ("bd_train",), ("bd_train", "original_index_array")])


@FUZZ
@given(PATHS, JUNK)
def test_wrong_types_anywhere(valid_record, tmp_path, path, junk):
    folder0, data_root, good = valid_record
    raw = torch.load(io.BytesIO(good), weights_only=False)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = junk
    buf = io.BytesIO()
    torch.save(raw, buf)
    folder = tmp_path / "r"
    folder.mkdir(exist_ok=True)
    _load_expecting_clear_error(folder, data_root, buf.getvalue())


@FUZZ
@given(st.lists(st.integers(-10**6, 10**6), min_size=1, max_size=20))
def test_out_of_range_indices(valid_record, tmp_path, indices):
    _, data_root, good = valid_record
    raw = torch.load(io.BytesIO(good), weights_only=False)
    raw["bd_test"]["original_index_array"] = np.asarray(indices, dtype=np.int64)
    buf = io.BytesIO()
    torch.save(raw, buf)
    folder = tmp_path / "r"
    folder.mkdir(exist_ok=True)
    _load_expecting_clear_error(folder, data_root, buf.getvalue())


class _Call:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


@pytest.mark.parametrize("fn, args", [(os.system, ("true",)), (eval, ("1",)), (shutil.rmtree, ("/nonexistent",)),
                                      (open, ("/dev/null",)), (pickle.loads, (b"N.",))])
def test_code_running_records_are_refused(valid_record, tmp_path, fn, args):
    _, data_root, good = valid_record
    raw = torch.load(io.BytesIO(good), weights_only=False)
    raw["bd_test"]["bd_data_container"]["save_file_format"] = _Call(fn, args)
    buf = io.BytesIO()
    torch.save(raw, buf)
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "attack_result.pt").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeRecordError, match="--trust-record"):
        load_attack_record(folder, data_root=str(data_root))


def test_hostile_record_through_the_cli_exits_2_and_writes_nothing(valid_record, tmp_path, caplog):
    folder0, data_root, good = valid_record
    raw = torch.load(io.BytesIO(good), weights_only=False)
    raw["x"] = _Call(os.system, ("touch " + str(tmp_path / "pwned"),))
    folder = tmp_path / "record" / "evil"
    folder.mkdir(parents=True)
    torch.save(raw, folder / "attack_result.pt")
    assert main(["--record", str(folder), "--data-root", str(data_root), "--no-progress"]) == 2
    assert not (tmp_path / "pwned").exists()
    assert not (folder / "defense").exists()
    assert "posix.system" in caplog.text or "os.system" in caplog.text


@FUZZ
@given(st.text(max_size=200))
def test_config_text_fuzz(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    try:
        resolve("cpu", None, read_yaml(str(p)))
    except ConfigError:
        pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["lr", "epochs", "lambda", "loss_form", "freeze_bn", "index", "nope", "preset",
                                        "defense", "weight_decay", "n_rounds", "beta1", "rho_min", "rho_max", "amp",
                                        "teacher_model_loc", "betas", "lr_scheduler", "target"]),
                       JUNK, max_size=4))
def test_config_values_fuzz(tmp_path, values):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(values))
    try:
        resolve("cpu", None, read_yaml(str(p)))
    except ConfigError:
        pass


@FUZZ
@given(st.text(max_size=100))
def test_index_file_fuzz(tmp_path, text):
    p = tmp_path / "index.txt"
    p.write_text(text)
    try:
        idx = read_index(p, 100)
        assert all(0 <= i < 100 for i in idx)
    except ValueError:
        pass
