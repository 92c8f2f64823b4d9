"""End to end on real data: a BadNets record on a Fashion-MNIST subset, written to
disk by our attack and read back through the record loader, then defended."""

import json

import pytest

from pgbd_defense.run import main

from .conftest import needs_fashion_mnist


@needs_fashion_mnist()
@pytest.mark.slow
def test_badnets_on_fashion_mnist_is_removed_and_ca_kept(tmp_path, capsys):
    args = ["--attack", "badnet", "--dataset", "fashion-mnist", "--record-root", str(tmp_path / "record"),
            "--attack-train-subset", "15000", "--attack-epochs", "2", "--epochs", "6", "--eval-every", "3",
            "--no-progress"]
    assert main(args) == 0
    records = list((tmp_path / "record").iterdir())
    assert len(records) == 1 and (records[0] / "bd_test_dataset").is_dir()
    summary = json.loads((records[0] / "defense" / "pgbd" / "summary.json").read_text())
    assert summary["asr_poisoned"] >= 0.9, summary
    assert summary["ca_poisoned"] >= 0.75, summary
    assert summary["asr"] <= 0.10, summary
    assert summary["ca"] >= summary["ca_poisoned"] - 0.05, summary
    assert summary["dem"] >= 0.9
    # A second run reuses the record instead of retraining, and refuses to overwrite.
    assert main(args) == 2
    assert len(list((tmp_path / "record").iterdir())) == 1
