"""NAD: Neural Attention Distillation (Li et al., ICLR 2021).

A teacher is the backdoored model fine-tuned briefly on the clean subset; the student
(the backdoored model again) is then fine-tuned with cross-entropy plus, for each
chosen stage, beta_i times the distance between the student's and the teacher's
attention maps on the same batch. The attention map of a feature map F (B, C, H, W)
is A = mean_c |F_c|^p flattened and L2-normalized per sample; the distance is the
mean over batch and positions of the squared difference of the normalized maps,
the scale BackdoorBench's betas (500, 1000, 1000) are defined for.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import List, Sequence

import torch
import torch.nn.functional as F

from ..settings.fields import FIELDS, preset_default
from ..util.hooks import capture, find_layer
from .loop import LoopConfig, Method, apply_update, finetune

_D = partial(preset_default, defense="nad")


@dataclass
class NADConfig(LoopConfig):
    """Loop settings plus NAD's (BackdoorBench defaults: te_epochs 10, betas 500/1000/1000, p 2).

    Attributes:
        te_epochs: epochs of plain fine-tuning that make the teacher (same optimizer settings).
        te_lr_scheduler: the teacher's schedule ('': the student's). BackdoorBench's teacher
            has a per-epoch cosine of T_max 100 while its student's rate is constant.
        betas: weight of the attention loss per stage in ``layers``.
        p: power of the attention map.
        layers: named modules whose outputs are distilled. BackdoorBench's (``nad.py``, the
            last three children of PreAct-ResNet18 cut off): layer3, layer4 and avgpool, whose
            1x1 map normalizes to 1 for teacher and student alike (a zero term, kept for fidelity).
    """

    lr: float = _D("lr")
    epochs: int = _D("epochs")
    lr_scheduler: str = _D("lr_scheduler")
    te_epochs: int = _D("te_epochs")
    te_lr_scheduler: str = _D("te_lr_scheduler")
    betas: Sequence[float] = tuple(_D("betas"))
    p: float = _D("p")
    layers: Sequence[str] = tuple(_D("nad_layers"))

    def problems(self) -> List[str]:
        found = super().problems()
        if self.te_epochs < 1:
            found.append(f"te_epochs={self.te_epochs} (must be >= 1)")
        if len(self.betas) != len(self.layers):
            found.append(f"betas {list(self.betas)} and layers {list(self.layers)} must have the same length")
        if self.p <= 0:
            found.append(f"p={self.p} (must be > 0)")
        if self.te_lr_scheduler not in FIELDS["te_lr_scheduler"].choices:
            found.append(f"te_lr_scheduler={self.te_lr_scheduler!r} (choose "
                         f"{', '.join(FIELDS['lr_scheduler'].choices)}, or '' for the student's)")
        return found

    def to_dict(self) -> dict:
        d = super().to_dict()
        d["betas"], d["layers"] = list(d["betas"]), list(d["layers"])
        return d


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): mean over channels of |F|^p, L2-normalized per sample."""
    return F.normalize(features.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    return (attention_map(student, p) - attention_map(teacher, p)).pow(2).mean()


class NADMethod(Method):
    name = "nad"

    def __init__(self, cfg: NADConfig):
        super().__init__(cfg)
        self.teacher = None
        self.teacher_history: List[dict] = []

    def start(self, model, train, normalize, hflip, device):
        for n in self.cfg.layers:
            find_layer(model, n)
        teacher = copy.deepcopy(model)
        teacher_cfg = LoopConfig(**{k: getattr(self.cfg, k) for k in LoopConfig.__dataclass_fields__})
        teacher_cfg.epochs = self.cfg.te_epochs
        teacher_cfg.lr_scheduler = self.cfg.te_lr_scheduler or self.cfg.lr_scheduler
        tuned = Method(teacher_cfg)
        tuned.name = "nad teacher"
        self.teacher_history = finetune(teacher, tuned, train, normalize, hflip=hflip, device=device).history
        self.teacher = teacher.eval()
        for q in self.teacher.parameters():
            q.requires_grad_(False)

    def hooks(self, model):
        return capture(model, self.cfg.layers)

    def step(self, model, x, y, store, opt, epoch):
        logits = model(x)
        student = {n: store[n] for n in self.cfg.layers}
        with torch.no_grad(), capture(self.teacher, self.cfg.layers) as t_store:
            self.teacher(x)
        ce = F.cross_entropy(logits, y)
        at = sum(b * attention_loss(student[n], t_store[n], self.cfg.p)
                 for n, b in zip(self.cfg.layers, self.cfg.betas))
        loss = ce + at
        if torch.isfinite(loss):
            apply_update(model, opt, loss, self.cfg.grad_clip)
        return {"loss": loss.detach(), "ce": ce.detach(), "attention": at.detach(), "logits": logits.detach()}

    def state_dict(self) -> dict:
        return {"teacher": {k: v.cpu() for k, v in self.teacher.state_dict().items()},
                "teacher_history": self.teacher_history}

    def load_state_dict(self, state: dict, model, device: str) -> None:
        self.teacher = copy.deepcopy(model).to(device).eval()
        self.teacher.load_state_dict(state["teacher"])
        for q in self.teacher.parameters():
            q.requires_grad_(False)
        self.teacher_history = list(state["teacher_history"])
