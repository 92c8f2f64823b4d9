"""The fine-tuning loop: prototype re-estimation schedule, settings validation, index files."""

import pytest
import torch

from pgbd_defense import datasets as data_mod
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses.pgbd import PGBDConfig, pgbd_finetune
from pgbd_defense.formats.defense_folder import read_index
from pgbd_defense.formats.models import build_model
from pgbd_defense.method.pav_sources import PAVSource

from .conftest import FIXTURE_RECORD, needs_fixture


def _tiny(tiny_data):
    return data_mod.load_split("mnist", str(tiny_data), train=True)


def test_prototypes_are_reestimated_every_update_gap_epochs(tiny_data, monkeypatch):
    calls = []
    real = PAVSource.estimate

    def spy(self, *args, previous=None, **kwargs):
        calls.append(previous is not None)
        return real(self, *args, previous=previous, **kwargs)

    monkeypatch.setattr(PAVSource, "estimate", spy)
    torch.manual_seed(0)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    history = pgbd_finetune(model, _tiny(tiny_data), torch.zeros(10, dtype=torch.int64),
                            Normalizer((0.5,), (0.5,), 1), PGBDConfig(epochs=5, update_gap=2, lr=1e-3))
    assert calls == [False, True, True]  # start, then epochs 3 and 5 (0-based 2 and 4), blended
    assert len(history) == 5 and all(h["train_sanitization_avg_over_batch"] != 0 for h in history)


def test_plain_finetuning_computes_no_prototypes(tiny_data, monkeypatch):
    monkeypatch.setattr(PAVSource, "estimate", lambda *a, **k: pytest.fail("prototypes computed"))
    model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
    history = pgbd_finetune(model, _tiny(tiny_data), torch.zeros(10, dtype=torch.int64),
                            Normalizer((0.5,), (0.5,), 1), PGBDConfig(epochs=1, lam=0.0))
    assert history[0]["train_sanitization_avg_over_batch"] == 0


def test_finetuning_changes_the_model_and_is_deterministic(tiny_data):
    def run():
        torch.manual_seed(0)
        model = build_model("preactresnet18", 10, in_channels=1, width=0.0625)
        start = model.linear.weight.clone()
        pgbd_finetune(model, _tiny(tiny_data), torch.zeros(10, dtype=torch.int64), Normalizer((0.5,), (0.5,), 1),
                      PGBDConfig(epochs=2, lr=1e-2, lam=1.0, reduction="mean", augment=True, freeze_bn=False,
                                 grad_clip=5.0, lr_scheduler="cosine"))
        return start, model.linear.weight.detach().clone()

    (s1, w1), (_, w2) = run(), run()
    assert not torch.equal(s1, w1)
    assert torch.equal(w1, w2)


def test_invalid_settings_name_every_problem():
    with pytest.raises(ValueError) as e:
        PGBDConfig(form="sine", lr=-1, alpha=2, lr_scheduler="step")
    msg = str(e.value)
    for part in ("form='sine'", "lr=-1", "alpha=2", "lr_scheduler='step'"):
        assert part in msg


@needs_fixture()
def test_backdoorbench_index_file_is_read():
    idx = read_index(FIXTURE_RECORD / "defense" / "ft" / "index.txt", 60000)
    assert len(idx) == 3000 and idx[:3] == [55340, 25247, 49673]


def test_index_out_of_range_is_refused(tmp_path):
    (tmp_path / "i.txt").write_text("1\n2\n99\n")
    with pytest.raises(ValueError, match=r"\[99\]"):
        read_index(tmp_path / "i.txt", 50)
