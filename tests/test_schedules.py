"""The loop's learning-rate schedules against their closed forms, and the bench preset
against BackdoorBench's settings (config/defense/<name>/config.yaml at f02e3534 and what
its scripts do beyond it: docs/baselines.md)."""

import math

import pytest
import torch
import torch.nn as nn

from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.defenses import DEFENSES, build_method
from pgbd_defense.defenses.loop import LoopConfig, Method, finetune
from pgbd_defense.settings import PRESET_NAMES, resolve


class RecordingLR(Method):
    """Plain fine-tuning that records the learning rate each batch trains at."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lrs = []

    def step(self, model, x, y, store, opt, epoch):
        self.lrs.append((epoch, opt.param_groups[0]["lr"]))
        return super().step(model, x, y, store, opt, epoch)


# The loop's defaults are BackdoorBench's FT (per-epoch cosine of T_max 100); these tests start
# from a per-batch cosine over the whole run and change what they test.
PER_BATCH = {"scheduler_interval": "batch", "cos_t_max": 0, "augment": False}


def _rates(n_images=12, **settings):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    data = ImageSet(torch.randint(0, 256, (n_images, 1, 4, 4), dtype=torch.uint8), torch.arange(n_images) % 2)
    method = RecordingLR(LoopConfig(**{**PER_BATCH, **settings}))
    finetune(model, method, data, Normalizer([0.5], [0.5], 1))
    return method.lrs


def test_multistep_per_epoch_is_mcls_schedule():
    lrs = _rates(lr=0.1, epochs=20, batch_size=4, lr_scheduler="multistep", scheduler_interval="epoch",
                 steplr_milestones=(1, 10), steplr_gamma=0.1)
    expected = {e: 0.1 if e == 0 else 0.01 if e < 10 else 0.001 for e in range(20)}
    assert len(lrs) == 20 * 3
    for epoch, lr in lrs:
        assert lr == pytest.approx(expected[epoch], rel=1e-9), epoch


def test_cosine_per_epoch_with_t_max_100_is_the_benchmarks_ft_schedule():
    lrs = _rates(lr=0.01, epochs=10, batch_size=4, lr_scheduler="cosine", scheduler_interval="epoch", cos_t_max=100)
    for epoch, lr in lrs:  # constant within an epoch, 0.01 (1 + cos(pi e / 100)) / 2 across epochs
        assert lr == pytest.approx(0.005 * (1 + math.cos(math.pi * epoch / 100)), rel=1e-9)


def test_cosine_per_batch_with_t_max_100_is_periodic_as_in_ft_sam():
    lrs = _rates(n_images=40, lr=0.01, epochs=30, batch_size=4, lr_scheduler="cosine", scheduler_interval="batch",
                 cos_t_max=100)  # 300 steps: past T_max the rate rises again (period 200)
    for t, (_, lr) in enumerate(lrs):
        assert lr == pytest.approx(0.005 * (1 + math.cos(math.pi * t / 100)), abs=1e-9), t
    assert lrs[100][1] == pytest.approx(0.0, abs=1e-12) and lrs[200][1] == pytest.approx(0.01)


def test_default_cosine_anneals_to_zero_over_the_whole_run():
    lrs = _rates(lr=0.02, epochs=4, batch_size=4, lr_scheduler="cosine")  # 12 batches in all
    for t, (_, lr) in enumerate(lrs):
        assert lr == pytest.approx(0.01 * (1 + math.cos(math.pi * t / 12)), rel=1e-9)


def test_schedule_settings_are_checked():
    with pytest.raises(ValueError, match="needs steplr_milestones"):
        LoopConfig(lr_scheduler="multistep")
    with pytest.raises(ValueError, match="scheduler_interval"):
        LoopConfig(scheduler_interval="step")
    with pytest.raises(ValueError, match="steplr_milestones"):
        LoopConfig(lr_scheduler="multistep", steplr_milestones=(10, 1))


def _bench(defense):
    cfg = resolve("bench", defense, {})
    method = build_method(defense, cfg, torch.tensor([-1, 0]), "layer4.1.conv2")
    return cfg, method.cfg


def test_bench_preset_reports_the_last_epoch_of_the_whole_subset():
    for defense in ("ft", "nad", "ft-sam", "i-bau", "mcl", "pgbd"):
        cfg = resolve("bench", defense, {})
        assert cfg["val_share"] == 0.0 and cfg["select"] == "last" and cfg["ratio"] == 0.05, defense


def test_bench_ft_is_the_benchmarks_ft():
    _, m = _bench("ft")
    assert (m.optimizer, m.lr, m.momentum, m.weight_decay, m.epochs, m.batch_size) == ("sgd", 0.01, 0.9, 5e-4, 100, 256)
    assert (m.lr_scheduler, m.scheduler_interval, m.cos_t_max) == ("cosine", "epoch", 100)
    assert m.augment and not m.freeze_bn and m.grad_clip == 0


def test_bench_nad_trains_te_epochs_at_a_constant_rate_on_layer3_layer4_avgpool():
    _, m = _bench("nad")
    assert (m.epochs, m.te_epochs, m.lr, m.lr_scheduler) == (10, 10, 0.01, "constant")
    assert (m.te_lr_scheduler, m.scheduler_interval, m.cos_t_max) == ("cosine", "epoch", 100)
    assert tuple(m.layers) == ("layer3", "layer4", "avgpool") and tuple(m.betas) == (500.0, 1000.0, 1000.0)
    assert (m.momentum, m.weight_decay, m.p) == (0.9, 5e-4, 2.0)  # its yaml's momentum/weight_decay are never read


def test_bench_ft_sam_and_i_bau_and_mcl():
    _, m = _bench("ft-sam")
    assert (m.rho, m.adaptive, m.eta, m.label_smoothing) == (2.0, True, 0.0, 0.1)
    assert (m.lr_scheduler, m.scheduler_interval, m.cos_t_max, m.epochs, m.batch_size) == \
        ("cosine", "batch", 100, 100, 256)
    _, m = _bench("i-bau")
    assert (m.optimizer, m.amsgrad, m.lr, m.weight_decay, m.lr_scheduler) == ("adam", True, 1e-4, 0.0, "constant")
    assert (m.epochs, m.batch_size, m.fixed_point_iters, m.freeze_bn, m.augment) == (5, 256, 5, True, True)
    assert (m.pert_lr, m.pert_decay, m.fixed_point_lr, m.portion) == (10.0, 0.001, 0.1, 0.01)
    _, m = _bench("mcl")
    assert (m.lr, m.lr_scheduler, m.scheduler_interval, m.steplr_milestones, m.steplr_gamma) == \
        (0.1, "multistep", "epoch", (1, 10), 0.1)
    assert (m.epochs, m.batch_size, m.momentum, m.weight_decay, m.temperature, m.augment) == \
        (20, 64, 0.9, 1e-4, 0.5, False)


def test_benchmark_yaml_keys_reach_the_schedule():
    cfg = resolve("cpu", "ft", {"lr_scheduler": "MultiStepLR", "steplr_milestones": [2, 4], "steplr_gamma": 0.5,
                        "cos_t_max": 100})
    m = build_method("ft", cfg, torch.tensor([-1, 0]), "layer4.1.conv2").cfg
    assert (m.lr_scheduler, m.steplr_milestones, m.steplr_gamma, m.cos_t_max) == ("multistep", (2, 4), 0.5, 100)


def test_every_preset_builds_every_registered_defense():
    for preset in PRESET_NAMES:
        for defense in DEFENSES.names():
            cfg = resolve(preset, defense, {})
            method = build_method(defense, cfg, torch.tensor([-1, 0]), "layer4.1.conv2")
            assert method.name == defense and method.cfg.epochs >= 1, (preset, defense)
