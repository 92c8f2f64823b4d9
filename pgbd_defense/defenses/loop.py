"""The fine-tuning loop every defense here shares, and defender-realistic model selection.

A defense is a :class:`Method`: what it prepares before the first epoch (prototypes,
a teacher), what it changes at the start of an epoch, and how it updates the model on
one batch. The loop owns everything else, identically for PGBD and the baselines:
optimizer and schedule, data order, BatchNorm mode, per-epoch statistics, the
checkpoint that makes a killed run resumable, and the choice of which epoch's model
to return.

Selection uses clean data only. The defender holds D_S and nothing else, so a share
of D_S is held out (``split_validation``); its accuracy is measured after every
epoch, training stops when it stays more than ``collapse_margin`` below the
accuracy the model had before fine-tuning for ``collapse_patience`` epochs (collapse
guard), and the epoch with the
best held-out accuracy is returned. Poisoned data never reaches this module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, ContextManager, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..datasets.batches import EVAL_BATCH_SIZE, Normalizer, iterate
from ..errors import ConfigError, UserError
from ..formats.safe_pickle import safe_torch_load
from ..settings.fields import FIELDS, preset_default
from ..util.atomic import atomic_torch_save
from ..util.hooks import eval_mode, mixed_precision
from ..util.progress import progress

log = logging.getLogger(__name__)

LR_SCHEDULERS = FIELDS["lr_scheduler"].choices
SCHEDULER_INTERVALS = FIELDS["scheduler_interval"].choices
OPTIMIZERS = FIELDS["optimizer"].choices
SELECTIONS = FIELDS["select"].choices
# The loop's defaults are BackdoorBench's plain fine-tuning (the paper preset's FT); each
# defense's config re-declares what it changes (settings/presets.py).
_D = partial(preset_default, defense="ft")


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or infinite; the message names the epoch and batch."""


class ResumeMismatchError(UserError, ValueError):
    """A checkpoint made with other settings or another clean subset than this run's."""


@dataclass
class LoopConfig:
    """Settings of the shared loop (every defense's config extends this). The defaults are
    BackdoorBench's plain fine-tuning (``settings.preset_default(name, "paper", "ft")``).

    Attributes:
        lr, momentum, weight_decay, epochs, batch_size: the optimizer and budget.
        optimizer: ``sgd`` (with momentum) or ``adam`` (I-BAU's choice).
        freeze_bn: keep the model in eval mode while fine-tuning (BatchNorm statistics frozen).
        augment: BackdoorBench's train augmentation (random crop, flip where the data allows).
        grad_clip: clip the global gradient norm to this value (0: off).
        lr_scheduler: ``constant``, ``cosine`` (torch's CosineAnnealingLR) or ``multistep``
            (the rate times ``steplr_gamma`` at each of ``steplr_milestones``).
        scheduler_interval: the schedule steps after every ``batch`` or every ``epoch``.
        cos_t_max: the cosine's T_max in scheduler steps; 0: the whole run, annealed to 0 at
            its end. BackdoorBench's ``argparser_opt_scheduler`` uses 100 whatever the run's
            length (a period of 200 steps: it rises again past 100).
        steplr_milestones, steplr_gamma: ``multistep``'s steps (in scheduler steps) and factor.
        amsgrad: Adam's AMSGrad variant (what BackdoorBench's ``adam`` builds).
        adam_betas: Adam's betas.
        amp: bfloat16 autocast during the updates (``util.hooks.mixed_precision``).
        seed: data order and augmentation.
    """

    lr: float = _D("lr")
    momentum: float = _D("sgd_momentum")
    weight_decay: float = _D("wd")
    epochs: int = _D("epochs")
    batch_size: int = _D("batch_size")
    optimizer: str = _D("optimizer")
    freeze_bn: bool = _D("freeze_bn")
    augment: bool = _D("augment")
    grad_clip: float = _D("grad_clip")
    lr_scheduler: str = _D("lr_scheduler")
    scheduler_interval: str = _D("scheduler_interval")
    cos_t_max: int = _D("cos_t_max")
    steplr_milestones: Tuple[int, ...] = tuple(_D("steplr_milestones"))
    steplr_gamma: float = _D("steplr_gamma")
    amsgrad: bool = _D("amsgrad")
    adam_betas: Tuple[float, float] = tuple(_D("adam_betas"))
    amp: bool = _D("amp")
    seed: int = _D("random_seed")

    def problems(self) -> List[str]:
        found = []
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                found.append(f"{name}={getattr(self, name)} (must be >= 1)")
        if self.lr <= 0:
            found.append(f"lr={self.lr} (must be > 0)")
        if self.grad_clip < 0:
            found.append(f"grad_clip={self.grad_clip} (must be >= 0)")
        if self.lr_scheduler not in LR_SCHEDULERS:
            found.append(f"lr_scheduler={self.lr_scheduler!r} (choose {', '.join(LR_SCHEDULERS)})")
        if self.optimizer not in OPTIMIZERS:
            found.append(f"optimizer={self.optimizer!r} (choose {', '.join(OPTIMIZERS)})")
        if self.scheduler_interval not in SCHEDULER_INTERVALS:
            found.append(f"scheduler_interval={self.scheduler_interval!r} (choose {', '.join(SCHEDULER_INTERVALS)})")
        if self.cos_t_max < 0:
            found.append(f"cos_t_max={self.cos_t_max} (must be >= 0; 0: the whole run)")
        if list(self.steplr_milestones) != sorted(set(self.steplr_milestones)) or \
                any(m < 1 for m in self.steplr_milestones):
            found.append(f"steplr_milestones={list(self.steplr_milestones)} (increasing steps >= 1)")
        if self.lr_scheduler == "multistep" and not self.steplr_milestones:
            found.append("lr_scheduler='multistep' needs steplr_milestones")
        if not 0 < self.steplr_gamma <= 1:
            found.append(f"steplr_gamma={self.steplr_gamma} (must lie in (0, 1])")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            found.append(f"adam_betas={list(self.adam_betas)} (two values in [0, 1))")
        return found

    def __post_init__(self):
        self.steplr_milestones = tuple(int(m) for m in self.steplr_milestones)
        self.adam_betas = tuple(float(b) for b in self.adam_betas)
        found = self.problems()
        if found:
            raise ConfigError(f"invalid {type(self).__name__} settings: " + "; ".join(found))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["steplr_milestones"] = list(d["steplr_milestones"])
        d["adam_betas"] = list(d["adam_betas"])
        return d


@dataclass
class Selection:
    """Which epoch's model a run returns, judged on held-out clean data only.

    Attributes:
        val_share: share of D_S held out for validation (0: no validation, keep the last epoch).
        select: ``best`` (highest held-out accuracy over the epochs) or ``last``.
        collapse_margin: stop when held-out accuracy stays more than this (absolute, 0-1)
            below the model's accuracy before fine-tuning (0: guard off) ...
        collapse_patience: ... for this many consecutive epochs. Fine-tuning at a useful
            learning rate often loses 20-30 points in its first epoch and recovers as the
            schedule decays (measured: 88 -> 63 -> 78 -> 84 -> 87 on Blended at lr 0.03), so
            one bad epoch is not a collapse.
    """

    val_share: float = preset_default("val_share")
    select: str = preset_default("select")
    collapse_margin: float = preset_default("collapse_margin")
    collapse_patience: int = preset_default("collapse_patience")

    def __post_init__(self):
        found = []
        if not 0 <= self.val_share < 1:
            found.append(f"val_share={self.val_share} (must lie in [0, 1))")
        if self.select not in SELECTIONS:
            found.append(f"select={self.select!r} (choose {', '.join(SELECTIONS)})")
        if not 0 <= self.collapse_margin <= 1:
            found.append(f"collapse_margin={self.collapse_margin} (must lie in [0, 1])")
        if self.collapse_patience < 1:
            found.append(f"collapse_patience={self.collapse_patience} (must be >= 1)")
        if found:
            raise ConfigError("invalid selection settings: " + "; ".join(found))


def split_positions(labels: torch.Tensor, share: float, seed: int):
    """(kept, held) positions: ``share`` of each class held out (at least one sample of a
    class with two or more), so validation accuracy covers every class."""
    all_pos = torch.arange(len(labels))
    if share <= 0:
        return all_pos, None
    gen = torch.Generator().manual_seed(seed + 7919)
    held = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[: max(1, int(round(share * len(idx))))])
    if not held:
        return all_pos, None
    held_idx = torch.cat(held).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_idx] = False
    return all_pos[keep], held_idx


def split_validation(clean: ImageSet, share: float, seed: int):
    """(train, validation) ImageSets of :func:`split_positions` (validation None when nothing is held out)."""
    kept, held = split_positions(clean.labels, share, seed)
    if held is None:
        return clean, None
    return (ImageSet(clean.images[kept], clean.labels[kept]), ImageSet(clean.images[held], clean.labels[held]))


@torch.inference_mode()
def clean_accuracy(model: torch.nn.Module, data: ImageSet, normalize: Normalizer, device: str = "cpu",
                   batch_size: int = EVAL_BATCH_SIZE) -> float:
    correct = 0
    with eval_mode(model):
        for x, y, _ in iterate(data.images, data.labels, batch_size, normalize, device=device):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / max(len(data), 1)


class Method:
    """One defense's part of the loop. The base class is plain fine-tuning (FT)."""

    name = "ft"
    # Set by the loop before the first epoch (and on resume): the held-out clean data (None
    # when nothing is held out), for a method's diagnostics only; whether flips augment; the
    # normalization of the batches ``step`` gets.
    heldout: Optional[ImageSet] = None
    hflip: bool = False
    normalizer: Optional[Normalizer] = None

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg

    def start(self, model, train: ImageSet, normalize: Normalizer, hflip: bool, device: str) -> None:
        """Work before the first epoch (not repeated on resume: its result is in ``state_dict``)."""

    def begin_epoch(self, epoch: int, model, train: ImageSet, normalize: Normalizer,
                    device: str) -> Optional[Dict[str, float]]:
        """Per-epoch changes (re-estimated prototypes, NT-PGBD's target cycling, I-BAU's
        perturbation); statistics returned go into the epoch's row."""

    def hooks(self, model) -> ContextManager:
        """Forward hooks active during an epoch's updates; their store is passed to ``step``."""
        return contextlib.nullcontext({})

    def step(self, model, x: torch.Tensor, y: torch.Tensor, store: dict, opt, epoch: int) -> Dict[str, float]:
        """Update the model on one batch; return statistics (``loss`` and ``logits`` at least)."""
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        apply_update(model, opt, loss, self.cfg.grad_clip)
        return {"loss": loss.detach(), "ce": loss.detach(), "logits": logits.detach()}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict, model, device: str) -> None:
        """Restore what ``state_dict`` saved; ``model`` is the model being fine-tuned."""

    def restore_data(self, train: ImageSet) -> None:
        """After a resume: rebuild data derived in ``start`` from what ``load_state_dict`` restored."""

    def write_artifacts(self, out) -> dict:
        """Write what the defense made besides the model (figures, tensors) into ``out``;
        return the facts about it that belong in summary.json."""
        return {}


@contextlib.contextmanager
def bn_stats_frozen(model: torch.nn.Module):
    """Extra forward passes (SAM's second pass, I-BAU's inner steps) use batch statistics
    in train mode but must not move BatchNorm's running statistics."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom


def apply_update(model, opt, loss: torch.Tensor, grad_clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()


def make_optimizer(model, cfg: LoopConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                amsgrad=cfg.amsgrad)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scheduler(opt, cfg: LoopConfig, n_batches: int):
    """The learning-rate schedule, or None for a constant rate; it steps per ``cfg.scheduler_interval``."""
    if cfg.lr_scheduler == "cosine":
        whole_run = cfg.epochs * (n_batches if cfg.scheduler_interval == "batch" else 1)
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.cos_t_max or whole_run)
    if cfg.lr_scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.steplr_milestones),
                                                    gamma=cfg.steplr_gamma)
    return None


class PhaseClock:
    """Wall-clock seconds per named phase of a run, summed over its visits.

    >>> clock = PhaseClock()
    >>> with clock("training"):
    ...     pass
    >>> list(clock.seconds)
    ['training']
    """

    def __init__(self):
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    ``seconds`` per phase of this process's part of the run (a resumed run counts from the
    resume): ``prepare`` (the method's work before the first epoch: PGBD's prototypes,
    NAD's teacher, ST-PGBD's trigger search), ``epoch_updates`` (re-estimated prototypes,
    NT-PGBD's cycling), ``training`` (the updates), ``selection`` (held-out clean accuracy),
    ``diagnostics`` (the ``on_epoch_end`` callback: per-epoch test evaluation when asked
    for), ``checkpoint`` (saving the resumable state)."""

    history: List[Dict[str, float]]
    selected_epoch: int  # 0-based; -1: the model before fine-tuning
    collapsed: bool = False
    val_acc_before: Optional[float] = None
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)


EpochCallback = Callable[[int, Dict[str, float]], Optional[Dict[str, float]]]


def finetune(model: torch.nn.Module, method: Method, train: ImageSet, normalize: Normalizer, *,
             val: Optional[ImageSet] = None, selection: Selection = Selection(val_share=0.0), hflip: bool = False,
             device: str = "cpu", on_epoch_end: Optional[EpochCallback] = None,
             checkpoint: Optional[Path] = None, resume: bool = False, fingerprint: Optional[list] = None,
             ) -> FinetuneResult:
    """Fine-tune ``model`` in place with ``method``; leaves the selected epoch's weights in it.

    ``on_epoch_end(epoch, stats)`` runs after each epoch (test evaluation, logging: it
    cannot influence selection); a dict it returns is merged into that epoch's row.
    With ``checkpoint`` the whole loop state is saved atomically after every epoch and
    ``resume=True`` continues from it to the same numbers as an uninterrupted run."""
    cfg = method.cfg
    clock = PhaseClock()
    model.to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg)
    n_batches = math.ceil(len(train) / cfg.batch_size)
    sched = make_scheduler(opt, cfg, n_batches)
    identity = {"method": method.name, "config": cfg.to_dict(), "selection": asdict(selection),
                "fingerprint": (fingerprint or []) + _fingerprint(train) + (_fingerprint(val) if val else [])}
    history: List[Dict[str, float]] = []
    first_epoch, best_acc, best_epoch, best_state, collapsed, epochs_below = 0, -1.0, -1, None, False, 0
    with clock("selection"):
        val_before = clean_accuracy(model, val, normalize, device) if val is not None else None
    initial_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if val is not None else None
    method.heldout, method.hflip, method.normalizer = val, hflip, normalize
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        saved = safe_torch_load(checkpoint)
        if saved.get("identity") != identity:
            raise ResumeMismatchError(
                f"{checkpoint} was made with other settings or another clean subset; rerun without --resume "
                "to start over (it will be replaced), or with the settings it was made with")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        if sched is not None:
            sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        method.load_state_dict(saved["method"], model, device)
        method.restore_data(train)
        history = list(saved["history"])
        best_acc, best_epoch, best_state = saved["best_acc"], saved["best_epoch"], saved["best_state"]
        val_before, initial_state = saved["val_before"], saved["initial_state"]
        epochs_below = saved["epochs_below"]
        first_epoch = int(saved["epoch"]) + 1
        log.info("resuming from %s after epoch %d", checkpoint, first_epoch)
    else:
        with clock("prepare"):
            method.start(model, train, normalize, hflip, device)
    for epoch in range(first_epoch, cfg.epochs):
        with clock("epoch_updates"):
            begun = method.begin_epoch(epoch, model, train, normalize, device)
        with clock("training"):
            stats = _train_epoch(model, method, train, normalize, opt, sched, gen, epoch, hflip, device)
            if sched is not None and cfg.scheduler_interval == "epoch":
                sched.step()
        stats.update(begun or {})
        if val is not None:
            with clock("selection"):
                stats["val_acc"] = clean_accuracy(model, val, normalize, device)
                if stats["val_acc"] > best_acc:
                    best_acc, best_epoch = stats["val_acc"], epoch
                    best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            below = selection.collapse_margin and stats["val_acc"] < val_before - selection.collapse_margin
            epochs_below = epochs_below + 1 if below else 0
            collapsed = epochs_below >= selection.collapse_patience
        with clock("diagnostics"):
            extra = on_epoch_end(epoch, stats) if on_epoch_end is not None else None
        history.append({**stats, **(extra or {})})
        if checkpoint is not None:
            with clock("checkpoint"):
                atomic_torch_save({
                    "epoch": epoch, "identity": identity,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None,
                    "generator": gen.get_state(), "method": method.state_dict(), "history": history,
                    "best_acc": best_acc, "best_epoch": best_epoch, "best_state": best_state,
                    "val_before": val_before, "initial_state": initial_state, "epochs_below": epochs_below,
                }, checkpoint)
        if collapsed:
            log.warning("collapse guard: held-out clean accuracy %.4f at epoch %d, more than %.2f below its "
                        "%.4f before fine-tuning for %d epochs; stopping", stats["val_acc"], epoch + 1,
                        selection.collapse_margin, val_before, selection.collapse_patience)
            break
    result = FinetuneResult(history, selected_epoch=len(history) - 1, collapsed=collapsed, val_acc_before=val_before,
                            seconds=clock.seconds)
    if val is not None:
        above_guard = best_state is not None and best_acc >= val_before - selection.collapse_margin
        if collapsed and not above_guard:
            # No epoch stayed above the guard: nothing fine-tuned is usable, so the model is
            # returned as it came (still backdoored) and the run says so.
            model.load_state_dict(initial_state)
            result.selected_epoch = -1
            result.notes.append("every epoch fell below the collapse guard: the model is returned unchanged; "
                                "lower the learning rate")
        elif best_state is not None and (selection.select == "best" or collapsed):
            model.load_state_dict(best_state)
            result.selected_epoch = best_epoch
    model.eval()
    return result


def _train_epoch(model, method: Method, train, normalize, opt, sched, gen, epoch, hflip, device):
    cfg = method.cfg
    model.train(not cfg.freeze_bn)
    sums: Dict[str, float] = {}
    correct = seen = 0
    n_batches = math.ceil(len(train) / cfg.batch_size)
    batches = iterate(train.images, train.labels, cfg.batch_size, normalize, shuffle=True,
                      augment=cfg.augment, hflip=hflip, generator=gen, device=device)
    with method.hooks(model) as store:
        for b, (x, y, _) in enumerate(progress(batches, total=n_batches, desc=f"{method.name} epoch "
                                                                             f"{epoch + 1}/{cfg.epochs}")):
            with mixed_precision(cfg.amp, device):
                out = method.step(model, x, y, store, opt, epoch)
            loss = out.pop("loss")
            if not torch.isfinite(loss):
                detail = ", ".join(f"{k} {float(v):.4g}" for k, v in out.items() if k != "logits")
                raise NonFiniteLossError(f"{method.name}: loss is {loss.item()} at epoch {epoch + 1}, batch {b + 1} "
                                         f"({detail}); lower the learning rate")
            if sched is not None and cfg.scheduler_interval == "batch":
                sched.step()
            logits = out.pop("logits")
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            sums["loss"] = sums.get("loss", 0.0) + loss.item()
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    model.eval()
    row = {"train_epoch_loss_avg_over_batch": sums.pop("loss") / n_batches}
    row.update({f"train_{k}_avg_over_batch": v / n_batches for k, v in sums.items()})
    row["train_acc"] = correct / max(seen, 1)
    return row


def _fingerprint(data: ImageSet) -> List[int]:
    """Cheap identity of a data subset, to refuse resuming another run's checkpoint."""
    return [len(data), int(data.labels.sum()), int(data.images[:, :, ::7, ::7].sum())]
