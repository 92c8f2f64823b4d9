"""The settings spine: every field of the table reaches its consumer on every path (our
flags, YAML, the BackdoorBench launcher's flags, ``--bench-root`` forwarding), BackdoorBench's
YAML keys mean here what they mean there, the parts' defaults are the table's, and every
setting is checked before any work."""

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest
import torch
import yaml

from pgbd_defense.attacks.record import AttackSettings
from pgbd_defense.bench.installer import install
from pgbd_defense.bench.plugin import add_arguments, launcher_settings
from pgbd_defense.defenses import DEFENSES, defense_config
from pgbd_defense.defenses.ftsam import FTSAMConfig
from pgbd_defense.defenses.ibau import IBAUConfig
from pgbd_defense.defenses.loop import LoopConfig, Selection
from pgbd_defense.defenses.mcl import MCLConfig
from pgbd_defense.defenses.nad import NADConfig
from pgbd_defense.defenses.pgbd import PGBDConfig
from pgbd_defense.method.mapping import TeacherConfig
from pgbd_defense.method.targets import TargetConfig
from pgbd_defense.pipeline import RunConfig
from pgbd_defense.run import build_parser, main, settings_of
from pgbd_defense.settings import FIELDS, SECTIONS, ConfigError, read_yaml, resolve
from pgbd_defense.settings.cli import launcher_flags, render

from .fake_bench import make_fake_checkout
from .test_records import _write

REPO = Path(__file__).resolve().parents[1]

CONSUMERS = {"attack": AttackSettings, "run": RunConfig, "loop": LoopConfig, "selection": Selection,
             "targets": TargetConfig, "mapping": TeacherConfig, "pgbd": PGBDConfig, "nad": NADConfig,
             "ftsam": FTSAMConfig, "ibau": IBAUConfig, "mcl": MCLConfig}
# Attributes of a part's config that the table does not set (PGBD's variant is its defense's name).
NOT_SETTINGS = {PGBDConfig: {"variant"}}


def examples(tmp_path: Path, preset: str = "cpu") -> dict:
    """A valid value for every field that differs from the preset's."""
    base = resolve(preset, "pgbd")
    (tmp_path / "files").mkdir(exist_ok=True)
    files = {name: tmp_path / "files" / name for name in ("index.txt", "trigger.png", "overlay.png", "teacher.pt")}
    files["index.txt"].write_text("0\n1\n")
    for name in ("trigger.png", "overlay.png"):
        files[name].write_bytes(b"not read by a dry run")
    torch.save(torch.zeros(2, 4), files["teacher.pt"])
    special = {"attack": "blended", "dataset": "mnist", "model": "vgg19_bn", "trigger_image": str(files["trigger.png"]),
               "overlays": str(files["overlay.png"]), "data_root": str(tmp_path / "data"), "device": "cuda:1",
               "index": str(files["index.txt"]), "target": "3", "layer": "layer3", "mapping": str(files["teacher.pt"]),
               "adam_betas": [0.8, 0.99], "steplr_milestones": [2, 3], "nt_classes": [1, 2],
               "inversion_classes": [0, 1, 2], "betas": [1.5, 2.5], "nad_layers": ["layer2", "layer3"],
               "extra_layers": ["layer2"], "mmdr_layers": ["layer2"]}
    out = {}
    for name, f in FIELDS.items():
        now = base[name]
        if name in special:
            out[name] = special[name]
        elif f.choices:
            out[name] = next(c for c in f.choices if c != now)
        elif f.type is bool:
            out[name] = not now
        elif f.type is int:
            out[name] = now + 1
        elif f.type is float:
            out[name] = now * 0.5 if now else 0.5
        else:
            raise AssertionError(f"give the field {name} an example value")
        assert out[name] != now, name
    return out


def our_flags(values: dict) -> list:
    """Values as our command line spells them (booleans as --x / --no-x, lists comma-separated)."""
    argv = []
    for name, value in values.items():
        flag = FIELDS[name].flags[0]
        if FIELDS[name].type is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return argv


def test_every_field_feeds_an_attribute_of_its_consumer_and_every_attribute_is_fed():
    resolved = resolve("paper", "pgbd")
    for section in SECTIONS:
        cls = CONSUMERS[section]
        # a defense's config extends the loop's: the "loop" section fills the inherited part
        sections = ("loop", section) if issubclass(cls, LoopConfig) and cls is not LoopConfig else (section,)
        attributes = {f.name for f in dataclasses.fields(cls)}
        fed = [f.uses[s] for s in sections for f in FIELDS.values() if s in f.uses]
        assert len(fed) == len(set(fed)), (section, "an attribute is fed twice")
        assert set(fed) <= attributes, (section, set(fed) - attributes)
        assert attributes - NOT_SETTINGS.get(cls, set()) <= set(fed), (section, attributes - set(fed))
        cls(**{k: v for s in sections for k, v in resolved.section(s).items()})  # preset values are valid


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_config_defaults_are_the_tables_paper_values(defense):
    spec = DEFENSES.get(defense)
    from_table = defense_config(defense, resolve("paper", defense))
    from_class = spec.config(**(spec.extra or {}))
    for f in dataclasses.fields(spec.config):
        a, b = getattr(from_table, f.name), getattr(from_class, f.name)
        assert a == b or (isinstance(a, (list, tuple)) and list(a) == list(b)), (defense, f.name, a, b)


def test_every_flag_reaches_the_settings(tmp_path):
    values = examples(tmp_path)
    settings = settings_of(build_parser().parse_args(our_flags(values)))
    assert {k: settings[k] for k in values} == values
    assert settings.explicit == set(values)


def test_every_yaml_key_reaches_the_settings(tmp_path):
    values = examples(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(values))
    settings = resolve(None, None, read_yaml(str(path)))
    assert {k: settings[k] for k in values} == values and settings.preset == "cpu"


def test_every_launcher_flag_reaches_the_launchers_settings(tmp_path):
    """What --bench-root forwards (launcher_flags) is read back by defense/pgbd.py's parser."""
    values = examples(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--yaml_path", "", "--preset", "cpu", *launcher_flags(values)])
    settings = launcher_settings(args)
    assert {k: settings[k] for k in values} == values


def test_dry_run_checks_and_prints_the_settings_a_run_would_save(tmp_path, tiny_data, capsys):
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    values = examples(tmp_path)
    assert main(["--record", str(folder), "--dry-run", *our_flags(values)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert {k: printed[k] for k in values} == values
    assert printed["preset"] == "cpu" and printed["defense"] == "pgbd"
    assert not (folder / "defense").exists()  # nothing was touched


@pytest.fixture
def bench(tmp_path, tiny_data):
    _write(tmp_path, tiny_data, save_png=True)  # record at <tmp>/bench/record/tiny
    root = make_fake_checkout(tmp_path / "bench", tiny_data)
    install(root)
    return root


def test_bench_root_forwards_every_setting(bench, tmp_path, capfd, monkeypatch):
    """Inside a checkout, each setting goes where it is consumed: the attack's to the benchmark's
    attack script (by its own flag names), the rest to defense/pgbd.py. (Before the field table,
    19 of about 50 settings were forwarded and the others dropped without a word.)"""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    values = examples(tmp_path)
    refused = {n for n, f in FIELDS.items() if set(f.uses) == {"attack"} and not f.attack_flag
               and n not in ("attack", "dataset", "model")}
    assert refused == {"width", "attack_train_subset", "attack_augment", "trojan_optimize", "overlays", "mmdr_lambda",
                       "mmdr_layers"}
    given = {k: v for k, v in values.items() if k not in refused}
    assert main(["--bench-root", str(bench), "--dry-run", "--no-progress", *our_flags(given)]) == 0
    out = capfd.readouterr().out
    launcher = yaml.safe_load(out)  # the launcher's own settings (the attack line is a YAML comment)
    to_launcher = {k: v for k, v in given.items() if set(FIELDS[k].uses) - {"attack"} or k in ("model", "dataset")}
    assert {k: launcher[k] for k in to_launcher} == to_launcher
    attack_line = next(line for line in out.splitlines() if line.startswith("# would make"))
    for name in given:
        f = FIELDS[name]
        if f.attack_flag and name != "dataset":
            assert f"{f.attack_flag} {render(f, given[name])}" in attack_line, (name, attack_line)
    assert "./attack/blended.py" in attack_line


def test_bench_root_refuses_attack_settings_the_benchmark_cannot_take(bench, caplog):
    code = main(["--bench-root", str(bench), "--attack", "badnet", "--dataset", "mnist", "--width", "0.5",
                 "--attack-train-subset", "100", "--dry-run", "--no-progress"])
    assert code == 2
    assert "no equivalent of --attack-train-subset, --width" in caplog.text and "--attack-args" in caplog.text


def test_bench_root_runs_pgbd_variants_only(bench, caplog):
    assert main(["--bench-root", str(bench), "--dataset", "mnist", "--defense", "nad", "--no-progress"]) == 2
    assert "--compare nad" in caplog.text


# ---------------------------------------------------------------- BackdoorBench's YAML keys


def test_benchmark_yaml_keys_mean_the_same_here(caplog):
    caplog.set_level(logging.INFO)
    s = resolve("cpu", "ft", {"weight_decay": 5e-4, "momentum": 0.5, "client_optimizer": "Adam",
                              "dataset_path": "./data", "amp": True, "num_workers": 4, "teacher_model_loc": None})
    assert (s["wd"], s["sgd_momentum"], s["optimizer"], s["data_root"], s["amp"]) == (5e-4, 0.5, "adam", "./data",
                                                                                     True)
    assert "ignored BackdoorBench keys: num_workers" in caplog.text
    s = resolve("cpu", "nad", {"beta1": 100, "beta2": 200, "beta3": 300})
    assert s["betas"] == [100.0, 200.0, 300.0]
    s = resolve("cpu", "ft-sam", {"rho_max": 8.0, "rho_min": 8.0})
    assert s["rho"] == 8.0
    with pytest.raises(ConfigError, match="rho_min=2.0 differs from rho=8.0"):
        resolve("cpu", "ft-sam", {"rho_max": 8.0, "rho_min": 2.0})
    with pytest.raises(ConfigError, match="teacher_model_loc"):
        resolve("cpu", "nad", {"teacher_model_loc": "teacher.pt"})


def test_when_a_file_gives_both_spellings_the_one_the_benchmark_reads_wins(caplog):
    # BackdoorBench's nad config.yaml has wd 5e-4 and weight_decay 1e-4; nad.py reads wd.
    s = resolve("cpu", "nad", {"wd": 5e-4, "weight_decay": 1e-4})
    assert s["wd"] == 5e-4 and "using wd" in caplog.text
    # Its i-bau config.yaml has epochs 100 and n_rounds 5; i-bau.py reads n_rounds.
    s = resolve("cpu", "i-bau", {"epochs": 100, "n_rounds": 5})
    assert s["epochs"] == 5 and "using n_rounds" in caplog.text


def test_weight_decay_in_a_config_trains_with_that_decay(tmp_path, tiny_data):
    """It used to pass as an unread 'passthrough' key: training ran with the preset's 1e-4."""
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("weight_decay: 0.0005\nmomentum: 0.5\n")
    assert main(["--record", str(folder), "--data-root", str(tiny_data), "--config", str(cfg), "--epochs", "1",
                 "--batch-size", "16", "--ratio", "0.5", "--no-progress"]) == 0
    saved = yaml.safe_load((folder / "defense" / "pgbd" / "config.yaml").read_text())
    assert saved["wd"] == 5e-4 and saved["sgd_momentum"] == 0.5


def test_preset_in_a_config_selects_the_preset_unless_a_flag_does(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: paper\n")
    s = settings_of(build_parser().parse_args(["--config", str(cfg)]))
    assert s.preset == "paper" and s["lr"] == 1e-4 and s["epochs"] == 35
    s = settings_of(build_parser().parse_args(["--config", str(cfg), "--preset", "cpu"]))
    assert s.preset == "cpu" and s["lr"] == 0.02


def test_unknown_and_mistyped_keys_are_refused():
    with pytest.raises(ConfigError, match=r"unknown config keys \['lamda'\]"):
        resolve("cpu", None, {"lamda": 2})
    with pytest.raises(ConfigError, match="'epochs' must be int"):
        resolve("cpu", None, {"epochs": 2.5})
    with pytest.raises(ConfigError, match="freeze_bn"):
        resolve("cpu", None, {"freeze_bn": "yes"})
    with pytest.raises(ConfigError, match="lr_scheduler='ReduceLROnPlateau'"):
        resolve("cpu", None, {"lr_scheduler": "ReduceLROnPlateau"})
    assert resolve("cpu", None, {"lr": "1e-4", "target": 3})["target"] == "3"  # YAML 1.1 strings and ints


# ---------------------------------------------------------------- checks before any work, errors


def test_a_bad_setting_fails_before_the_attack_trains(tmp_path, caplog, monkeypatch):
    import pgbd_defense.pipeline as pipeline

    monkeypatch.setattr(pipeline, "build_attack_record", lambda *a, **k: pytest.fail("the attack ran"))
    assert main(["--attack", "badnet", "--dataset", "fashion-mnist", "--lr", "-1", "--record-root",
                 str(tmp_path / "rec"), "--no-progress"]) == 2
    assert "lr=-1.0 (must be > 0)" in caplog.text and not (tmp_path / "rec").exists()
    caplog.clear()
    assert main(["--attack", "badnet", "--pratio", "1.5", "--attack-target", "12", "--defense", "nad",
                 "--nad-layers", "layer3,nowhere", "--record-root", str(tmp_path / "rec"), "--no-progress"]) == 2
    for part in ("pratio=1.5", "attack_target=12", "betas [500.0, 1000.0, 1000.0] and layers"):
        assert part in caplog.text, part
    caplog.clear()
    assert main(["--attack", "badnet", "--layer", "layer9", "--record-root", str(tmp_path / "rec"),
                 "--no-progress"]) == 2
    assert "model has no layer 'layer9'" in caplog.text and not (tmp_path / "rec").exists()


def test_an_internal_bug_keeps_its_traceback(tmp_path, tiny_data, monkeypatch):
    """Only user errors become one line and exit code 2; a bug of ours must show where it is."""
    import pgbd_defense.run as run_module

    folder, *_ = _write(tmp_path, tiny_data, save_png=False)

    def broken(*a, **k):
        raise ValueError("an internal bug")

    monkeypatch.setattr(run_module, "defend", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["--record", str(folder), "--data-root", str(tiny_data), "--no-progress"])


def test_user_errors_share_one_base():
    from pgbd_defense.datasets import DataNotFoundError
    from pgbd_defense.errors import UserError
    from pgbd_defense.formats.records import RecordError
    from pgbd_defense.formats.safe_pickle import UnreadableFileError, UnsafeRecordError

    for cls in (ConfigError, DataNotFoundError, RecordError, UnsafeRecordError, UnreadableFileError):
        assert issubclass(cls, UserError), cls



def test_docs_settings_md_is_the_table():
    from pgbd_defense.settings.__main__ import markdown

    assert (REPO / "docs" / "settings.md").read_text() == markdown(), \
        "regenerate it: python -m pgbd_defense.settings > docs/settings.md"


def test_protocol_names_a_preset():
    assert settings_of(build_parser().parse_args(["--protocol", "paper"])).preset == "bench"
    assert settings_of(build_parser().parse_args(["--protocol", "equal-budget"])).preset == "cpu"
    with pytest.raises(ConfigError, match="--protocol paper is --preset bench, not cpu"):
        settings_of(build_parser().parse_args(["--protocol", "paper", "--preset", "cpu"]))
