import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PGBD_NO_PROGRESS", "1")
# Under pytest-xdist (the README's test command runs two workers) each worker is one process on
# one core: torch's default of one thread per core would put two threads on each core and slow
# both workers several-fold. One thread per worker, also for the processes tests start (they
# inherit the environment). Set before torch reads it, hence here and at import time.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURE_RECORD = SHARED / "fixtures" / "backdoorbench" / "record" / "badnet_0_1_fmnist"
FASHION_MNIST = Path(os.environ.get("PGBD_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dataset(root: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> Path:
    """A tiny MNIST-layout data set: class c is a bright band at row 2c (learnable, deterministic)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, size=(n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 2, :] = 200
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_idx_dataset(tmp_path / "data")


def needs_fashion_mnist():
    return pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                              reason=f"Fashion-MNIST not installed at {FASHION_MNIST} "
                                     "(apt-get install dataset-fashion-mnist)")


def needs_fixture():
    return pytest.mark.skipif(not (FIXTURE_RECORD / "attack_result.pt").is_file(),
                              reason="../shared/fixtures/backdoorbench is not present")


# One real BadNets record for every test that needs a trained backdoor on Fashion-MNIST (the
# attack's ASR test, the end-to-end CLI run, the trigger-inversion test): training it is the
# expensive part, so it is made once per session, as the CLI makes it (same settings, same
# folder name, PNG folders on disk), and tests only read it or add defense folders.
REAL_BADNET_ARGS = ["--attack", "badnet", "--dataset", "fashion-mnist", "--attack-train-subset", "15000",
                    "--attack-epochs", "2"]


@pytest.fixture(scope="session")
def real_badnet(tmp_path_factory):
    """(record root, record folder, the attack's test metrics) of the shared BadNets record."""
    from pgbd_defense.attacks.record import AttackSettings, build_attack_record, record_name

    if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_MNIST}")
    root = tmp_path_factory.mktemp("real_badnet")
    # the cpu preset's attack recipe (width 0.125, lr 0.02, no augmentation) on 15,000 images, 2 epochs
    settings = AttackSettings(attack="badnet", width=0.125, epochs=2, lr=0.02, augment=False, train_subset=15000)
    folder = root / record_name(settings)
    metrics = build_attack_record(folder, settings)
    return root, folder, metrics


@pytest.fixture
def tiny_record(tmp_path, tiny_data):
    """A BadNets record (2 attack epochs) on the tiny MNIST-layout data, with one PGBD run."""
    from pgbd_defense.run import main as run

    assert run(["--attack", "badnet", "--dataset", "mnist", "--data-root", str(tiny_data), "--record-root",
                str(tmp_path / "record"), "--attack-epochs", "2", "--epochs", "1", "--ratio", "0.5",
                "--no-progress"]) == 0
    (record,) = (tmp_path / "record").iterdir()
    return record
