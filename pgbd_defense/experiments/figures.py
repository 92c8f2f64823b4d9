"""Figures from a record and its defense folders; each writes a PNG and the CSV behind it.

    python -m pgbd_defense.figures alignment --record R
    python -m pgbd_defense.figures gradcam --record R [--defense-dir R/defense/pgbd]
    python -m pgbd_defense.figures ablation --record R --param lambda --values 0.1,1,10
    python -m pgbd_defense.figures ablation --param poison-ratio --values 0.01,0.05,0.1
    python -m pgbd_defense.figures mapping --record R --teacher torchvision:resnet18:teacher.pth

Output goes to ``--out`` (default ``<record>/figures``). ``ablation`` and
``mapping`` run PGBD per setting as cached cells (like the Table 2 command).
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..datasets import ImageSet
from ..datasets.batches import Normalizer
from ..errors import ConfigError, UserError
from ..formats.records import AttackRecord, RecordError, load_attack_record, load_defense_result
from ..method.alignment import last_stage_convs, layer_alignment, paired_poisoned
from ..method.inversion import METHODS, InversionConfig, invert_trigger, save_trigger_png, trigger_overlap
from ..method.prototypes import collect_activations, estimate_prototypes
from ..method.separation import layer_separation
from ..pipeline import draw_clean_subset
from ..util.atomic import atomic_path, atomic_write_csv
from ..util.hooks import last_conv_name
from ..util.logs import setup_logging
from .cells import Cell, run_cell, shared_index
from .gradcam import grad_cam
from .runner import CellJob, add_executor_arguments, executor_spec, record_folder
from .runner import run as runner_run
from .table2 import PRESETS as TABLE_PRESETS
from .table2 import PROTOCOLS

# The figures' cells: the ci scale, every defense on the equal budget (the cpu preset).
PROTOCOL = "equal-budget"

log = logging.getLogger("pgbd_defense.figures")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def _write_csv(path: Path, rows: Sequence[Dict]) -> Path:
    atomic_write_csv(path, rows)
    return path


def _single_target(record: AttackRecord) -> int:
    targets = sorted({int(t) for t in record.target_labels().tolist() if t >= 0})
    if len(targets) != 1:
        raise RecordError(f"{record.folder}: this figure needs an all-to-one record (targets found: {targets})")
    return targets[0]


def _clean_subset(record: AttackRecord, ratio: float, seed: int) -> ImageSet:
    idx = draw_clean_subset(len(record.clean_train), ratio, seed)
    return ImageSet(record.clean_train.images[idx], record.clean_train.labels[idx])


# ---------------------------------------------------------------- alignment (Fig. 2)

PROJECTIONS = ("pca", "tsne")


def alignment_figure(record: AttackRecord, out: Path, ratio: float = 0.05, seed: int = 0,
                     layers: Optional[List[str]] = None, device: str = "cpu",
                     projections: Sequence[str] = ("pca",)) -> Dict[str, Path]:
    target = _single_target(record)
    normalize = record.normalizer()
    clean = _clean_subset(record, ratio, seed)
    layers = layers or last_stage_convs(record.model)
    results = layer_alignment(record.model, layers, clean, record.bd_test, record.clean_test, target,
                              record.num_classes, normalize, device=device)
    rows = [{"layer": r.layer, "class": c, "cos_pav_gt": round(r.per_class[c], 5),
             "cos_reference_gt": round(r.reference[c], 5)} for r in results for c in r.per_class]
    paths = {"csv": _write_csv(out / "alignment.csv", rows)}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(results), 3.4))
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r.mean for r in results], 0.4, label="PAV  P_t - P_c")
    ax.bar([i + 0.2 for i in x], [r.reference_mean for r in results], 0.4, label="reference  P_c' - P_c (c' != t)")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(list(x), [r.layer for r in results], fontsize=8)
    ax.set_ylabel("mean cosine with the trigger's shift")
    ax.set_ylim(-1, 1)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{record.name}: does the PAV point where the trigger moves activations?", fontsize=8)
    paths["png"] = _save(fig, out / "alignment.png")
    for method in projections:
        paths.update(projection_figure(record, clean, layers[-1], target, normalize, out, device, method=method))
    return paths


def embed_2d(acts: torch.Tensor, bd: torch.Tensor, means: torch.Tensor, method: str = "pca"):
    """Two-dimensional coordinates of clean activations, poisoned ones and prototypes.

    ``pca``: the plane of the clean activations' two main components, every point projected on
    it (distances along it are true). ``tsne``: scikit-learn's t-SNE of all points together (the
    prototypes among them, as t-SNE cannot place a point it was not fitted on); it keeps
    neighbourhoods, not distances or directions, so PAV arrows in it are only qualitative.
    """
    if method == "pca":
        from sklearn.decomposition import PCA

        pca = PCA(n_components=2, random_state=0).fit(acts.double().numpy())
        return tuple(pca.transform(t.double().numpy()) for t in (acts, bd, means))
    if method != "tsne":
        raise ValueError(f"unknown projection {method!r}; choose one of {PROJECTIONS}")
    from sklearn.manifold import TSNE

    points = torch.cat([acts, bd, means]).double().numpy()
    # perplexity must stay below the number of points; 30 is scikit-learn's default
    tsne = TSNE(n_components=2, perplexity=min(30.0, (len(points) - 1) / 3), init="pca", random_state=0)
    flat = tsne.fit_transform(points)
    return flat[:len(acts)], flat[len(acts):len(acts) + len(bd)], flat[len(acts) + len(bd):]


def projection_figure(record: AttackRecord, clean: ImageSet, layer: str, target: int, normalize: Normalizer,
                      out: Path, device: str = "cpu", max_poisoned: int = 400, method: str = "pca"
                      ) -> Dict[str, Path]:
    """Clean and poisoned activations of ``layer`` in two dimensions (``embed_2d``: PCA or
    t-SNE) with prototypes and PAV arrows (Fig. 2 left; t-SNE as in the paper's appendix)."""
    triggered, _, bd_labels = paired_poisoned(record.bd_test, record.clean_test)
    acts = collect_activations(record.model, layer, clean.images, normalize, device=device)
    bd = collect_activations(record.model, layer, triggered[:max_poisoned], normalize, device=device)
    means = estimate_prototypes(acts, clean.labels, record.num_classes).means()
    a2, b2, p2 = embed_2d(acts, bd, means, method)
    stem = "projection" if method == "pca" else f"projection_{method}"
    rows = ([{"x": a[0], "y": a[1], "kind": "clean", "label": int(y)} for a, y in zip(a2, clean.labels)]
            + [{"x": b[0], "y": b[1], "kind": "poisoned", "label": int(y)} for b, y in zip(b2, bd_labels)]
            + [{"x": p[0], "y": p[1], "kind": "prototype", "label": c} for c, p in enumerate(p2)])
    key = "projection" if method == "pca" else f"projection_{method}"
    paths = {f"{key}_csv": _write_csv(out / f"{stem}.csv", rows)}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    cmap = plt.get_cmap("tab10")
    ax.scatter(a2[:, 0], a2[:, 1], s=4, c=[cmap(int(y) % 10) for y in clean.labels], alpha=0.35)
    ax.scatter(b2[:, 0], b2[:, 1], s=10, marker="x", c="black", alpha=0.5, label="poisoned test images")
    for c, p in enumerate(p2):
        ax.scatter(p[0], p[1], s=90, marker="*", color=cmap(c % 10), edgecolor="black", zorder=3)
        if c != target:
            ax.annotate("", xy=p2[target], xytext=p, arrowprops={"arrowstyle": "->", "color": cmap(c % 10),
                                                                 "lw": 0.9, "alpha": 0.8})
    ax.set_title(f"{layer}: clean activations (by class), poisoned ones (x),\nprototypes (*) and PAVs "
                 f"towards target {target} ({'PCA' if method == 'pca' else 't-SNE: arrows qualitative'})",
                 fontsize=8)
    ax.legend(fontsize=7, loc="best")
    paths[f"{key}_png"] = _save(fig, out / f"{stem}.png")
    return paths


def separation_table(record: AttackRecord, out: Path, layers: Optional[List[str]] = None, max_images: int = 500,
                     seed: int = 0, device: str = "cpu") -> Dict[str, Path]:
    """``separation.csv``: per layer, how separable the record's poisoned test images are from
    the same images clean (``method/separation.py``): ML-MMDR's claim made measurable."""
    triggered, plain, _ = paired_poisoned(record.bd_test, record.clean_test)
    layers = layers or ["layer3", "layer4"]
    rows = layer_separation(record.model, layers, triggered, plain, record.normalizer(), max_images, seed, device)
    for r in rows:
        log.info("%s: MMD^2 %.4f, linear probe %.3f on %d pairs", r["layer"], r["mmd2"], r["probe_accuracy"],
                 r["images"])
    return {"csv": _write_csv(out / "separation.csv", [{**r, "record": record.name} for r in rows])}


def true_trigger_region(triggered: torch.Tensor, plain: torch.Tensor, share: float = 0.1) -> torch.Tensor:
    """(H, W) pixels where the real trigger changes images: their mean absolute change over the
    poisoned test images exceeds ``share`` of the largest mean change."""
    change = (triggered.float() - plain.float()).abs().mean((0, 1))
    return change > share * float(change.max()) if float(change.max()) > 0 else torch.zeros_like(change, dtype=bool)


def inversion_table(record: AttackRecord, out: Path, methods: Sequence[str] = METHODS, ratio: float = 0.05,
                    seed: int = 0, steps: int = 300, batch_size: int = 32, device: str = "cpu") -> Dict[str, Path]:
    """Each inversion method's trigger for the record's target on the defender's clean subset:
    its size (mask L1 or changed pixels), flip rate on the subset's other classes, and the share
    of it inside the true trigger's region; ``inversion.csv`` and one PNG per method."""
    target = _single_target(record)
    clean = _clean_subset(record, ratio, seed)
    triggered, plain, _ = paired_poisoned(record.bd_test, record.clean_test)
    region = true_trigger_region(triggered, plain)
    rows, paths = [], {}
    for method in methods:
        cfg = InversionConfig(steps=steps, batch_size=batch_size, seed=seed, method=method)
        trig = invert_trigger(record.model, clean, target, record.normalizer(), cfg, device)
        rows.append({"record": record.name, "method": method, "target": target, "size": round(trig.norm, 3),
                     "size_unit": "changed pixels" if trig.kind == "additive" else "mask L1",
                     "changed_pixels": int((trig.support() > 0.5).sum()), "flip_rate": round(trig.flip_rate, 4),
                     "overlap_true_region": round(trigger_overlap(trig, region), 4),
                     "true_region_pixels": int(region.sum())})
        paths[f"{method}_png"] = save_trigger_png(trig, out / f"inversion_{method}.png")
        log.info("%s: size %.1f, flips %.1f%%, %.0f%% inside the true trigger's %d pixels", method, trig.norm,
                 100 * trig.flip_rate, 100 * rows[-1]["overlap_true_region"], rows[-1]["true_region_pixels"])
    paths["csv"] = _write_csv(out / "inversion.csv", rows)
    return paths


# ---------------------------------------------------------------- Grad-CAM (Fig. 4)

def gradcam_figure(record: AttackRecord, defense_dir: Path, out: Path, count: int = 8, layer: Optional[str] = None,
                   device: str = "cpu") -> Dict[str, Path]:

    normalize = record.normalizer()
    defended = copy.deepcopy(record.model)
    saved = load_defense_result(defense_dir)
    defended.load_state_dict(saved["model"])
    layer = layer or last_conv_name(record.model)
    triggered, plain, labels = (t[:count] for t in paired_poisoned(record.bd_test, record.clean_test))
    x = normalize(triggered.to(device))
    # The trigger's footprint: where the poisoned image differs from its clean original, with a margin
    # of an eighth of the image (the maps are upsampled from 4x4 or 7x7 grids and cannot be sharper).
    footprint = (triggered.float() - plain.float()).abs().amax(1) > 8
    r = max(1, triggered.shape[-1] // 8)
    footprint = torch.nn.functional.max_pool2d(footprint[:, None].float(), 2 * r + 1, 1, r)[:, 0] > 0
    rows, maps = [], {}
    for name, model in (("before", record.model), ("after", defended)):
        with torch.no_grad():
            pred = model.eval()(x).argmax(1).cpu()
        cam = grad_cam(model, layer, x).cpu()
        maps[name] = (cam, pred)
    plt = _plt()
    fig, axes = plt.subplots(3, len(triggered), figsize=(1.3 * len(triggered), 4.4), squeeze=False)
    gray = triggered.shape[1] == 1
    for i in range(len(triggered)):
        img = triggered[i].permute(1, 2, 0).squeeze(-1).numpy()
        axes[0, i].imshow(img, cmap="gray" if gray else None)
        axes[0, i].set_title(f"true {int(labels[i])}", fontsize=7)
        row = {"image": i, "true": int(labels[i])}
        for r, name in ((1, "before"), (2, "after")):
            cam, pred = maps[name]
            axes[r, i].imshow(img, cmap="gray" if gray else None)
            axes[r, i].imshow(cam[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes[r, i].set_title(f"{name}: {int(pred[i])}", fontsize=7)
            mass = float(cam[i][footprint[i]].sum() / cam[i].sum().clamp_min(1e-12))
            # focus: mean map value near the trigger over the mean everywhere (1 = no preference)
            focus = float(cam[i][footprint[i]].mean() / cam[i].mean().clamp_min(1e-12)) if footprint[i].any() \
                else float("nan")
            row.update({f"pred_{name}": int(pred[i]), f"cam_on_trigger_{name}": round(mass, 4),
                        f"trigger_focus_{name}": round(focus, 3)})
        rows.append(row)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"Grad-CAM of {layer} on poisoned test images: backdoored (middle) vs {defense_dir.name} "
                 "(bottom); title = predicted class", fontsize=8)
    focus = {k: sum(r[f"trigger_focus_{k}"] for r in rows) / len(rows) for k in ("before", "after")}
    log.info("Grad-CAM focus near the trigger (mean there / mean everywhere; 1 = none): before %.2f, "
             "after %.2f", focus["before"], focus["after"])
    return {"csv": _write_csv(out / "gradcam.csv", rows), "png": _save(fig, out / "gradcam.png")}


# ---------------------------------------------------------------- ablations and mapping (cached cells)

# Ablation parameters and the setting each varies (poison-ratio varies the attack: a record per value).
PARAMS = {"lambda": "lambda", "alpha": "alpha", "clean-ratio": "ratio", "poison-ratio": None}


def _jobs_for(param: str, values: Sequence[float], record: Optional[Path], args) -> List[CellJob]:
    """One PGBD cell per value; ``poison-ratio`` needs a record per value (made as a job does)."""
    preset = TABLE_PRESETS["ci"]
    base = {"random_seed": args.seed, **preset.defense_settings}
    jobs = []
    for v in values:
        attack = None
        extra = {}
        if param == "poison-ratio":
            attack = preset.attack_settings(args.attack, args.dataset, v, PROTOCOL, args.seed)
            rec = record_folder(Path(args.record_root), attack)
        else:
            rec = Path(record)
            extra[PARAMS[param]] = float(v)
            if param == "alpha":  # alpha blends re-estimated prototypes: it needs re-estimation to matter
                extra["update_gap"] = 1
        if param != "clean-ratio":
            extra["index"] = str(rec / f"clean_subset_{preset.ratio:g}_{args.seed}.txt")  # cells.shared_index's
        cell = Cell(rec, "pgbd", {**base, **extra}, preset=PROTOCOLS[PROTOCOL].preset)
        index = (preset.ratio, args.seed) if param != "clean-ratio" else None
        jobs.append(CellJob(cell, attack, index, args.data_root, args.recompute, {"value": v}))
    return jobs


def ablation_figure(param: str, values: Sequence[float], record: Optional[Path], out: Path, args) -> Dict[str, Path]:
    jobs = _jobs_for(param, values, record, args)
    results = runner_run(jobs, executor_spec(args, out), desc="ablation cells")
    if results is None:
        raise UserError(f"submitted {len(jobs)} cells; rerun the same command (with --wait, or after they finish) "
                        "to draw the figure")
    rows = []
    for job, r in zip(jobs, results):
        rows.append({"param": param, "value": job.meta["value"], "status": r["status"], "ca": r.get("ca"),
                     "asr": r.get("asr"), "dem": r.get("dem"), "ca_poisoned": r.get("ca_poisoned"),
                     "asr_poisoned": r.get("asr_poisoned"), "seconds": r.get("seconds"), "cell": str(job.cell.folder)})
    paths = {"csv": _write_csv(out / f"ablation_{param}.csv", rows)}
    ok = [r for r in rows if r["status"] in ("ok", "cached")]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.3))
    for key, label in (("ca", "CA"), ("asr", "ASR"), ("dem", "DEM")):
        ax.plot([r["value"] for r in ok], [r[key] for r in ok], marker="o", label=label)
    if ok and min(r["value"] for r in ok) > 0 and max(r["value"] for r in ok) / min(r["value"] for r in ok) >= 20:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"PGBD: {param} ablation", fontsize=9)
    paths["png"] = _save(fig, out / f"ablation_{param}.png")
    return paths


def mapping_figure(record: Path, teacher: str, out: Path, args) -> Dict[str, Path]:
    preset = TABLE_PRESETS["ci"]
    index = shared_index(record, preset.ratio, args.seed, args.data_root)
    base = {"random_seed": args.seed, "index": str(index), **preset.defense_settings}
    rows = []
    for defense in args.defenses.split(","):
        mapped = {"mapping": teacher, **({"teacher_input_size": args.teacher_input_size}
                                         if args.teacher_input_size else {})}
        for label, extra in (("without mapping", {}), ("with mapping", mapped)):
            cell = Cell(record, defense, {**base, **extra}, preset=PROTOCOLS[PROTOCOL].preset)
            r = run_cell(cell, args.data_root, args.recompute, args.device)
            rows.append({"defense": defense, "setting": label, "status": r["status"], "ca": r.get("ca"),
                         "asr": r.get("asr"), "delta_c": r.get("delta_c"), "delta_a": r.get("delta_a"),
                         "dem": r.get("dem"), "seconds": r.get("seconds"),
                         "map_converged": (r.get("mapping") or {}).get("converged"),
                         "map_round_trip_error": (r.get("mapping") or {}).get("student_round_trip_error")})
    paths = {"csv": _write_csv(out / "mapping.csv", rows)}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(rows), 3.3))
    names = [f"{r['defense']}\n{r['setting']}" for r in rows]
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["delta_c"] or 0 for r in rows], 0.4, label="delta_C (CA kept)")
    ax.bar([i + 0.2 for i in xs], [r["delta_a"] or 0 for r in rows], 0.4, label="delta_A (ASR removed)")
    ax.set_xticks(list(xs), names, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"Large-model mapping ({teacher.split(':')[1] if ':' in teacher else Path(teacher).name})",
                 fontsize=9)
    paths["png"] = _save(fig, out / "mapping.png")
    return paths


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pgbd_defense.figures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)

    def common(sp, record_required=True):
        sp.add_argument("--record", required=record_required, help="attack record folder")
        sp.add_argument("--data-root")
        sp.add_argument("--out", help="output folder (default <record>/figures)")
        sp.add_argument("--device", default="cpu")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--trust-record", action="store_true")
        sp.add_argument("-v", "--verbose", action="store_true")

    a = sub.add_parser("alignment", help="PAV vs the trigger's true shift, per layer; PCA projection")
    common(a)
    a.add_argument("--ratio", type=float, default=0.05, help="clean share the prototypes come from")
    a.add_argument("--layers", help="comma-separated layers (default: last conv of the last three stages)")
    a.add_argument("--projection", default="pca", choices=PROJECTIONS + ("both",),
                   help="the activation-space scatter: PCA (projection.png), t-SNE (projection_tsne.png) or both")
    sp = sub.add_parser("separation", help="clean vs poisoned activations per layer: MMD^2 and a linear probe")
    common(sp)
    sp.add_argument("--layers", help="comma-separated layers (default: layer3,layer4, ML-MMDR's)")
    sp.add_argument("--max-images", type=int, default=500, help="poisoned test images (paired with their clean "
                                                                      "versions)")
    iv = sub.add_parser("inversion", help="the record's target trigger by each inversion method: size, flip rate, "
                                          "overlap with the true trigger")
    common(iv)
    iv.add_argument("--methods", default=",".join(METHODS), help="comma-separated: nc, tao")
    iv.add_argument("--ratio", type=float, default=0.05, help="clean share the search runs on")
    iv.add_argument("--steps", type=int, default=300)
    g = sub.add_parser("gradcam", help="Grad-CAM before and after a defense")
    common(g)
    g.add_argument("--defense-dir", help="a defense folder with defense_result.pt (default <record>/defense/pgbd)")
    g.add_argument("--count", type=int, default=8)
    g.add_argument("--layer")
    b = sub.add_parser("ablation", help="PGBD per value of one setting: CA, ASR, DEM")
    common(b, record_required=False)
    b.add_argument("--param", required=True, choices=sorted(PARAMS))
    b.add_argument("--values", required=True, type=lambda v: [float(x) for x in v.split(",") if x])
    b.add_argument("--attack", default="badnet", help="poison-ratio: the attack of the records it makes")
    b.add_argument("--dataset", default="fashion-mnist")
    b.add_argument("--record-root", default="record")
    b.add_argument("--recompute", action="store_true")
    add_executor_arguments(b)
    m = sub.add_parser("mapping", help="with vs without the large-model mapping: delta_C / delta_A bars")
    common(m)
    m.add_argument("--teacher", required=True, help="a features file or torchvision:NAME:WEIGHTS_FILE")
    m.add_argument("--defenses", default="pgbd", help="pgbd and/or nt-pgbd")
    m.add_argument("--teacher-input-size", type=int, help="side in pixels the teacher backbone sees (default 224)")
    m.add_argument("--recompute", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        if args.figure == "ablation" and args.param != "poison-ratio" and not args.record:
            raise RecordError(f"--param {args.param} varies PGBD on one record: give --record")
        out = Path(args.out or (Path(args.record) / "figures" if args.record else "out/figures"))
        out.mkdir(parents=True, exist_ok=True)
        if args.figure in ("alignment", "gradcam", "separation", "inversion"):
            record = load_attack_record(args.record, data_root=args.data_root, trust=args.trust_record,
                                        device=args.device)
        if args.figure == "alignment":
            layers = [v for v in (args.layers or "").split(",") if v] or None
            projections = PROJECTIONS if args.projection == "both" else (args.projection,)
            paths = alignment_figure(record, out, args.ratio, args.seed, layers, args.device, projections)
        elif args.figure == "inversion":
            methods = [m for m in args.methods.split(",") if m]
            bad = [m for m in methods if m not in METHODS]
            if bad:
                raise ConfigError(f"--methods {bad}: choose from {', '.join(METHODS)}")
            paths = inversion_table(record, out, methods, args.ratio, args.seed, args.steps, device=args.device)
        elif args.figure == "separation":
            layers = [v for v in (args.layers or "").split(",") if v] or None
            paths = separation_table(record, out, layers, args.max_images, args.seed, args.device)
        elif args.figure == "gradcam":
            defense_dir = Path(args.defense_dir or Path(args.record) / "defense" / "pgbd")
            if not (defense_dir / "defense_result.pt").is_file():
                raise RecordError(f"no defense_result.pt in {defense_dir}: run a defense on the record first "
                                  f"(python -m pgbd_defense.run --record {args.record}) or give --defense-dir")
            paths = gradcam_figure(record, defense_dir, out, args.count, args.layer, args.device)
        elif args.figure == "ablation":
            paths = ablation_figure(args.param, args.values, Path(args.record) if args.record else None, out, args)
        else:
            paths = mapping_figure(Path(args.record), args.teacher, out, args)
    except UserError as e:
        log.error("%s", e)
        return 2
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
