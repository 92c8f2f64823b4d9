"""Running a grid's cells: one after another (``serial``), on a local pool of workers, one
cell at a time per device (``local``), or as a SLURM job array through submitit
(``slurm``); the same table either way.

Cells are safe to run in parallel, from one launch or several at once:

- A record is made under a lock of its own (two workers needing it: one trains it, the
  other waits and reads it); so is each clean-subset index file.
- A cell runs under its lock. A finished cell (its ``cell.json`` matching its settings,
  written after its results) is read, never rerun, so a second launch of the same grid
  reuses the first's cells.
- The serial and local executors do not wait on a lock another process holds: they put
  that cell back at the end of their queue and take the next, coming back to it when
  nothing else is left (every ``LOCK_POLL_SECONDS``). Two launches of one grid therefore
  split its cells between them instead of advancing in lockstep, one cell behind the other.
  A SLURM task is one cell, so it waits.
- The locks are ``filelock`` locks (``flock`` on a local file system): the kernel releases
  them when their process dies, even by SIGKILL, so a lock never goes stale. A killed
  worker's cell has no ``cell.json``: the next launch redoes it (from the cell's last
  checkpointed epoch when there is one), and nothing else.
- A failed cell leaves ``failed.json`` (error and log) in its folder for ``status``.

The workers run :func:`execute`, a module-level function of picklable jobs, so the same
jobs go to a process pool or to submitit.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import multiprocessing
import os
import socket
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import filelock
import torch
import yaml

from ..attacks.record import AttackSettings, record_name
from ..errors import ConfigError
from ..util.atomic import atomic_write_text
from ..util.logs import setup_logging
from ..util.progress import progress, quiet
from ..util.threads import torch_threads
from .archive import import_cell, read_archive
from .cells import Cell, cell_done, ensure_record, run_cell, shared_index

log = logging.getLogger(__name__)

EXECUTORS = ("serial", "local", "slurm")


@dataclass(frozen=True)
class CellJob:
    """One cell of a grid with what it needs first: the record (made from ``attack`` when
    missing) and the shared clean-subset index (``index``: ratio and seed, written where
    ``cell.settings['index']`` points). ``meta`` goes into the cell's row."""

    cell: Cell
    attack: Optional[AttackSettings] = None
    index: Optional[tuple] = None
    data_root: Optional[str] = None
    recompute: bool = False
    meta: Dict[str, Any] = field(default_factory=dict)
    archive: Optional[str] = None  # a cell archive to take this cell from, when it holds it (archive.py)


def record_folder(record_root: Path, attack: AttackSettings) -> Path:
    return Path(record_root) / record_name(attack)


def _lock(path: Path) -> filelock.FileLock:
    path.parent.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(path))


def record_lock(record: Path) -> filelock.FileLock:
    """Held while the record (and its clean-subset index files) are made: ``<root>/.locks/``."""
    return _lock(Path(record).parent / ".locks" / f"{Path(record).name}.lock")


def cell_lock_path(cell: Cell) -> Path:
    return cell.folder.parent / ".locks" / f"{cell.name}.lock"


def cell_lock(cell: Cell) -> filelock.FileLock:
    """Held while the cell runs: ``<record>/defense/.locks/``."""
    return _lock(cell_lock_path(cell))


def job_row(job: CellJob, **fields) -> Dict[str, Any]:
    """What every row of a job says about it (its meta, defense label, cell and record), plus ``fields``."""
    return {**job.meta, "defense": job.cell.label or job.cell.defense, "cell": job.cell.name,
            "record": str(job.cell.record), **fields}


# How often a launch retries a cell whose lock another process holds, once it has nothing else to do.
LOCK_POLL_SECONDS = 2.0

# The status of a row whose cell (or record) another process holds: never a final row.
DEFERRED = "deferred"


class _Busy(Exception):
    """A lock another process holds, met by a job told not to wait."""


def _hold(lock: filelock.FileLock, wait: bool):
    """``lock`` acquired (a context manager): waiting for it, or raising _Busy when it is held."""
    try:
        return lock.acquire(timeout=-1 if wait else 0)
    except filelock.Timeout:
        raise _Busy(lock.lock_file) from None


def execute(job: CellJob, device: str = "cpu", threads: Optional[int] = None, wait: bool = True) -> Dict[str, Any]:
    """Make or read the record, draw or read the clean subset, run or read the cell; a
    failure anywhere is the row's status, never an exception (one cell must not stop a grid).
    ``threads``: torch's threads for this cell (restored after). ``wait=False``: a record or
    cell another process holds is not waited for; the row's status is then DEFERRED and
    nothing was done (the caller runs the job again later)."""
    with torch_threads(threads):
        try:
            return _execute(job, device, wait)
        except _Busy:
            return job_row(job, status=DEFERRED)


def _execute(job: CellJob, device: str, wait: bool = True) -> Dict[str, Any]:
    row = job_row(job)
    try:
        if job.attack is not None and not (Path(job.cell.record) / "attack_result.pt").is_file():
            started = time.time()
            with _hold(record_lock(job.cell.record), wait):
                made = not (Path(job.cell.record) / "attack_result.pt").is_file()
                ensure_record(job.attack, Path(job.cell.record).parent, job.data_root, device)
            if made:
                row["record_seconds"] = round(time.time() - started, 1)
        if job.index is not None:
            ratio, seed = job.index
            with _hold(record_lock(job.cell.record), wait):
                shared_index(job.cell.record, ratio, seed, job.data_root)
    except _Busy:
        raise
    except Exception as e:  # a missing data set or a broken attack fails its cells, not the grid
        log.error("%s: cannot make the record: %s", job.cell.record, e)
        return {**row, "status": "failed", "error": f"no record: {type(e).__name__}: {e}"}
    with _hold(cell_lock(job.cell), wait):
        if job.archive and not job.recompute:
            imported, why_not = import_cell(job.cell, read_archive_cached(job.archive))
            if imported:
                log.info("%s: imported from %s", job.cell.folder, job.archive)
            elif why_not:
                log.warning("%s: not imported from %s: %s; running it", job.cell.folder, job.archive, why_not)
        result = run_cell(job.cell, job.data_root, job.recompute, device)
    return {**result, **job.meta, "defense": job.cell.label or job.cell.defense}


@functools.lru_cache(maxsize=4)
def read_archive_cached(path: str) -> Dict[str, Dict[str, Any]]:
    """An archive read once per worker process, not once per cell."""
    return read_archive(Path(path))


# ---------------------------------------------------------------- executors


@dataclass
class ExecutorSpec:
    """How a grid runs. ``local``: ``workers`` processes, worker i on ``devices[i]`` (on CPU,
    several workers may share ``cpu``, each with its share of the threads). ``slurm``:
    submitit's AutoExecutor, one job array per grid, its logs in ``folder``; ``wait`` for the
    results, else the grid is assembled by running the command again."""

    kind: str = "serial"
    workers: int = 1
    devices: Sequence[str] = ("cpu",)
    folder: Optional[Path] = None
    slurm_partition: Optional[str] = None
    slurm_time: int = 240
    gpus_per_task: int = 0
    array_parallelism: int = 16
    slurm_extra: Dict[str, str] = field(default_factory=dict)
    cluster: Optional[str] = None  # submitit's cluster ("local", "debug", "slurm"; None: detected)
    wait: bool = False
    threads: Optional[int] = None  # torch threads per cell (None: the cores shared among the workers)

    def problems(self) -> List[str]:
        found = []
        if self.kind not in EXECUTORS:
            found.append(f"executor={self.kind!r} (choose {', '.join(EXECUTORS)})")
        if self.workers < 1:
            found.append(f"workers={self.workers} (must be >= 1)")
        if not self.devices:
            found.append("devices: name at least one (cpu, cuda:0, ...)")
        gpus = [d for d in self.devices if d != "cpu"]
        if self.kind == "local" and gpus and self.workers > len(self.devices):
            found.append(f"workers={self.workers} on devices {list(self.devices)}: one cell at a time per GPU, "
                         "so at most one worker per device")
        if self.slurm_time < 1:
            found.append(f"slurm_time={self.slurm_time} (minutes, >= 1)")
        if self.threads is not None and self.threads < 1:
            found.append(f"threads={self.threads} (must be >= 1)")
        if self.gpus_per_task < 0 or self.array_parallelism < 1:
            found.append(f"gpus_per_task={self.gpus_per_task}, array_parallelism={self.array_parallelism} "
                         "(>= 0 and >= 1)")
        return found


def add_executor_arguments(parser) -> None:
    """The options every grid command shares to choose where its cells run."""
    g = parser.add_argument_group("where the cells run")
    g.add_argument("--executor", default="serial", choices=EXECUTORS,
                   help="serial (default), local (a pool of workers), or slurm (a job array through submitit)")
    g.add_argument("--workers", type=int, help="local: worker processes (default: one per device)")
    g.add_argument("--devices", help="local: comma-separated devices, one cell at a time on each (default: --device)")
    g.add_argument("--slurm-config", metavar="YAML",
                   help="slurm: the parameters below from a YAML file's 'slurm' section (partition, time, "
                        "gpus_per_task, array_parallelism, cluster, extra: {KEY: VALUE}); flags win")
    g.add_argument("--slurm-partition", help="slurm: the partition")
    g.add_argument("--slurm-time", type=int,
                   help=f"slurm: minutes per cell before the job is killed (default {SLURM_DEFAULTS['time']})")
    g.add_argument("--gpus-per-task", type=int,
                   help=f"slurm: GPUs per cell (default {SLURM_DEFAULTS['gpus_per_task']})")
    g.add_argument("--slurm-array-parallelism", type=int,
                   help=f"slurm: cells running at once (default {SLURM_DEFAULTS['array_parallelism']})")
    g.add_argument("--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
                   help="slurm: any other sbatch parameter (repeatable), e.g. account=abc or qos=high")
    g.add_argument("--slurm-cluster", help="submitit's cluster: slurm (default when sbatch is found) or local")
    g.add_argument("--wait", action="store_true", help="slurm: wait for every cell and write the table")
    g.add_argument("--threads", type=int,
                   help="torch threads per cell (default: the cores shared among the workers); the thread count "
                        "changes float rounding, so equal threads give equal numbers across executors")


# The SLURM parameters a user does not give (flags or --slurm-config's 'slurm' section).
SLURM_DEFAULTS: Dict[str, Any] = {"partition": None, "time": 240, "gpus_per_task": 0, "array_parallelism": 16,
                                  "cluster": None}


def slurm_settings(path: Optional[str]) -> Dict[str, Any]:
    """The ``slurm`` section of a YAML file (its keys: SLURM_DEFAULTS' and ``extra``), checked."""
    if not path:
        return {}
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--slurm-config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--slurm-config {path}: not valid YAML ({e})") from None
    section = data.get("slurm") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ConfigError(f"--slurm-config {path}: needs a mapping under 'slurm:' (e.g. slurm: {{partition: gpu}})")
    unknown = sorted(set(section) - set(SLURM_DEFAULTS) - {"extra"})
    if unknown:
        raise ConfigError(f"--slurm-config {path}: unknown keys {unknown}; valid: "
                          f"{', '.join(sorted(set(SLURM_DEFAULTS) | {'extra'}))}")
    if "extra" in section and not isinstance(section["extra"] or {}, dict):
        raise ConfigError(f"--slurm-config {path}: 'extra' must be a mapping of sbatch parameters (account: abc)")
    for key in ("time", "gpus_per_task", "array_parallelism"):
        if key in section and not isinstance(section[key], int):
            raise ConfigError(f"--slurm-config {path}: {key} must be an integer, got {section[key]!r}")
    return dict(section)


def executor_spec(args, folder: Path) -> ExecutorSpec:
    """The executor the command line asks for, checked before anything is written."""
    slurm = slurm_settings(getattr(args, "slurm_config", None))
    extra = {str(k): str(v) for k, v in (slurm.pop("extra", None) or {}).items()}
    for item in args.slurm_extra or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-extra {item!r}: write KEY=VALUE (e.g. account=abc)")
        extra[key] = value
    flags = {"partition": args.slurm_partition, "time": args.slurm_time, "gpus_per_task": args.gpus_per_task,
             "array_parallelism": args.slurm_array_parallelism, "cluster": args.slurm_cluster}
    chosen = {k: v if v is not None else slurm.get(k, SLURM_DEFAULTS.get(k)) for k, v in flags.items()}
    devices = [d for d in (args.devices or getattr(args, "device", "cpu") or "cpu").split(",") if d]
    gpus = [d for d in devices if d != "cpu"]
    workers = args.workers if args.workers is not None else (len(devices) if gpus else 1)
    spec = ExecutorSpec(args.executor, workers, devices, folder / "slurm_logs", chosen["partition"],
                        chosen["time"], chosen["gpus_per_task"], chosen["array_parallelism"], extra,
                        chosen["cluster"], args.wait, args.threads)
    bad = spec.problems()
    if bad:
        raise ConfigError("invalid executor settings: " + "; ".join(bad))
    if spec.kind == "slurm":
        submitit()  # the missing extra is named before any work
    return spec


def submitit():
    try:
        import submitit as module
    except ImportError:
        raise ConfigError("--executor slurm needs submitit, an optional extra: pip install 'pgbd-defense[cluster]' "
                          "(or pip install submitit)") from None
    return module


def run(jobs: Sequence[CellJob], spec: ExecutorSpec, desc: str = "cells") -> Optional[List[Dict[str, Any]]]:
    """Every job's row, in the jobs' order; None when the jobs were submitted and not waited for."""
    if spec.kind == "serial":
        return _serial(jobs, spec.devices[0], desc, spec.threads)
    if spec.kind == "local":
        return _local(jobs, spec, desc)
    return _slurm(jobs, spec, desc)


def _serial(jobs, device, desc, threads=None):
    """The jobs in order; one whose record or cell another process holds goes to the back of
    the queue, and a round of the queue in which every job was held waits LOCK_POLL_SECONDS."""
    rows: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    queue = collections.deque(range(len(jobs)))
    held_in_a_row = 0
    bar = progress(None, total=len(jobs), desc=desc, leave=True)
    with quiet():
        while queue:
            i = queue.popleft()
            job = jobs[i]
            _describe(bar, f"{job.cell.label or job.cell.defense} on {Path(job.cell.record).name}")
            row = execute(job, device, threads, wait=False)
            if row["status"] == DEFERRED:
                queue.append(i)
                held_in_a_row += 1
                if held_in_a_row >= len(queue):
                    time.sleep(LOCK_POLL_SECONDS)
                    held_in_a_row = 0
                continue
            held_in_a_row = 0
            rows[i] = row
            bar.update(1)
    bar.close()
    return rows


_WORKER: Dict[str, Any] = {}


def _init_worker(devices, threads: int) -> None:
    """Each worker takes one device for its life (a cell at a time on it)."""
    _WORKER["device"] = devices.get()
    torch.set_num_threads(threads)
    os.environ["PGBD_NO_PROGRESS"] = "1"
    setup_logging(False)


def _execute_in_worker(job: CellJob, retry: bool = False) -> Dict[str, Any]:
    """``retry``: the job was held by another process before; wait a little first (a retry is
    queued behind every fresh job, so the pause holds up only other retries)."""
    if retry:
        time.sleep(LOCK_POLL_SECONDS)
    with quiet():
        return execute(job, _WORKER["device"], wait=False)


def _local(jobs, spec: ExecutorSpec, desc, rounds: int = 2):
    """A pool of ``spec.workers`` processes. A worker that dies (SIGKILL, out of memory) breaks
    the pool: the cells it and the queue did not finish go to a fresh pool once more (a killed
    cell continues from its checkpoint); still unfinished, they are failed rows."""
    ctx = multiprocessing.get_context("spawn")
    on_cpu = sum(1 for i in range(spec.workers) if spec.devices[i % len(spec.devices)] == "cpu")
    threads = spec.threads or max(1, (os.cpu_count() or 1) // max(on_cpu, 1))
    rows: List[Optional[Dict[str, Any]]] = [None] * len(jobs)
    bar = progress(None, total=len(jobs), desc=desc, leave=True)
    todo = list(range(len(jobs)))
    for attempt in range(rounds):
        lost = _pool(ctx, [jobs[i] for i in todo], spec, threads, bar, rows, todo)
        todo = [i for i in lost if not cell_done(jobs[i].cell)]
        if not todo:
            break
        log.warning("a worker died; %d unfinished cells go to a fresh pool", len(todo))
    for i in todo:
        job = jobs[i]
        rows[i] = job_row(job, status="failed", error="worker lost twice (killed, or out of memory): rerun to "
                                                      "continue from its checkpoint")
    for i in range(len(jobs)):  # the cells a lost worker had finished are read back
        if rows[i] is None:
            rows[i] = _execute(jobs[i], spec.devices[0])
    bar.close()
    return rows


def _pool(ctx, jobs, spec, threads, bar, rows, positions) -> List[int]:
    """Run ``jobs`` (at ``positions`` of ``rows``) on a fresh pool; returns the positions lost."""
    manager = ctx.Manager()
    devices = manager.Queue()
    for i in range(spec.workers):
        devices.put(spec.devices[i % len(spec.devices)])
    lost: List[int] = []
    with ProcessPoolExecutor(spec.workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(devices, threads)) as pool:
        job_at = dict(zip(positions, jobs))
        pending = {pool.submit(_execute_in_worker, job): pos for job, pos in zip(jobs, positions)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                pos = pending.pop(future)
                try:
                    row = future.result()
                except BrokenProcessPool:
                    lost.append(pos)
                    continue
                if row["status"] == DEFERRED:  # another process holds it: to the back of the queue
                    try:
                        pending[pool.submit(_execute_in_worker, job_at[pos], True)] = pos
                    except BrokenProcessPool:
                        lost.append(pos)
                    continue
                rows[pos] = row
                bar.update(1)
            running = min(spec.workers, len(pending))
            failed = sum(1 for r in rows if r is not None and r["status"] == "failed")
            _postfix(bar, done=sum(r is not None for r in rows), running=running, failed=failed,
                     queued=len(pending) - running)
    manager.shutdown()
    return lost


def _slurm(jobs, spec: ExecutorSpec, desc):
    module = submitit()
    executor = module.AutoExecutor(folder=str(spec.folder), cluster=spec.cluster)
    # submitit's local default timeout is 2 minutes: always set it.
    params: Dict[str, Any] = {"timeout_min": spec.slurm_time, "name": "pgbd-" + desc.split()[0],
                              "slurm_array_parallelism": spec.array_parallelism}
    if spec.gpus_per_task:
        params["gpus_per_node"] = spec.gpus_per_task
    if spec.slurm_partition:
        params["slurm_partition"] = spec.slurm_partition
    if spec.slurm_extra:
        params["slurm_additional_parameters"] = dict(spec.slurm_extra)
    executor.update_parameters(**params)
    device = "cuda" if spec.gpus_per_task else spec.devices[0]
    submitted = executor.map_array(execute, list(jobs), [device] * len(jobs), [spec.threads] * len(jobs))
    atomic_write_text(spec.folder / "jobs.json", json.dumps({
        "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname(),
        "jobs": [{"job": j.job_id, "cell": job.cell.name, "record": str(job.cell.record)}
                 for j, job in zip(submitted, jobs)]}, indent=1) + "\n")
    log.info("submitted %d cells as job array %s (logs in %s)", len(jobs),
             submitted[0].job_id.split("_")[0] if submitted else "-", spec.folder)
    if not spec.wait:
        return None
    rows = []
    bar = progress(None, total=len(jobs), desc=desc, leave=True)
    for j, job in zip(submitted, jobs):
        try:
            rows.append(j.result())
        except Exception as e:  # the job itself failed (timeout, node failure): its log says why
            rows.append(job_row(job, status="failed", error=f"job {j.job_id}: {type(e).__name__}: {str(e)[:300]}",
                                log=str(j.paths.stderr)))
        bar.update(1)
    bar.close()
    return rows


# ---------------------------------------------------------------- status


def cell_state(job: CellJob) -> str:
    """done, running (its lock is held), failed (it left failed.json) or queued."""
    if cell_done(job.cell):
        return "done"
    if not cell_lock_path(job.cell).is_file():  # never started (asking writes nothing)
        return "queued"
    lock = cell_lock(job.cell)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return "running"
    else:
        lock.release()
    return "failed" if (job.cell.folder / "failed.json").is_file() else "queued"


def status_rows(jobs: Sequence[CellJob]) -> List[Dict[str, Any]]:
    """A row per job as the table needs it: a finished cell's numbers, else its state."""
    rows = []
    for job in jobs:
        state = cell_state(job)
        row = job_row(job, status=state)
        if state == "done":
            row.update(json.loads((job.cell.folder / "summary.json").read_text()))
            row["status"] = "cached"
            row.update(job.meta)
            row["defense"] = job.cell.label or job.cell.defense
        elif state == "failed":
            failed = json.loads((job.cell.folder / "failed.json").read_text())
            row.update({"error": failed.get("error", ""), "log": failed.get("log", "")})
        rows.append(row)
    return rows


def state_counts(rows: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    counts = {"done": 0, "running": 0, "failed": 0, "queued": 0}
    for r in rows:
        key = {"ok": "done", "cached": "done"}.get(r["status"], r["status"])
        counts[key] = counts.get(key, 0) + 1
    return counts


def _describe(bar, text: str) -> None:
    if hasattr(bar, "set_description_str"):
        bar.set_description_str(text)


def _postfix(bar, **counts) -> None:
    if hasattr(bar, "set_postfix"):
        bar.set_postfix(counts, refresh=True)

