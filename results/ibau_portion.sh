#!/usr/bin/env bash
# I-BAU's perturbed share of each batch in the outer loss, measured on the ci Table 2 records
# (made by `python -m pgbd_defense.table2 --preset ci`, in ./record), cpu preset (5 rounds, Adam
# 1e-3, batch 64), the clean subsets of $SEEDS (default: seed 0). portion 0.01 -> 1 sample of 64 (our rule; the
# sources' int(64 * 0.01) would be 0), 0.25 -> 16, 1.0 -> every sample.
# Prints one CSV line per run: attack,portion,seed,ca,asr,dem,pert_norm,flip_rate_heldout
set -euo pipefail
ROOT=${1:-record}
for rec in "$ROOT"/*; do
  [ -f "$rec/attack_result.pt" ] || continue
  for portion in ${PORTIONS:-0.01 0.25 1.0}; do
    printf 'portion: %s\n' "$portion" > /tmp/ibau_portion.yaml
    for seed in ${SEEDS:-0}; do
      name="ibau_portion_${portion}_s${seed}"
      [ -f "$rec/defense/$name/summary.json" ] || \
      python -m pgbd_defense.run --record "$rec" --defense i-bau --defense-name "$name" --overwrite --no-progress \
        --config /tmp/ibau_portion.yaml --index "$rec/clean_subset_0.05_${seed}.txt" --seed "$seed" > /dev/null 2>&1
      python - "$rec" "$name" "$portion" "$seed" <<'PY'
import json, sys
import pandas as pd
rec, name, portion, seed = sys.argv[1:]
s = json.load(open(f"{rec}/defense/{name}/summary.json"))
rounds = pd.read_csv(f"{rec}/defense/{name}/{name}_df.csv")
print(f"{rec.split('/')[-1]},{portion},{seed},{100*s['ca']:.2f},{100*s['asr']:.2f},{s['dem']:.3f},"
      f"{rounds['pert_norm'].iloc[0]:.1f},{rounds['pert_flip_rate_heldout'].iloc[0]:.3f}")
PY
    done
  done
done
