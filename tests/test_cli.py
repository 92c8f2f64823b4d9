"""The command line on tiny generated data: outputs in BackdoorBench's layout, and
bad input answered by one clear error (exit code 2) that never overwrites results."""

import json
import math

import pandas as pd
import pytest
import torch

from pgbd_defense import datasets as data_mod
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses.loop import NonFiniteLossError
from pgbd_defense.defenses.pgbd import PGBDConfig, pgbd_finetune
from pgbd_defense.formats.records import load_defense_result
from pgbd_defense.run import main

from .test_records import _write

FAST = ["--epochs", "2", "--batch-size", "16", "--ratio", "0.5", "--no-progress"]


@pytest.fixture
def record(tmp_path, tiny_data):
    folder, *_ = _write(tmp_path, tiny_data, save_png=True)
    return folder, tiny_data


def _run(record, *extra):
    folder, data_root = record
    return main(["--record", str(folder), "--data-root", str(data_root), *FAST, *extra])


def test_defense_folder_has_backdoorbench_files(record, capsys):
    assert _run(record) == 0
    out = record[0] / "defense" / "pgbd"
    for name in ("defense_result.pt", "pgbd_df.csv", "pgbd_df_summary.csv", "index.txt", "summary.json",
                 "config.yaml"):
        assert (out / name).is_file(), name
    assert len(list((out / "log").glob("*.log"))) == 1
    df = pd.read_csv(out / "pgbd_df.csv", index_col=0)
    assert list(df.columns[:9]) == ["epoch", "batch", "train_epoch_loss_avg_over_batch", "train_acc",
                                    "clean_test_loss_avg_over_batch", "bd_test_loss_avg_over_batch", "test_acc",
                                    "test_asr", "test_ra"]
    assert df["epoch"].tolist() == [0, 1]
    summary_df = pd.read_csv(out / "pgbd_df_summary.csv", index_col=0)
    assert summary_df.index.tolist() == ["last", "valid_max", "exist_nan_value"]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("attack", "dataset", "defense", "ca_poisoned", "asr_poisoned", "ra_poisoned", "ca", "asr", "ra",
                "dem", "seconds"):
        assert key in summary
    # Per-epoch test evaluation is off by default: only the returned epoch's row has test numbers.
    selected = summary["selected_epoch"]
    assert df["test_acc"].notna().tolist() == [epoch == selected for epoch in (0, 1)]
    assert summary["ca"] == pytest.approx(df["test_acc"].iloc[selected])
    assert summary["asr"] == pytest.approx(df["test_asr"].iloc[selected])
    for phase in ("prepare", "training", "selection", "evaluation", "poisoned_evaluation"):
        assert summary[f"seconds_{phase}"] >= 0, phase
    assert summary["seconds_prepare"] + summary["seconds_training"] <= summary["seconds"] + 0.1
    assert len((out / "index.txt").read_text().split()) == 60  # 50% of 120
    assert load_defense_result(out)["model_name"] == "preactresnet18"
    printed = capsys.readouterr().out
    assert "poisoned" in printed and "pgbd" in printed and "DEM" in printed


def test_existing_results_are_not_overwritten(record, caplog):
    assert _run(record) == 0
    out = record[0] / "defense" / "pgbd"
    before = (out / "summary.json").read_bytes(), (out / "defense_result.pt").read_bytes()
    assert _run(record, "--lr", "0.5") == 2
    assert "--overwrite" in caplog.text
    assert ((out / "summary.json").read_bytes(), (out / "defense_result.pt").read_bytes()) == before
    assert _run(record, "--overwrite") == 0


@pytest.mark.parametrize("args, message", [
    (["--layer", "layer9.conv"], "layer4.1.conv2"),
    (["--target", "12"], "out of range"),
    (["--loss-form", "sine"], "loss_form='sine' (choose 'cos', 'abs_cos', 'relu_cos')"),
    (["--batch-size", "x"], None),
])
def test_bad_values_fail_clearly(record, caplog, args, message):
    if message is None:
        with pytest.raises(SystemExit) as e:  # argparse rejects a value of the wrong type itself
            _run(record, *args)
        assert e.value.code == 2
        return
    assert _run(record, *args) == 2
    assert message in caplog.text
    assert not (record[0] / "defense" / "pgbd").exists()  # checked before the defense folder is made


def test_unknown_attack_and_dataset_are_named(tmp_path, caplog):
    assert main(["--attack", "nosuch", "--record-root", str(tmp_path), "--no-progress"]) == 2
    assert "unknown attack 'nosuch'" in caplog.text and "badnet" in caplog.text
    assert main(["--dataset", "imagenet42", "--record-root", str(tmp_path), "--no-progress"]) == 2
    assert "unknown dataset 'imagenet42'" in caplog.text
    assert main(["--model", "resnet9000", "--record-root", str(tmp_path), "--no-progress"]) == 2
    assert "unknown model 'resnet9000'" in caplog.text and "vgg19_bn" in caplog.text


def test_missing_data_names_every_place_looked(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("PGBD_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert main(["--dataset", "fashion-mnist", "--data-root", str(tmp_path / "empty"), "--record-root",
                 str(tmp_path / "rec"), "--no-progress"]) == 2
    assert str(tmp_path / "empty") in caplog.text and str(tmp_path / "nowhere") in caplog.text
    assert "dataset-fashion-mnist" in caplog.text


def test_yaml_config_is_applied_and_checked(record, tmp_path, caplog):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lambda: 2.5\nloss_form: abs_cos\nlr: 1e-3\n")
    assert _run(record, "--config", str(cfg)) == 0
    saved = (record[0] / "defense" / "pgbd" / "config.yaml").read_text()
    assert "lambda: 2.5" in saved and "loss_form: abs_cos" in saved and "lr: 0.001" in saved
    cfg.write_text("lamda: 2.5\n")
    assert _run(record, "--config", str(cfg), "--overwrite") == 2
    assert "unknown config keys ['lamda']" in caplog.text


def test_nan_loss_stops_with_epoch_and_batch(tiny_data):
    train = data_mod.load_split("mnist", str(tiny_data), train=True)
    from pgbd_defense.formats.models import build_model
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    with torch.no_grad():
        model.linear.weight.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match="epoch 1, batch 1"):
        pgbd_finetune(model, train, torch.zeros(10, dtype=torch.int64), Normalizer((0.5,), (0.5,), 1),
                      PGBDConfig(epochs=1, lam=0.0))


def test_poisoned_model_is_evaluated_once_per_record(record, monkeypatch):
    import pgbd_defense.pipeline as run_module

    assert _run(record, "--defense-name", "first") == 0
    caches = list((record[0] / "defense").glob(".poisoned_eval_*.json"))
    assert len(caches) == 1
    cached = json.loads(caches[0].read_text())
    summary = json.loads((record[0] / "defense" / "first" / "summary.json").read_text())
    assert cached["test_acc"] == summary["ca_poisoned"] and cached["test_asr"] == summary["asr_poisoned"]
    calls = []
    real = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _run(record, "--defense-name", "second", "--eval-every", "100", "--select", "last") == 0
    assert len(calls) == 1  # the defended model only; the poisoned numbers came from the cache


def test_only_the_returned_model_is_evaluated_unless_asked(record, monkeypatch):
    """Per-epoch test evaluation is a diagnostic, off by default; when it is on, the returned
    epoch's numbers are reused rather than computed again."""
    import pgbd_defense.pipeline as run_module

    calls = []
    real = run_module.evaluate
    monkeypatch.setattr(run_module, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert _run(record, "--defense-name", "quiet", "--epochs", "3") == 0
    assert len(calls) == 2  # the poisoned model (then cached for the record) and the returned one
    calls.clear()
    assert _run(record, "--defense-name", "diagnosed", "--epochs", "3", "--eval-every", "1") == 0
    assert len(calls) == 3
    out = record[0] / "defense"
    df = pd.read_csv(out / "diagnosed" / "diagnosed_df.csv", index_col=0)
    summary = json.loads((out / "diagnosed" / "summary.json").read_text())
    assert df["test_acc"].notna().all()
    assert summary["ca"] == df["test_acc"].iloc[summary["selected_epoch"]]
    quiet = json.loads((out / "quiet" / "summary.json").read_text())
    assert (quiet["ca"], quiet["asr"], quiet["ra"]) == (summary["ca"], summary["asr"], summary["ra"])


def test_negative_eval_every_is_refused_before_any_work(record, caplog):
    assert _run(record, "--eval-every", "-1") == 2
    assert "eval_every=-1 (must be >= 0" in caplog.text
    assert not (record[0] / "defense" / "pgbd").exists()


def test_no_progress_lasts_for_its_own_call_only(tmp_path, monkeypatch):
    """--no-progress silences one run; a later call in the same process has its bars back."""
    from pgbd_defense.util import progress

    monkeypatch.setattr(progress, "_enabled", True)  # the tests' conftest turns bars off
    seen = []
    monkeypatch.setattr("pgbd_defense.run._run", lambda args: seen.append(progress._enabled) or 0)
    assert main(["--record", str(tmp_path / "nothing"), "--no-progress"]) == 0
    assert seen == [False] and progress._enabled
