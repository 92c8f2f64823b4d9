"""Defender-realistic selection: a clean held-out split, the best epoch by its accuracy,
the collapse guard, and proof that poisoned data cannot influence the choice."""

import json

import pytest
import torch

import pgbd_defense.pipeline as pipeline_module
import pgbd_defense.run as run_module
from pgbd_defense import datasets as data_mod
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses.loop import LoopConfig, Method, Selection, finetune, split_validation
from pgbd_defense.defenses.pgbd import PGBDConfig, PGBDMethod
from pgbd_defense.formats.models import build_model
from pgbd_defense.formats.records import load_defense_result
from pgbd_defense.method.pav_sources import nt_target

from .test_records import _write

# The loop's defaults are BackdoorBench's FT (augmentation, a per-epoch cosine of T_max 100,
# weight decay 5e-4); these tests fine-tune a few epochs without augmentation, the rate
# annealed over the whole run.
SMALL = {"augment": False, "scheduler_interval": "batch", "cos_t_max": 0}
NORM = Normalizer((0.5,), (0.5,), 1)


def _tiny(tiny_data):
    return data_mod.load_split("mnist", str(tiny_data), train=True)


def test_validation_split_holds_out_each_class_and_is_disjoint(tiny_data):
    clean = _tiny(tiny_data)
    train, val = split_validation(clean, 0.25, seed=0)
    assert len(train) + len(val) == len(clean)
    assert sorted(torch.unique(val.labels).tolist()) == list(range(10))
    assert torch.bincount(val.labels).tolist() == [3] * 10  # 25% of 12 per class
    flat = {tuple(im.flatten().tolist()) for im in train.images}
    assert not any(tuple(im.flatten().tolist()) in flat for im in val.images)
    assert split_validation(clean, 0.0, seed=0) == (clean, None)


class _Scripted(Method):
    """Epoch 0: a few real updates; epoch 1: the model is forced to collapse (weights zeroed)."""

    name = "scripted"

    def step(self, model, x, y, store, opt, epoch):
        out = super().step(model, x, y, store, opt, epoch)
        if epoch >= 1:
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
        return out


def _trained_model(tiny_data):
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    finetune(model, Method(LoopConfig(epochs=6, lr=0.05, batch_size=16, **SMALL)), _tiny(tiny_data), NORM)
    return model


def test_collapse_guard_stops_and_restores_the_best_epoch(tiny_data):
    model = _trained_model(tiny_data)
    train, val = split_validation(_tiny(tiny_data), 0.25, seed=0)
    seen = []
    result = finetune(model, _Scripted(LoopConfig(epochs=5, lr=1e-3, batch_size=16, **SMALL)), train, NORM, val=val,
                      selection=Selection(val_share=0.25, collapse_margin=0.2, collapse_patience=2),
                      on_epoch_end=lambda e, s: seen.append({k: v for k, v in s.items()}))
    assert result.collapsed and len(result.history) == 3  # two epochs below the guard, then stop
    assert seen[1]["val_acc"] < result.val_acc_before - 0.2
    assert result.selected_epoch == 0
    with torch.no_grad():
        from pgbd_defense.defenses.loop import clean_accuracy
        assert clean_accuracy(model, val, NORM) == pytest.approx(seen[0]["val_acc"])
    assert any(p.abs().sum() > 0 for p in model.parameters())


def test_collapse_in_the_first_epoch_returns_the_model_unchanged(tiny_data):
    model = _trained_model(tiny_data)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    class CollapseAtOnce(_Scripted):
        def step(self, model, x, y, store, opt, epoch):
            return super().step(model, x, y, store, opt, epoch + 1)

    train, val = split_validation(_tiny(tiny_data), 0.25, seed=0)
    method = CollapseAtOnce(LoopConfig(epochs=3, lr=1e-3, batch_size=16, **SMALL))
    result = finetune(model, method, train, NORM, val=val,
                      selection=Selection(val_share=0.25, collapse_patience=1))
    assert result.collapsed and result.selected_epoch == -1 and result.notes
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_one_bad_epoch_that_recovers_is_not_a_collapse(tiny_data):
    model = _trained_model(tiny_data)
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    class DipOnce(Method):
        name = "dip"

        def step(self, model, x, y, store, opt, epoch):
            out = super().step(model, x, y, store, opt, epoch)
            with torch.no_grad():  # epoch 0 ends broken, epoch 1 ends restored
                model.load_state_dict({k: (torch.zeros_like(v) if epoch == 0 and v.is_floating_point() else v)
                                       for k, v in saved.items()})
            return out

    train, val = split_validation(_tiny(tiny_data), 0.25, seed=0)
    result = finetune(model, DipOnce(LoopConfig(epochs=3, lr=1e-3, batch_size=16, **SMALL)), train, NORM, val=val,
                      selection=Selection(val_share=0.25, collapse_patience=2))
    accs = [row["val_acc"] for row in result.history]
    assert not result.collapsed and len(accs) == 3
    assert accs[0] < result.val_acc_before - 0.2 and result.selected_epoch in (1, 2)


def test_best_epoch_is_chosen_by_held_out_accuracy(tiny_data):
    torch.manual_seed(1)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    train, val = split_validation(_tiny(tiny_data), 0.25, seed=0)
    result = finetune(model, Method(LoopConfig(epochs=4, lr=0.05, batch_size=16, **SMALL)), train, NORM, val=val,
                      selection=Selection(val_share=0.25, collapse_margin=0.0))
    accs = [row["val_acc"] for row in result.history]
    assert result.selected_epoch == accs.index(max(accs))
    from pgbd_defense.defenses.loop import clean_accuracy
    assert clean_accuracy(model, val, NORM) == pytest.approx(max(accs))


def test_poisoned_test_data_cannot_change_what_is_selected(tmp_path, tiny_data, monkeypatch):
    """The per-epoch test evaluation is replaced by adversarial numbers (ASR lowest where
    held-out accuracy is worst): the returned model must not change at all."""
    folder, *_ = _write(tmp_path, tiny_data, save_png=False)
    cli = ["--record", str(folder), "--data-root", str(tiny_data), "--epochs", "4", "--batch-size", "8",
           "--ratio", "1.0", "--lr", "0.05", "--val-share", "0.25", "--no-progress"]
    assert run_module.main([*cli, "--defense-name", "honest"]) == 0
    real = pipeline_module.evaluate
    calls = {"n": 0}

    def lying_evaluate(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        out["test_asr"] = 1.0 / calls["n"]
        out["test_acc"] = 1.0 - 1.0 / calls["n"]
        return out

    monkeypatch.setattr(pipeline_module, "evaluate", lying_evaluate)
    assert run_module.main([*cli, "--defense-name", "lied-to", "--eval-every", "1"]) == 0
    assert calls["n"] == 4  # every epoch's diagnostic; the returned epoch's is reused, not repeated
    a = load_defense_result(folder / "defense" / "honest")["model"]
    b = load_defense_result(folder / "defense" / "lied-to")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = json.loads((folder / "defense" / "honest" / "summary.json").read_text())
    sb = json.loads((folder / "defense" / "lied-to" / "summary.json").read_text())
    assert sa["selected_epoch"] == sb["selected_epoch"] and sa["val_samples"] == 30


def test_nt_pgbd_visits_the_classes_in_order_every_cycle_epochs():
    assert [nt_target(e, 3, range(10)) for e in range(7)] == [0, 0, 0, 1, 1, 1, 2]
    assert [nt_target(e, 1, [4, 7]) for e in range(5)] == [4, 7, 4, 7, 4]


def test_nt_pgbd_recomputes_pavs_for_each_assumed_target(tiny_data):
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    cfg = PGBDConfig(epochs=4, lr=1e-3, variant="nt", cycle=2, lam=1.0)
    method = PGBDMethod(cfg, torch.zeros(10, dtype=torch.int64))
    clean = _tiny(tiny_data)
    actives = []

    class Spy(PGBDMethod):
        def begin_epoch(self, epoch, *a):
            super().begin_epoch(epoch, *a)
            actives.append(self.state.active.clone())
            means = self.state.means
            t = nt_target(epoch, 2, range(10))
            expected = means[t] - means
            expected[t] = 0
            assert torch.allclose(self.state.pavs, expected)

    method.__class__ = Spy
    finetune(model, method, clean, NORM)
    # class t has no term while t is the assumed target: 0, 0, 1, 1
    assert [int(torch.nonzero(~a).flatten()[0]) for a in actives] == [0, 0, 1, 1]


def test_seconds_are_charged_to_the_phase_that_spent_them(tiny_data):
    """A method whose preparation sleeps: the sleep lands in ``prepare``, not in ``training``."""
    import time as time_mod

    class SlowStart(Method):
        def start(self, model, train, normalize, hflip, device):
            time_mod.sleep(0.3)

    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    train, val = split_validation(_tiny(tiny_data), 0.25, seed=0)
    result = finetune(model, SlowStart(LoopConfig(epochs=2, lr=0.01, batch_size=16, **SMALL)), train, NORM, val=val,
                      selection=Selection(val_share=0.25))
    assert {"prepare", "epoch_updates", "training", "selection", "diagnostics"} <= set(result.seconds)
    assert result.seconds["prepare"] >= 0.3
    assert result.seconds["training"] < result.seconds["prepare"] + 5  # the sleep is not counted twice
    assert all(v >= 0 for v in result.seconds.values())
