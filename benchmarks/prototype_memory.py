"""Peak memory of prototype estimation against the number of samples and the
activation size: all activations of D_S at once (the release's way) versus our
per-class exact k-means and streaming MiniBatchKMeans (the path taken past the
memory budget). Each measurement runs in a fresh process and reports the rise of
its peak resident memory over the same process after setup, so the numbers
compare within this run.

    python benchmarks/prototype_memory.py [--samples 1000 4000] [--channels 2 8]
    python benchmarks/prototype_memory.py --smoke    # seconds: checks that it still runs (CI does)

The "model" is one 3x3 convolution on 64x64 images (the activation is channels x
64 x 64 values), so that large activations cost little compute on a CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time, torch
from pgbd_defense.datasets.batches import Normalizer
from pgbd_defense.method.prototypes import collect_activations, estimate_prototypes, stream_prototypes
n, channels, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, channels, 3, padding=1)).eval()
images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
labels = torch.arange(n) % 10
norm = Normalizer((0.5,), (0.5,), 3)
collect_activations(model, "0", images[:2], norm)  # warm up allocators before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "all-at-once":
    protos = estimate_prototypes(collect_activations(model, "0", images, norm), labels, 10, 3, seed=0)
elif mode == "per-class":
    protos = stream_prototypes(model, "0", images, labels, norm, 10, 3, seed=0, memory_budget_mb=1e9)
else:
    protos = stream_prototypes(model, "0", images, labels, norm, 10, 3, seed=0, memory_budget_mb=1e-3)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rise_mb": (peak - base) / 1024, "seconds": seconds, "means": protos.means().sum().item()}))
"""

MODES = ("all-at-once", "per-class", "streaming")


def measure(n: int, channels: int, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(channels), mode], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, nargs="+", default=[1000, 4000])
    p.add_argument("--channels", type=int, nargs="+", default=[2, 8])
    p.add_argument("--smoke", action="store_true", help="one tiny row: checks that the script runs, measures nothing")
    args = p.parse_args()
    if args.smoke:
        args.samples, args.channels = [60], [1]
    print(f"{'samples':>8} {'dims':>7} {'activations MB':>15} | " + " | ".join(f"{m:>24}" for m in MODES))
    for channels in args.channels:
        for n in args.samples:
            dims = channels * 64 * 64
            cells = []
            results = {m: measure(n, channels, m) for m in MODES}
            base = results["all-at-once"]["rise_mb"]
            for m in MODES:
                r = results[m]
                ratio = f"{r['rise_mb'] / base:5.2f}x" if base > 0 else "    -"  # a tiny run may not rise at all
                cells.append(f"{r['rise_mb']:7.0f} MB {ratio} {r['seconds']:5.1f}s")
            print(f"{n:>8} {dims:>7} {n * dims * 4 / 2**20:>15.0f} | " + " | ".join(f"{c:>24}" for c in cells))
    print("ratios are peak-memory rise relative to all-at-once in the same row")


if __name__ == "__main__":
    start = time.time()
    main()
    print(f"total {time.time() - start:.0f}s")
