#!/usr/bin/env bash
# Our FT, NAD, I-BAU and FT-SAM at --preset bench (BackdoorBench's own settings, last epoch,
# the whole clean subset) on the genuine BackdoorBench record in ../shared, with the clean
# subsets BackdoorBench's own runs used (their index.txt), at the budgets those runs had
# (FT 2 epochs, NAD a 1-epoch teacher + 1 epoch, I-BAU 1 round, FT-SAM 1 epoch).
# Results: results/bench_side_by_side.md. Usage: bash results/bench_side_by_side.sh [WORK_DIR]
set -euo pipefail
FIX=${FIX:-../shared/fixtures/backdoorbench/record/badnet_0_1_fmnist}
WORK=${1:-/tmp/bench_side_by_side}
DATA=${DATA:-/usr/share/datasets/fashion-mnist}
mkdir -p "$WORK"
[ -d "$WORK/badnet_0_1_fmnist" ] || cp -r "$FIX" "$WORK/"   # a copy: the defense folders go beside the record
REC="$WORK/badnet_0_1_fmnist"
run() { python -m pgbd_defense.run --record "$REC" --data-root "$DATA" --preset bench --no-progress "$@"; }
run --defense ft --defense-name ft_ours --epochs 2 --index "$FIX/defense/ft/index.txt"
run --defense nad --defense-name nad_ours --epochs 1 --te-epochs 1 --index "$FIX/defense/nad/index.txt"
run --defense ft-sam --defense-name ft-sam_ours --epochs 1 --index "$FIX/defense/ft-sam/index.txt"
run --defense i-bau --defense-name i-bau_ours --epochs 1 --index "$FIX/defense/i-bau/index.txt"
