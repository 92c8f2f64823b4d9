"""What a defense costs on this machine: the whole PGBD defense against plain
fine-tuning (FT), one epoch of each, and the CPU throughput of training and
evaluation as a share of what the machine can do.

    python benchmarks/cost.py            # the measurement (about 10 minutes on 2 cores)
    python benchmarks/cost.py --smoke    # seconds: checks that the script still runs (CI does)

Everything runs in this process, one measurement after another, so the ratios
compare within one run even on a noisy machine (run nothing else meanwhile).

1. Peak: the fastest float32 matrix product torch reaches here (a 2048 x 2048
   ``torch.mm`` on all threads, best of five). It is the practical ceiling for
   convolutions, which oneDNN lowers to the same kind of kernel.
2. Throughput: images/s of PreAct-ResNet18 (width 0.125 and full width, 28 x 28
   gray, as the Fashion-MNIST records) for evaluation and batch-16 training in the
   settings the package uses and the ones it could use; GFLOP/s counts the
   convolutions' and the linear layer's multiply-adds (x2), training as 3x a forward.
3. Whole defense: ``pipeline.defend`` -- the library path of ``python -m
   pgbd_defense.run`` -- for FT and PGBD on one record and one clean subset
   (prototypes, training, held-out selection, the final evaluation), interleaved,
   fastest of ``--repeats``; at width 0.125 (a 5% subset and the full test sets,
   as the ``cpu`` preset runs) and at full width (a smaller subset and test sets,
   so it fits a CPU). The records are made here and are weak at full width: this
   measures cost, not defense quality.
4. One epoch: PGBD's batched loss against FT on the same subset (prototypes are
   computed once per defense and left out), and the per-sample reference loss
   (one forward per sample, as the authors' release computes it), scaled from a
   few batches.

Targets: whole PGBD / whole FT <= 1.15; PGBD epoch / FT epoch <= 1.10;
per-sample reference / PGBD epoch >= 3.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from pgbd_defense import datasets as data_mod
from pgbd_defense.attacks.record import AttackSettings, build_attack_record, record_name
from pgbd_defense.datasets import ImageSet
from pgbd_defense.datasets.batches import EVAL_BATCH_SIZE, Normalizer, iterate
from pgbd_defense.defenses.pgbd import PGBDConfig, pgbd_finetune
from pgbd_defense.formats.models import build_model
from pgbd_defense.formats.records import BackdoorSet, load_attack_record
from pgbd_defense.method.loss import per_sample_reference_loss
from pgbd_defense.method.pav_sources import PAVSource, PrototypeConfig
from pgbd_defense.pipeline import defend, poisoned_evaluation
from pgbd_defense.settings import resolve
from pgbd_defense.util.progress import quiet
from pgbd_defense.util.threads import torch_threads


@dataclass
class WidthPlan:
    """One model width's part of the whole-defense measurement."""

    width: float
    attack: Dict  # AttackSettings overrides for the record made here
    samples: int  # clean-subset size
    test_samples: int  # test images kept of each test set (0: all)
    epochs: int


@dataclass
class Scale:
    """How big each part of the benchmark is (the full measurement or the smoke run)."""

    seconds: float  # per throughput measurement
    peak_size: int
    widths: List[WidthPlan]
    repeats: int
    epoch_samples: int
    epoch_repeats: int
    reference_batches: int


FULL = Scale(seconds=3.0, peak_size=2048, widths=[
    WidthPlan(0.125, {"epochs": 3, "lr": 0.02, "augment": False, "train_subset": 20000}, 3000, 0, 5),
    WidthPlan(1.0, {"epochs": 1, "train_subset": 2000}, 300, 1000, 5),
], repeats=3, epoch_samples=3000, epoch_repeats=3, reference_batches=10)
# The smoke run takes the same code paths on narrower models: a full-width record's own
# test evaluation (19,000 images) alone would take a minute here.
SMOKE = Scale(seconds=0.05, peak_size=256, widths=[
    WidthPlan(0.0625, {"epochs": 1, "augment": False, "train_subset": 300}, 60, 100, 1),
    WidthPlan(0.125, {"epochs": 1, "augment": False, "train_subset": 300}, 60, 100, 1),
], repeats=1, epoch_samples=64, epoch_repeats=1, reference_batches=1)


# --- 1. peak ---------------------------------------------------------------------------------

def matmul_peak_gflops(n: int, rounds: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


# --- 2. throughput ---------------------------------------------------------------------------

def forward_gflop(model: torch.nn.Module, shape) -> float:
    """Multiply-adds x2 of one image's forward pass through the convolutions and linear layers."""
    total = [0.0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            total[0] += 2 * output[0].numel() * per_output
        elif isinstance(module, torch.nn.Linear):
            total[0] += 2 * module.in_features * module.out_features

    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def images_per_second(work: Callable[[], None], batch: int, seconds: float) -> float:
    work()  # warm-up: oneDNN picks and caches its kernels on the first call of a shape
    done, start = 0, time.perf_counter()
    while True:
        work()
        done += batch
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def eval_rate(model, shape, batch: int, channels_last: bool, inference: bool, seconds: float) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(memory_format=fmt)
    x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
    mode = torch.inference_mode if inference else torch.no_grad
    try:
        with mode():
            return images_per_second(lambda: model(x), batch, seconds)
    finally:
        model.to(memory_format=torch.contiguous_format)


def train_rate(model, shape, batch: int, channels_last: bool, threads: int, seconds: float) -> float:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.train().to(memory_format=fmt)
    x = torch.randn(batch, *shape).contiguous(memory_format=fmt)
    y = torch.arange(batch) % 10
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    try:
        with torch_threads(threads):
            return images_per_second(step, batch, seconds)
    finally:
        model.eval().to(memory_format=torch.contiguous_format)


def throughput_table(scale: Scale, peak: float) -> List[str]:
    shape = (1, 28, 28)
    threads = torch.get_num_threads()
    lines = ["| width | pass | setting | images/s | GFLOP/s | share of peak |", "|---|---|---|---|---|---|"]
    for width in [plan.width for plan in scale.widths]:
        torch.manual_seed(0)
        model = build_model("preactresnet18", 10, in_channels=1, width=width)
        gflop = forward_gflop(model, shape)
        rows = [
            ("eval", "batch 512, no_grad (before)", 1,
             lambda: eval_rate(model, shape, 512, False, False, scale.seconds)),
            ("eval", "batch 256, inference_mode", 1, lambda: eval_rate(model, shape, 256, False, True, scale.seconds)),
            ("eval", f"batch {EVAL_BATCH_SIZE}, inference_mode (now)", 1,
             lambda: eval_rate(model, shape, EVAL_BATCH_SIZE, False, True, scale.seconds)),
            ("eval", "batch 64, inference_mode", 1, lambda: eval_rate(model, shape, 64, False, True, scale.seconds)),
            ("eval", f"batch {EVAL_BATCH_SIZE}, channels-last (not adopted: logits move in the 8th digit)", 1,
             lambda: eval_rate(model, shape, EVAL_BATCH_SIZE, True, True, scale.seconds)),
            ("train", f"batch 16, {threads} threads (as run)", 3,
             lambda: train_rate(model, shape, 16, False, threads, scale.seconds)),
            ("train", "batch 16, channels-last", 3, lambda: train_rate(model, shape, 16, True, threads, scale.seconds)),
            ("train", "batch 16, 1 thread", 3, lambda: train_rate(model, shape, 16, False, 1, scale.seconds)),
        ]
        for kind, setting, passes, measure in rows:
            rate = measure()
            flops = rate * gflop * passes
            lines.append(f"| {width:g} | {kind} | {setting} | {rate:,.0f} | {flops:.1f} | {100 * flops / peak:.1f}% |")
    return lines


# --- 3. whole defense ------------------------------------------------------------------------

def make_record(plan: WidthPlan, work: Path) -> Path:
    settings = AttackSettings(attack="badnet", dataset="fashion-mnist", width=plan.width, **plan.attack)
    folder = work / "record" / record_name(settings)
    if not (folder / "attack_result.pt").is_file():
        build_attack_record(folder, settings, save_png=False)
    return folder


def load_trimmed(folder: Path, test_samples: int):
    record = load_attack_record(folder)
    if test_samples:
        record.clean_test = ImageSet(record.clean_test.images[:test_samples], record.clean_test.labels[:test_samples])
        record.bd_test = BackdoorSet(*(getattr(record.bd_test, f.name)[:test_samples]
                                       for f in fields(BackdoorSet)))
    return record


def whole_defense(plan: WidthPlan, repeats: int, work: Path) -> Dict[str, dict]:
    """Fastest whole run per defense (FT and PGBD interleaved), with its phases."""
    folder = make_record(plan, work)
    record = load_trimmed(folder, plan.test_samples)
    ratio = plan.samples / len(record.clean_train)
    # The poisoned model's numbers are cached per record; the first defense would pay for them.
    poisoned_evaluation(record, folder, record.normalizer(), "cpu")
    best: Dict[str, dict] = {}
    for _ in range(repeats):
        for defense in ("ft", "pgbd"):
            record = load_trimmed(folder, plan.test_samples)
            settings = resolve("cpu", defense, overrides={"ratio": ratio, "epochs": plan.epochs})
            start = time.perf_counter()
            summary = defend(settings, record, folder, name=f"{defense}_cost", overwrite=True).summary
            wall = time.perf_counter() - start
            if defense not in best or wall < best[defense]["wall"]:
                best[defense] = {"wall": wall, "summary": summary}
    return best


def phase_line(summary: dict) -> str:
    phases = {k[len("seconds_"):]: v for k, v in summary.items() if k.startswith("seconds_") and v >= 0.005}
    return ", ".join(f"{k} {v:.2f}" for k, v in phases.items())


# --- 4. one epoch ----------------------------------------------------------------------------

def time_epochs(model, clean, targets, normalize, configs, repeats):
    """Fastest of ``repeats`` one-epoch runs per config, interleaved so that a slow spell of
    the machine hits every config alike."""
    state0 = {k: v.clone() for k, v in model.state_dict().items()}
    best = [float("inf")] * len(configs)
    for _ in range(repeats):
        for i, cfg in enumerate(configs):
            model.load_state_dict(state0)
            start = time.perf_counter()
            pgbd_finetune(model, clean, targets, normalize, cfg)
            best[i] = min(best[i], time.perf_counter() - start)
    model.load_state_dict(state0)
    return best


def epoch_costs(scale: Scale):
    torch.manual_seed(0)
    train = data_mod.load_split("fashion-mnist", None, train=True)
    clean = ImageSet(train.images[: scale.epoch_samples], train.labels[: scale.epoch_samples])
    normalize = Normalizer((0.5,), (0.5,), 1)
    model = build_model("preactresnet18", 10, in_channels=1, width=0.125).eval()
    targets = torch.zeros(10, dtype=torch.int64)
    common = dict(epochs=1, batch_size=16, lr=1e-4, augment=True, seed=0)
    ft_cfg, pgbd_cfg = PGBDConfig(lam=0.0, **common), PGBDConfig(lam=10.0, **common)
    state = PAVSource("layer4.1.conv2", PrototypeConfig(seed=0)).estimate(model, clean, targets, normalize, "cpu")
    real_estimate = PAVSource.estimate
    PAVSource.estimate = lambda *a, **k: state  # prototypes once per defense, not per epoch
    try:
        ft_s, pgbd_s = time_epochs(model, clean, targets, normalize, [ft_cfg, pgbd_cfg], scale.epoch_repeats)
    finally:
        PAVSource.estimate = real_estimate
    n_batches = -(-len(clean) // 16)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    start = time.perf_counter()
    for i, (x, y, _) in enumerate(iterate(clean.images, clean.labels, 16, normalize, shuffle=True, augment=True,
                                          generator=gen)):
        if i == scale.reference_batches:
            break
        loss = per_sample_reference_loss(model, "layer4.1.conv2", x, y, state.means, state.pavs, state.active, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ref_s = (time.perf_counter() - start) / min(scale.reference_batches, n_batches) * n_batches
    return ft_s, pgbd_s, ref_s


def verdict(value: float, target: float, at_most: bool = True) -> str:
    met = value <= target if at_most else value >= target
    return f"target {'<=' if at_most else '>='} {target:g}: {'met' if met else 'MISSED'}"


PARTS = ("throughput", "whole", "epoch")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the script runs, measures nothing")
    p.add_argument("--work", help="folder for the benchmark's records (default: a temporary folder)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    scale = SMOKE if args.smoke else FULL
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads"
              + (" -- SMOKE RUN: sizes too small for the numbers to mean anything" if args.smoke else ""))
        if "throughput" in parts:
            report_throughput(scale)
        if "whole" in parts:
            report_whole(scale, work, args.smoke)
        if "epoch" in parts:
            report_epoch(scale)


def report_throughput(scale: Scale) -> None:
    peak = matmul_peak_gflops(scale.peak_size)
    print(f"\n## Peak\n{peak:.0f} GFLOP/s: float32 {scale.peak_size}x{scale.peak_size} torch.mm on "
          f"{torch.get_num_threads()} threads, best of 5 (the practical ceiling; convolutions lower to "
          "the same kernels)\n")
    print("## Throughput (PreAct-ResNet18, 28x28 gray; training counted as 3 forward passes)")
    print("\n".join(throughput_table(scale, peak)))


def report_whole(scale: Scale, work: Path, smoke: bool) -> None:
    print(f"\n## Whole defense (pipeline.defend, cpu preset; fastest of {scale.repeats}, FT and PGBD interleaved)")
    print("| width | clean subset | test images | epochs | FT s | PGBD s | PGBD / FT | phases (PGBD) |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = {}
    with warnings.catch_warnings():
        if smoke:  # classes without enough clean samples in a 60-image subset: expected here
            warnings.simplefilter("ignore", UserWarning)
        for plan in scale.widths:
            best = whole_defense(plan, scale.repeats, work)
            ft, pg = best["ft"], best["pgbd"]
            ratios[plan.width] = pg["wall"] / ft["wall"]
            print(f"| {plan.width:g} | {pg['summary']['clean_samples']} | {plan.test_samples or 'all'} | "
                  f"{plan.epochs} | {ft['wall']:.1f} | {pg['wall']:.1f} | {ratios[plan.width]:.3f} | "
                  f"{phase_line(pg['summary'])} |")
            print(f"|   |   |   |   | FT phases: {phase_line(ft['summary'])} | | | |")
    for width, ratio in ratios.items():
        print(f"whole PGBD / whole FT at width {width:g} = {ratio:.3f} ({verdict(ratio, 1.15)})")


def report_epoch(scale: Scale) -> None:
    ft_s, pgbd_s, ref_s = epoch_costs(scale)
    print(f"\n## One epoch (width 0.125, {scale.epoch_samples} samples, batch 16; fastest of {scale.epoch_repeats})")
    print(f"FT epoch {ft_s:.2f} s, PGBD epoch {pgbd_s:.2f} s, per-sample reference epoch {ref_s:.2f} s "
          f"(scaled from {scale.reference_batches} batches)")
    print(f"PGBD epoch / FT epoch = {pgbd_s / ft_s:.3f} ({verdict(pgbd_s / ft_s, 1.10)})")
    print(f"reference / PGBD epoch = {ref_s / pgbd_s:.2f} ({verdict(ref_s / pgbd_s, 3, at_most=False)})")


if __name__ == "__main__":
    main()
