"""What a grid will cost before it is launched (``table2 --plan``): the number of records and
cells, and per cell kind a time on the chosen device, measured where cells of that kind have
already finished in this grid (their median), else estimated.

An estimate counts the images each cell passes through its model (forward and backward
passes, at the cell's batch size) from its settings, and divides by throughputs measured
here, now, on the chosen device, with the grid's model at its width and image size (a few
seconds of timing per batch size). It ignores data handling, hooks and k-means: on this
project's 2-core CPU it came within a factor of three of measured cells (ci preset, equal
budget, 2 threads: FT 28 s estimated vs 28-34 s measured, PGBD 29 vs 26-33 s; paper
protocol at 1%, one thread: FT 394 vs 331 s, NAD 91 vs 258 s, I-BAU 145 vs 99 s).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

from ..datasets import dataset_info
from ..defenses import defense_config
from ..formats.models import build_model
from ..settings import resolve
from .runner import CellJob, status_rows


@dataclass
class Rates:
    """Images per second of the grid's model on a device: training (forward + backward) at
    each batch size asked for, and evaluation (forward) at batch 128."""

    model: torch.nn.Module
    shape: tuple
    device: str
    seconds: float = 1.0

    def __post_init__(self):
        self._train: Dict[int, float] = {}
        self._eval = None

    def _time(self, batch: int, train: bool) -> float:
        model = self.model.to(self.device).train(train)
        x = torch.randn(batch, *self.shape, device=self.device)
        y = torch.zeros(batch, dtype=torch.int64, device=self.device)
        images, start = 0, time.perf_counter()
        while time.perf_counter() - start < self.seconds or images < 2 * batch:
            if train:
                model.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
            else:
                with torch.inference_mode():
                    model(x)
            images += batch
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return images / (time.perf_counter() - start)

    def train(self, batch: int) -> float:
        if batch not in self._train:
            self._time(batch, True)  # a warm-up pass
            self._train[batch] = self._time(batch, True)
        return self._train[batch]

    def eval(self) -> float:
        if self._eval is None:
            self._eval = self._time(128, False)
        return self._eval


def cell_seconds(settings, n_train: int, n_test: int, rates: Rates) -> float:
    """An estimate of one cell: its training passes at its batch size, its extra forward passes
    (prototypes, a frozen copy, searches), and one evaluation of both test sets."""
    cfg = defense_config(settings.defense, settings)
    b = int(cfg.batch_size)
    train = cfg.epochs * n_train / rates.train(b)
    forward = 0.0  # extra forward passes, at evaluation speed
    d = settings.defense
    if d == "ft-sam":
        train *= 2  # a second forward and backward at the perturbed weights
    elif d == "nad":
        train += cfg.te_epochs * n_train / rates.train(b)  # the teacher
        forward += cfg.epochs * n_train
    elif d == "i-bau":
        # per round: delta's fit (one pass), then per batch K Neumann terms and the outer loss
        train *= 2 + cfg.fixed_point_iters
        forward += cfg.epochs * n_train
    elif d == "mcl":
        train += cfg.inversion_steps * cfg.inversion_batch_size / rates.train(cfg.inversion_batch_size)
        forward += 2 * cfg.epochs * n_train  # the frozen copy on clean and stamped inputs
    elif d in ("pgbd", "nt-pgbd", "st-pgbd"):
        estimates = 1 + (cfg.epochs - 1) // cfg.update_gap if cfg.update_gap else 1
        forward += estimates * n_train
        if d == "st-pgbd":
            train += cfg.st_steps * cfg.st_batch_size / rates.train(cfg.st_batch_size)
    if settings["target"] == "auto":
        classes = len(settings["inversion_classes"]) or 10
        train += classes * settings["inversion_steps"] * settings["inversion_batch_size"] / rates.train(
            settings["inversion_batch_size"])
    return train + (forward + 2 * n_test) / rates.eval()


def record_seconds(attack, n_train: int, n_test: int, rates: Rates) -> float:
    images = attack.train_subset or n_train
    return attack.epochs * images / rates.train(attack.batch_size) + 2 * n_test / rates.eval()


def plan_text(jobs: Sequence[CellJob], protocol_preset: str, device: str) -> str:
    """The plan of a grid as Markdown lines: per data set (its size and image shape set the cost),
    the records and each cell kind."""
    rows = status_rows(jobs)
    by_dataset: Dict[str, List[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        by_dataset[job.attack.dataset if job.attack is not None else "(given records)"].append(i)
    n_records = len({str(j.cell.record) for j in jobs})
    lines = [f"{n_records} records, {len(jobs)} cells ({sum(r['status'] == 'cached' for r in rows)} already "
             f"finished), on {device}:", "",
             "| data set | kind | count | to run | seconds each | how known |", "|---|---|---|---|---|---|"]
    total, rates_cache = 0.0, {}
    for dataset, members in by_dataset.items():
        first = jobs[members[0]]
        rates, n_train, n_test = None, 0, 0
        if first.attack is not None:
            info = dataset_info(dataset)
            n_train, n_test = info.splits
            key = (first.attack.model, first.attack.width, info.size)  # the class count barely changes the cost
            if key not in rates_cache:
                model = build_model(first.attack.model, info.num_classes, info.size[2], first.attack.width)
                rates_cache[key] = Rates(model, (info.size[2], *info.size[:2]), device)
            rates = rates_cache[key]
            records = {str(jobs[i].cell.record): jobs[i] for i in members}
            to_make = [j for j in records.values() if not (j.cell.record / "attack_result.pt").is_file()]
            if to_make and n_train:
                seconds = [record_seconds(j.attack, n_train, n_test, rates) for j in to_make]
                total += sum(seconds)
                lines.append(f"| {dataset} | record (the attack) | {len(records)} | {len(to_make)} | "
                             f"{sum(seconds) / len(seconds):.0f} | estimated |")
        kinds: Dict[str, List[int]] = defaultdict(list)
        for i in members:
            kinds[jobs[i].cell.label or jobs[i].cell.defense].append(i)
        for kind, idx in kinds.items():
            done = [float(rows[i]["seconds"]) for i in idx
                    if rows[i]["status"] == "cached" and rows[i].get("seconds") is not None]
            todo = [i for i in idx if rows[i]["status"] != "cached"]
            if done:
                each, how = sorted(done)[len(done) // 2], f"measured ({len(done)} cells)"
            elif rates is not None and n_train:
                job = jobs[idx[0]]
                settings = resolve(protocol_preset, job.cell.defense, None, dict(job.cell.settings))
                # the record keeps the whole clean training split (the attack's train_subset only
                # limits what the backdoored model trained on), so the subset is ratio x the split
                n_clean = int(round(settings["ratio"] * n_train))
                each, how = cell_seconds(settings, n_clean, n_test, rates), "estimated"
            else:
                each, how = math.nan, "unknown (no data set size)"
            total += each * len(todo) if not math.isnan(each) else 0.0
            lines.append(f"| {dataset} | {kind} | {len(idx)} | {len(todo)} | {each:.0f} | {how} |")
    lines += ["", f"Left to run: about {total / 3600:.1f} hours on one {device} (one cell at a time)."]
    return "\n".join(lines) + "\n"
