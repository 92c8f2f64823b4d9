"""One command: make (or reuse) a backdoored model's record, defend it with PGBD (or a
baseline: ``--defense ft|nad|i-bau|ft-sam|mcl|nt-pgbd``), and write the defense folder
BackdoorBench-style.

    python -m pgbd_defense.run --attack badnet --dataset fashion-mnist
    python -m pgbd_defense.run --attack badnet --dataset fashion-mnist --defense nad
    python -m pgbd_defense.run --record record/badnet_0_1 --data-root data/mnist
    python -m pgbd_defense.run --preset paper --dataset cifar10 --data-root ~/data --device cuda
    python -m pgbd_defense.run --record R --config my.yaml --lambda 2 --dry-run   # the settings a run would use

Every setting is a flag (generated from ``pgbd_defense/settings/fields.py``), a YAML key
(``--config``, our names or BackdoorBench's), or the preset's value, in that order of
precedence; the final settings are saved as ``config.yaml`` beside the results.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional

import yaml

from .bench.checkout import find_checkout, require_checkout
from .bench.driver import run_in_checkout
from .errors import ConfigError, UserError
from .experiments.cells import Cell, run_cell
from .experiments.table2 import PROTOCOLS
from .experiments.tables import comparison_frame, comparison_markdown, write_comparison
from .pipeline import DefenseResult, check, defend, load_record, make_or_reuse_record
from .settings import PRESET_NAMES, VARIANT_NAMES, Settings, read_yaml, resolve
from .settings.cli import add_setting_arguments, explicit_values
from .util.logs import setup_logging
from .util.progress import quiet

log = logging.getLogger("pgbd_defense")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--record", help="an existing record folder to defend (skips the attack)")
    g.add_argument("--record-root", default="record", help="where new records go (default: ./record)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root")
    g.add_argument("--trust-record", action="store_true",
                   help="load the record with full unpickling (it can run code: only for files you made)")
    g.add_argument("--preset", choices=PRESET_NAMES,
                   help="defaults to start from (default: the config's preset key, else cpu; 'paper' = the "
                        "paper's settings, 'bench' = each baseline as BackdoorBench runs it)")
    g.add_argument("--protocol", choices=sorted(PROTOCOLS),
                   help="Table 2's protocols by name: paper (= --preset bench: each defense at its published "
                        "settings, last epoch) or equal-budget (= --preset cpu); with --compare, every defense")
    g.add_argument("--config", help="YAML file of settings (our key names or BackdoorBench's); flags override it")
    g.add_argument("--defense", help="which defense (pgbd, nt-pgbd, st-pgbd, ft, nad, i-bau, ft-sam, mcl; "
                                     "default pgbd)")
    g.add_argument("--variant", choices=sorted(VARIANT_NAMES),
                   help="pgbd (target known), nt (NT-PGBD: no target) or st (ST-PGBD: synthesized trigger); "
                        "same as --defense pgbd|nt-pgbd|st-pgbd")
    g.add_argument("--dry-run", action="store_true",
                   help="check every setting, print the settings the run would use (as config.yaml) and stop "
                        "before any record or file is touched")
    add_setting_arguments(p, "ours")
    g = p.add_argument_group("side by side")
    g.add_argument("--compare", type=lambda v: [d for d in v.split(",") if d],
                   help="after the defense, run these on the same record and clean subset and write one table "
                        "(ft,nad,i-bau,ft-sam,mcl,nt-pgbd); inside a checkout, the benchmark's own scripts")
    g.add_argument("--bench-root", help="a BackdoorBench checkout to run in (default: the working directory if it "
                   "is one)")
    g.add_argument("--attack-args", default="", help="extra flags for the benchmark's attack script (one string)")
    g.add_argument("--bench-args", default="",
                   help="extra flags for each of the benchmark's defense scripts run by --compare (one string, e.g. "
                        "\"--te_epochs 1 --n_rounds 1\"); --epochs and --batch-size are passed to them already")
    g = p.add_argument_group("output")
    g.add_argument("--defense-name", help="folder name under <record>/defense/ (default: the defense's name)")
    g.add_argument("--overwrite", action="store_true", help="replace results already in the defense folder")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished epoch (same settings)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    # quiet() restores the bars afterwards: a later call in the same process keeps its own choice.
    with quiet() if args.no_progress else contextlib.nullcontext():
        try:
            return _run(args)
        except UserError as e:
            log.error("%s", e)
            return 2
        except KeyboardInterrupt:
            return 130


def chosen_defense(args) -> Optional[str]:
    """--defense or --variant (they must agree); None: the config's, else pgbd."""
    if args.variant and args.defense and VARIANT_NAMES[args.variant] != args.defense:
        raise ConfigError(f"--variant {args.variant} and --defense {args.defense} disagree: give one of them")
    return args.defense or (VARIANT_NAMES[args.variant] if args.variant else None)


def chosen_preset(args) -> Optional[str]:
    """--preset, or the preset of --protocol (they must agree)."""
    by_protocol = PROTOCOLS[args.protocol].preset if getattr(args, "protocol", None) else None
    if by_protocol and args.preset and args.preset != by_protocol:
        raise ConfigError(f"--protocol {args.protocol} is --preset {by_protocol}, not {args.preset}: give one of them")
    return args.preset or by_protocol


def settings_of(args) -> Settings:
    """The run's settings: the preset, then --config, then every flag given."""
    return resolve(chosen_preset(args), chosen_defense(args), read_yaml(args.config), explicit_values(args),
                   source=args.config or "config")


def _run(args) -> int:
    settings = settings_of(args)
    bench_root = require_checkout(Path(args.bench_root)) if args.bench_root else \
        (find_checkout() if not args.record else None)
    if bench_root is not None:
        return run_in_checkout(args, settings, bench_root)
    # Every setting is checked before the first record or file is touched.
    check(settings, args.compare or [], make_record=not args.record)
    if args.dry_run:
        print(yaml.safe_dump(settings.saved(), sort_keys=True), end="")
        return 0
    record_dir = Path(args.record) if args.record else make_or_reuse_record(settings, Path(args.record_root),
                                                                            args.download)
    record = load_record(record_dir, settings, trust=args.trust_record)
    result = defend(settings, record, record_dir, name=args.defense_name, overwrite=args.overwrite,
                    resume=args.resume)
    print(result_table(result, args.defense_name or settings.defense))
    print(f"results: {result.folder}")
    if args.compare:
        compare_standalone(args, settings, record_dir, result)
    return 0


def result_table(result: DefenseResult, name: str) -> str:
    def row(label: str, m: Dict[str, float], last: str) -> str:
        return f"{label:<10}{100 * m['test_acc']:7.2f} {100 * m['test_asr']:7.2f} {100 * m['test_ra']:7.2f}  {last}"

    return "\n".join([f"{'':<10}{'CA':>7} {'ASR':>7} {'RA':>7}  DEM", row("poisoned", result.before, "-"),
                      row(name, result.after, f"{result.summary['dem']:.3f}")])


def compare_standalone(args, settings: Settings, record_dir: Path, result: DefenseResult) -> Path:
    """Our own implementations of the compared defenses on the same record and clean subset
    as the defense just run, each at its own settings in the same preset and config, with the
    budget flags given (--epochs, --batch-size); one table in ``<record>/defense/comparison.*``."""
    name = args.defense_name or settings.defense
    ours = result.summary
    rows = [{**ours, "defense": name, "status": "ok", "log": ""}]
    overrides = {"index": str(result.folder / "index.txt"), "random_seed": ours["seed"]}
    overrides.update({k: settings[k] for k in ("epochs", "batch_size") if k in settings.explicit})
    for other in args.compare:
        if other == name:
            continue
        log.info("comparing: %s on %s", other, record_dir)
        cell = Cell(Path(record_dir), other, overrides, preset=settings.preset, config=args.config)
        row = run_cell(cell, settings["data_root"], device=settings["device"])
        rows.append({**row, "defense": other})
    paths = write_comparison(rows, Path(record_dir) / "defense")
    print(comparison_markdown(comparison_frame(rows)))
    print(f"comparison: {paths['md']} (also .csv, .tex)")
    return paths["md"]


if __name__ == "__main__":
    sys.exit(main())
