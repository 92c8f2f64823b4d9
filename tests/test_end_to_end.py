"""End to end on real data: a BadNets record on a Fashion-MNIST subset, written to
disk by our attack (PNG folders) and read back through the record loader, then defended."""

import json

import pytest

from pgbd_defense.run import main

from .conftest import REAL_BADNET_ARGS, needs_fashion_mnist


@needs_fashion_mnist()
@pytest.mark.slow
def test_badnets_on_fashion_mnist_is_removed_and_ca_kept(real_badnet):
    root, folder, _ = real_badnet
    args = [*REAL_BADNET_ARGS, "--record-root", str(root), "--eval-every", "5",
            "--defense-name", "e2e", "--no-progress"]
    # the CLI finds the session's record by the name its settings give (made as the CLI makes it)
    assert main(args) == 0
    assert [p for p in root.iterdir()] == [folder] and (folder / "bd_test_dataset").is_dir()
    summary = json.loads((folder / "defense" / "e2e" / "summary.json").read_text())
    assert summary["asr_poisoned"] >= 0.9, summary
    assert summary["ca_poisoned"] >= 0.75, summary
    assert summary["asr"] <= 0.10, summary
    assert summary["ca"] >= summary["ca_poisoned"] - 0.05, summary
    assert summary["dem"] >= 0.9
    # A second run reuses the record instead of retraining, and refuses to overwrite.
    assert main(args) == 2
    assert [p for p in root.iterdir()] == [folder]
