"""One command: make (or reuse) a backdoored model's record, defend it with PGBD (or a
baseline: ``--defense ft|nad|i-bau|ft-sam|mcl|nt-pgbd``), and write the defense folder
BackdoorBench-style.

    python -m pgbd_defense.run --attack badnet --dataset fashion-mnist
    python -m pgbd_defense.run --attack badnet --dataset fashion-mnist --defense nad
    python -m pgbd_defense.run --record record/badnet_0_1 --data-root data/mnist
    python -m pgbd_defense.run --preset paper --dataset cifar10 --data-root ~/data --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import __version__
from . import data as data_mod
from .attacks import ATTACKS
from .atomic import atomic_write_text
from .batches import Normalizer
from .config import DEFAULT_PRESET, PRESETS, ConfigError, merge, read_yaml
from .data import DataNotFoundError
from .digest import raw_bytes, update_with_weights
from .make_record import AttackSettings, build_attack_record, record_name
from .metrics import DEM, dem, evaluate
from .models import MODELS, ModelMismatchError
from .bench.checkout import find_checkout, require_checkout
from .bench.compare import BenchRunError
from .defenses import DEFENSES, VARIANT_DEFENSES, build_method
from .mapping import MappingError, cached_backbone_features, features_from_file, parse_source
from .finetune import NonFiniteLossError, PhaseClock, ResumeMismatchError, Selection, finetune, split_positions
from .prototypes import LayerNotFoundError, last_conv_name, find_layer
from .records import AttackRecord, RecordError, load_attack_record, write_defense_result
from .registry import UnknownNameError
from .results import (ExistingResultError, log_file_path, prepare_defense_dir, read_index, write_epoch_tables,
                      write_index, write_summary)
from .safe_pickle import UnreadableFileError, UnsafeRecordError
from .targets import defended_targets

log = logging.getLogger("pgbd_defense")

USER_ERRORS = (ConfigError, DataNotFoundError, RecordError, UnsafeRecordError, UnreadableFileError,
               ModelMismatchError, LayerNotFoundError, UnknownNameError, ExistingResultError, NonFiniteLossError,
               ResumeMismatchError, BenchRunError, MappingError, ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to defend")
    g.add_argument("--attack", help=f"attack that makes the record if absent ({', '.join(ATTACKS.names())})")
    g.add_argument("--dataset", help=f"clean data set ({', '.join(data_mod.DATASETS.names())})")
    g.add_argument("--model", help="zoo model name (preactresnet18, vgg19_bn, resnet50)")
    g.add_argument("--width", type=float, help="channel multiplier of the model (cpu preset: 0.125)")
    g.add_argument("--record", help="an existing record folder to defend (skips the attack)")
    g.add_argument("--record-root", default="record", help="where new records go (default: ./record)")
    g.add_argument("--data-root", help="folder holding the clean data set")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR into --data-root")
    g.add_argument("--trust-record", action="store_true",
                   help="load the record with full unpickling (it can run code: only for files you made)")
    g = p.add_argument_group("attack (standalone path)")
    g.add_argument("--pratio", type=float, help="poisoning ratio (default 0.1)")
    g.add_argument("--attack-target", type=int, help="attack target label (default 0)")
    g.add_argument("--attack-label-trans", choices=["all2one", "all2all"])
    g.add_argument("--attack-epochs", type=int)
    g.add_argument("--attack-train-subset", type=int, help="train the backdoored model on this many samples (0: all)")
    g.add_argument("--trigger-image", help="blended: blend this image instead of our generated pattern")
    g.add_argument("--overlays", help="rof-tattoo / rof-mask: comma-separated RGBA PNG overlays (default: ours)")
    g.add_argument("--trojan-optimize", dest="trojan_optimize", action=argparse.BooleanOptionalAction,
                   help="trojan: optimize the patch to excite a neuron (TrojanNN, default) or stamp a fixed one")
    g = p.add_argument_group("defense")
    g.add_argument("--defense", help=f"which defense ({', '.join(DEFENSES.names())}; default pgbd)")
    g.add_argument("--val-share", dest="val_share", type=float,
                   help="share of the clean subset held out to select the epoch (default 0.1; 0: keep the last)")
    g.add_argument("--select", choices=["best", "last"], help="epoch returned: best held-out clean accuracy, or last")
    g.add_argument("--collapse-margin", dest="collapse_margin", type=float,
                   help="stop when held-out clean accuracy falls this far below its start (0-1; 0: off)")
    g.add_argument("--collapse-patience", dest="collapse_patience", type=int,
                   help="... for this many consecutive epochs (default 2)")
    g.add_argument("--optimizer", choices=["sgd", "adam"])
    g.add_argument("--te-epochs", dest="te_epochs", type=int, help="NAD: epochs that make the teacher")
    g.add_argument("--rho", type=float, help="FT-SAM: neighbourhood radius")
    g = p.add_argument_group("PGBD")
    g.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                   help=f"defaults to start from (default {DEFAULT_PRESET}; 'paper' = the paper's settings)")
    g.add_argument("--config", help="YAML file of settings (BackdoorBench key names); flags override it")
    g.add_argument("--target", help="attack label(s) to defend against: 'record' (read from the record's "
                   "poisoned test set), a class index, 'all2all', or 'auto' (Neural Cleanse-style inference)")
    g.add_argument("--variant", choices=sorted(VARIANT_DEFENSES),
                   help="pgbd (target known), nt (NT-PGBD: no target) or st (ST-PGBD: synthesized trigger); "
                        "same as --defense pgbd|nt-pgbd|st-pgbd")
    g.add_argument("--mapping", help="large-model mapping: off (default), a teacher features file (.pt), or "
                   "torchvision:NAME:WEIGHTS_FILE (local weights; nothing is downloaded)")
    g.add_argument("--teacher-input-size", dest="teacher_input_size", type=int,
                   help="side in pixels the teacher backbone sees (224 for ImageNet weights)")
    g.add_argument("--mapping-components", dest="mapping_components", type=int, help="teacher PCA channels (64)")
    g.add_argument("--mapping-steps", dest="mapping_steps", type=int, help="mapping optimizer steps at most")
    g.add_argument("--inversion-steps", dest="inversion_steps", type=int,
                   help="--target auto: trigger-search steps per class")
    g.add_argument("--inversion-batch-size", dest="inversion_batch_size", type=int)
    g.add_argument("--inversion-classes", dest="inversion_classes",
                   type=lambda v: [int(c) for c in v.split(",") if c], help="--target auto: only these classes")
    g.add_argument("--inversion-scale", dest="inversion_scale", choices=["log", "linear"],
                   help="--target auto: anomaly index on log norms (default) or on norms (Neural Cleanse)")
    g.add_argument("--nt-topk", dest="nt_topk", type=int,
                   help="NT-PGBD with --target auto: cycle through the top k inferred classes (0: all)")
    g.add_argument("--st-steps", dest="st_steps", type=int, help="ST-PGBD: trigger-search steps")
    g.add_argument("--layer", help="named module whose activations PGBD manipulates (default: last conv)")
    g.add_argument("--lambda", dest="lambda", type=float, help="weight of the sanitization loss")
    g.add_argument("--loss-form", dest="loss_form", choices=["cos", "abs_cos", "relu_cos"])
    g.add_argument("--warmup-epochs", dest="warmup_epochs", type=int, help="ramp lambda up over N epochs (0: off)")
    g.add_argument("--cycle", type=int, help="NT-PGBD: epochs per assumed target")
    g.add_argument("--nt-classes", dest="nt_classes", type=lambda v: [int(c) for c in v.split(",") if c],
                   help="NT-PGBD: comma-separated classes to cycle through, in order (default: all)")
    g.add_argument("--reduction", choices=["sum", "mean"])
    g.add_argument("--clusters", type=int)
    g.add_argument("--update-gap", dest="update_gap", type=int, help="re-estimate prototypes every N epochs (0: never)")
    g.add_argument("--alpha", type=float, help="blend rate of re-estimated prototypes")
    g.add_argument("--grad-clip", dest="grad_clip", type=float, help="clip the gradient norm (0: off)")
    g.add_argument("--freeze-bn", dest="freeze_bn", action=argparse.BooleanOptionalAction,
                   help="keep BatchNorm statistics frozen while fine-tuning")
    g.add_argument("--augment", dest="augment", action=argparse.BooleanOptionalAction,
                   help="random-crop augmentation of the clean subset")
    g.add_argument("--proto-memory-mb", dest="proto_memory_mb", type=float,
                   help="memory budget per class for prototype k-means; above it, streaming MiniBatchKMeans")
    g.add_argument("--lr", type=float)
    g.add_argument("--lr-scheduler", dest="lr_scheduler", choices=["constant", "cosine"])
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", dest="batch_size", type=int)
    g.add_argument("--ratio", type=float, help="share of the clean training split the defender holds (0.05)")
    g.add_argument("--index", help="file of clean-subset indices (BackdoorBench's index.txt) instead of a draw")
    g.add_argument("--seed", dest="random_seed", type=int)
    g.add_argument("--eval-every", dest="eval_every", type=int,
                   help="diagnostic: also evaluate on the test sets after every N epochs (default 0: off; the "
                        "returned model is always evaluated once, and selection never uses these numbers)")
    g = p.add_argument_group("side by side")
    g.add_argument("--compare", type=lambda v: [d for d in v.split(",") if d],
                   help="after PGBD, run these defenses on the same record and clean subset and write one table "
                        "(ft,nad,i-bau,ft-sam,mcl,nt-pgbd); inside a checkout, the benchmark's own scripts")
    g.add_argument("--bench-root", help="a BackdoorBench checkout to run in (default: the working directory if it "
                   "is one)")
    g.add_argument("--attack-args", default="", help="extra flags for the benchmark's attack script (one string)")
    g.add_argument("--bench-args", default="",
                   help="extra flags for each of the benchmark's defense scripts run by --compare (one string, e.g. "
                        "\"--te_epochs 1 --n_rounds 1\"); --epochs and --batch-size are passed to them already")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu")
    g.add_argument("--defense-name", help="folder name under <record>/defense/ (default: the defense's name)")
    g.add_argument("--overwrite", action="store_true", help="replace results already in the defense folder")
    g.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished epoch (same settings)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("-v", "--verbose", action="store_true")
    return p


CLI_KEYS = ["attack", "dataset", "model", "width", "pratio", "attack_target", "attack_label_trans", "attack_epochs",
            "attack_train_subset", "trigger_image", "trojan_optimize", "overlays",
            "target", "layer", "lambda", "loss_form", "reduction", "clusters", "update_gap", "alpha", "lr", "epochs",
            "batch_size", "ratio", "index", "random_seed", "eval_every", "grad_clip", "freeze_bn", "augment",
            "lr_scheduler", "proto_memory_mb", "val_share", "select", "collapse_margin", "collapse_patience",
            "optimizer", "te_epochs", "rho", "warmup_epochs", "cycle", "nt_classes", "mapping", "mapping_components",
            "mapping_steps", "inversion_steps", "inversion_batch_size", "inversion_classes", "inversion_scale",
            "nt_topk", "st_steps", "teacher_input_size"]


def draw_clean_subset(n_train: int, ratio: float, seed: int) -> List[int]:
    if not 0 < ratio <= 1:
        raise ConfigError(f"ratio (clean share) must lie in (0, 1], got {ratio}")
    gen = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_train, generator=gen)[: max(1, int(round(ratio * n_train)))].tolist())


def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_pgbd_console", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._pgbd_console = True
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)


def _fmt_table(before: Dict[str, float], after: Dict[str, float], dem_value: float, name: str) -> str:
    def row(label: str, m: Dict[str, float], last: str) -> str:
        return f"{label:<10}{100 * m['test_acc']:7.2f} {100 * m['test_asr']:7.2f} {100 * m['test_ra']:7.2f}  {last}"

    return "\n".join([f"{'':<10}{'CA':>7} {'ASR':>7} {'RA':>7}  DEM", row("poisoned", before, "-"),
                      row(name, after, f"{dem_value:.3f}")])


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"


def environment() -> Dict[str, str]:
    """Versions that decide the numbers, saved with every result."""
    import platform

    import numpy
    import sklearn
    import torchvision

    return {"pgbd_defense": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__, "python": platform.python_version(),
            "machine": platform.machine()}


def poisoned_evaluation(record: AttackRecord, record_dir: Path, normalize: Normalizer, device: str) -> Dict:
    """The record's model on its test sets, computed once per record: every defense of a
    side-by-side comparison needs the same numbers. The cache key hashes the weights and
    both test sets, so a changed model or data set is evaluated afresh."""
    h = hashlib.sha1()
    update_with_weights(h, record.model)
    for t in (record.clean_test.images, record.clean_test.labels, record.bd_test.images, record.bd_test.labels,
              record.bd_test.original_labels):
        h.update(raw_bytes(t))
    h.update(repr((normalize.mean.tolist(), normalize.std.tolist())).encode())
    path = Path(record_dir) / "defense" / f".poisoned_eval_{h.hexdigest()[:20]}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            pass  # a damaged cache is recomputed
    metrics = evaluate(record.model, record.clean_test, record.bd_test, normalize, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(metrics))
    return metrics


def teacher_features(cfg: Dict[str, Any], train: data_mod.ImageSet, rows: List[int], indices: List[int],
                     record_dir: Path, device: str) -> Optional[torch.Tensor]:
    """Teacher features of the training images for the large-model mapping (None when off).
    ``rows``: the training images' positions in the clean subset, whose record indices are ``indices``."""
    source = parse_source(cfg["mapping"])
    if source is None:
        return None
    kind, where, weights = source
    if kind == "file":
        return features_from_file(where, rows, indices)
    return cached_backbone_features(where, weights, train.images, Path(record_dir) / "defense",
                                    int(cfg["teacher_input_size"]), device)


def obtain_record(cfg: Dict[str, Any], args) -> Path:
    if args.record:
        return Path(args.record)
    settings = AttackSettings(attack=cfg["attack"], dataset=cfg["dataset"], model=cfg["model"], width=cfg["width"],
                              pratio=cfg["pratio"], target=cfg["attack_target"],
                              label_mode=cfg["attack_label_trans"], epochs=cfg["attack_epochs"],
                              lr=cfg["attack_lr"], batch_size=cfg["attack_batch_size"],
                              train_subset=cfg["attack_train_subset"], augment=cfg["attack_augment"],
                              trigger_image=cfg["trigger_image"] or "", trojan_optimize=bool(cfg["trojan_optimize"]),
                              overlays=cfg["overlays"] or "",
                              seed=cfg["random_seed"])
    ATTACKS.get(settings.attack)  # unknown names fail before any work
    data_mod.DATASETS.get(settings.dataset)
    MODELS.get(settings.model)
    folder = Path(args.record_root) / record_name(settings)
    if (folder / "attack_result.pt").is_file():
        log.info("reusing the attack record %s", folder)
    else:
        log.info("no record at %s: running the %s attack on %s", folder, settings.attack, settings.dataset)
        build_attack_record(folder, settings, data_root=args.data_root, download=args.download, device=args.device)
    return folder


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from .progress import quiet

    # quiet() restores the bars afterwards: a later call in the same process keeps its own choice.
    with quiet() if args.no_progress else contextlib.nullcontext():
        try:
            return _run(args)
        except USER_ERRORS as e:
            log.error("%s", e)
            return 2
        except KeyboardInterrupt:
            return 130


def _run(args) -> int:
    cli = {k: getattr(args, k, None) for k in CLI_KEYS}
    yaml_values = read_yaml(args.config)
    named = [yaml_values.pop(k, None) for k in ("defense", "variant")]  # bench_configs name the variant
    if args.variant and args.defense and VARIANT_DEFENSES[args.variant] != args.defense:
        raise ConfigError(f"--variant {args.variant} and --defense {args.defense} disagree: give one of them")
    defense = args.defense or (VARIANT_DEFENSES[args.variant] if args.variant else None) or \
        next((VARIANT_DEFENSES.get(n, n) for n in named if n), None) or "pgbd"
    DEFENSES.get(defense)  # an unknown name fails before any work
    args.defense = defense
    args.defense_name = args.defense_name or defense
    cfg = merge(args.preset, yaml_values, cli, defense=defense)
    for name in args.compare or []:
        DEFENSES.get(name)
    bench_root = require_checkout(Path(args.bench_root)) if args.bench_root else \
        (find_checkout() if not args.record else None)
    if bench_root is not None:
        from .bench.driver import run_in_checkout

        return run_in_checkout(args, cfg, bench_root)
    record_dir = obtain_record(cfg, args)
    # Load and validate everything before the first byte is written for this defense.
    record = load_attack_record(record_dir, data_root=args.data_root, trust=args.trust_record, device=args.device)
    code = defend_record(args, cfg, record, record_dir)
    if code == 0 and args.compare:
        compare_standalone(args, record_dir)
    return code


def compare_standalone(args, record_dir: Path) -> Path:
    """Our own implementations of the compared defenses on the same record and clean subset
    as the defense just run; one table in ``<record>/defense/comparison.*``."""
    from .experiments import Cell, run_cell
    from .tables import comparison_markdown, comparison_frame, write_comparison

    ours = json.loads((Path(record_dir) / "defense" / args.defense_name / "summary.json").read_text())
    index = Path(record_dir) / "defense" / args.defense_name / "index.txt"
    rows = [{**ours, "defense": args.defense_name, "status": "ok", "log": ""}]
    common = ["--preset", args.preset, "--index", str(index), "--seed", str(ours["seed"]), "--device", args.device]
    common += ["--config", args.config] if args.config else []
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value is not None:
            common += [flag, str(value)]
    for name in args.compare:
        if name == args.defense_name:
            continue
        log.info("comparing: %s on %s", name, record_dir)
        row = run_cell(Cell(Path(record_dir), name, list(common)), args.data_root, device=args.device)
        rows.append({**row, "defense": name})
    paths = write_comparison(rows, Path(record_dir) / "defense")
    print(comparison_markdown(comparison_frame(rows)))
    print(f"comparison: {paths['md']} (also .csv, .tex)")
    return paths["md"]


def defend_record(args, cfg: Dict[str, Any], record: AttackRecord, record_dir: Path) -> int:
    """Run the configured defense on a loaded record into ``<record>/defense/<name>/``,
    logging to its ``log/`` folder. ``args`` needs defense, defense_name, device,
    overwrite, resume and preset."""
    out = prepare_defense_dir(record_dir, args.defense_name, args.overwrite)
    file_handler = logging.FileHandler(log_file_path(out))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(file_handler)
    try:
        return _defend(args, cfg, record, record_dir, out)
    finally:
        logging.getLogger().removeHandler(file_handler)
        file_handler.close()


def _defend(args, cfg, record: AttackRecord, record_dir: Path, out: Path) -> int:
    started = time.time()  # the defense's own time; building the attack record is not counted
    clock = PhaseClock()
    info = data_mod.dataset_info(record.clean_data)
    normalize = record.normalizer()
    layer = cfg["layer"] or last_conv_name(record.model)
    find_layer(record.model, layer)
    n_train = len(record.clean_train)
    indices = read_index(Path(cfg["index"]), n_train) if cfg["index"] else \
        draw_clean_subset(n_train, cfg["ratio"], cfg["random_seed"])
    clean = data_mod.ImageSet(record.clean_train.images[indices], record.clean_train.labels[indices])
    selection = Selection(val_share=cfg["val_share"], select=cfg["select"], collapse_margin=cfg["collapse_margin"],
                          collapse_patience=cfg["collapse_patience"])
    kept, held = split_positions(clean.labels, selection.val_share, cfg["random_seed"])
    train = data_mod.ImageSet(clean.images[kept], clean.labels[kept])
    val = data_mod.ImageSet(clean.images[held], clean.labels[held]) if held is not None else None
    with clock("target_inference"):
        targets, inference = defended_targets(cfg, record, train, normalize, out, args.device)
    with clock("teacher_features"):
        teacher = teacher_features(cfg, train, kept.tolist(), indices, record_dir, args.device)
    method = build_method(args.defense, cfg, targets, layer, teacher)
    log.info("record %s: %s, %d classes, targets %s; clean subset %d samples (%d train, %d held out); "
             "defense %s; layer %s", record_dir, record.model_name, record.num_classes, targets.tolist(), len(clean),
             len(train), len(val) if val is not None else 0, args.defense, layer)
    with clock("poisoned_evaluation"):
        before = poisoned_evaluation(record, record_dir, normalize, args.device)
    log.info("poisoned model: CA %.4f ASR %.4f RA %.4f", before["test_acc"], before["test_asr"], before["test_ra"])
    if before["test_asr"] == 0 or before["test_acc"] == 0:
        log.warning("the record's model shows no backdoor (ASR %.4f) or no accuracy (CA %.4f): DEM is undefined "
                    "and will be reported as NaN", before["test_asr"], before["test_acc"])
    eval_every = int(cfg["eval_every"])

    def on_epoch_end(epoch: int, stats: Dict[str, float]) -> Dict[str, float]:
        # Test-set numbers are a diagnostic for the per-epoch table, off unless asked for
        # (--eval-every N): selection never sees them.
        row = {"epoch": epoch, "batch": -(-len(train) // method.cfg.batch_size) - 1}
        if eval_every and (epoch + 1) % eval_every == 0:
            row.update(evaluate(record.model, record.clean_test, record.bd_test, normalize, device=args.device))
            log.info("epoch %d: loss %.4f held-out %s CA %.4f ASR %.4f RA %.4f", epoch + 1,
                     stats["train_epoch_loss_avg_over_batch"], _pct(stats.get("val_acc")), row["test_acc"],
                     row["test_asr"], row["test_ra"])
        else:
            log.info("epoch %d: loss %.4f held-out %s", epoch + 1, stats["train_epoch_loss_avg_over_batch"],
                     _pct(stats.get("val_acc")))
        return row

    checkpoint = out / "checkpoint" / "last.pt"
    if checkpoint.is_file() and not args.resume:
        log.warning("%s holds an interrupted run; starting over (pass --resume to continue it instead)", checkpoint)
    try:
        result = finetune(record.model, method, train, normalize, val=val, selection=selection, hflip=info.hflip,
                          device=args.device, on_epoch_end=on_epoch_end, checkpoint=checkpoint, resume=args.resume,
                          fingerprint=targets.tolist())
    except KeyboardInterrupt:
        log.error("interrupted: every finished epoch is saved in %s; rerun the same command with --resume "
                  "to continue", checkpoint)
        raise
    rows = result.history
    chosen = rows[result.selected_epoch] if result.selected_epoch >= 0 else None
    # The returned model is evaluated once: a diagnostic evaluation of its own epoch is
    # reused (same weights, same numbers), any other epoch's is not evaluated again.
    if chosen is not None and "test_acc" in chosen:
        after = chosen
    else:
        with clock("evaluation"):
            after = evaluate(record.model, record.clean_test, record.bd_test, normalize, device=args.device)
        if chosen is not None:
            chosen.update(after)  # the per-epoch table shows the returned model's numbers at its epoch
    for note in result.notes:
        log.warning("%s", note)
    log.info("selected epoch %d of %d (%s)", result.selected_epoch + 1, len(rows),
             "collapse guard" if result.collapsed else selection.select if val is not None else "last")
    d = dem(before["test_acc"], before["test_asr"], after["test_acc"], after["test_asr"]) \
        if before["test_asr"] > 0 and before["test_acc"] > 0 else DEM(math.nan, math.nan)
    summary = {
        "attack": record.raw.get("attack", record.name), "dataset": record.clean_data, "defense": args.defense,
        "ca_poisoned": before["test_acc"], "asr_poisoned": before["test_asr"], "ra_poisoned": before["test_ra"],
        "ca": after["test_acc"], "asr": after["test_asr"], "ra": after["test_ra"], "dem": d.value,
        "delta_c": d.delta_c, "delta_a": d.delta_a, "seconds": round(time.time() - started, 1),
        **{f"seconds_{phase}": round(t, 2) for phase, t in {**clock.seconds, **result.seconds}.items()},
        "record": str(record_dir), "clean_samples": len(clean), "train_samples": len(train),
        "val_samples": len(val) if val is not None else 0, "selected_epoch": result.selected_epoch,
        "epochs_run": len(rows), "collapsed": result.collapsed, "val_acc_before": result.val_acc_before,
        "val_acc_selected": rows[result.selected_epoch].get("val_acc") if result.selected_epoch >= 0 else
        result.val_acc_before, "seed": cfg["random_seed"], "targets": targets.tolist(),
        "environment": environment(),
    }
    if inference is not None:
        summary["target_inference"] = {"target": inference.target, "flagged": inference.flagged,
                                       "ranking": inference.ranking, "file": "target_inference.csv"}
    summary.update(method.write_artifacts(out))
    write_defense_result(out, record.model, record.model_name, record.num_classes)
    write_epoch_tables(out, args.defense_name, rows)
    if getattr(method, "teacher_history", None):  # NAD's teacher, as BackdoorBench writes nad_te_df.csv
        write_epoch_tables(out, f"{args.defense_name}_te", method.teacher_history)
    write_index(out, indices)
    write_summary(out, summary, {**cfg, "layer": layer, "preset": args.preset, "device": args.device})
    checkpoint.unlink(missing_ok=True)  # the results above supersede it
    print(_fmt_table(before, after, d.value, args.defense_name))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
