"""MCL: Model-Contrastive Learning for backdoor elimination (Yue et al., ACM MM 2023).

Stage 1 inverts a trigger for the known target class. The current release
(Zhihao151/MCL, ``inversion_torch.py``) uses a PixelBackdoor-style search (Tao et
al.); its first version (WeCanShow/MCL 7129d00, ``main.py``) used a Neural Cleanse
mask and pattern, x' = (1 - m) x + m p, which is what ``inversion.invert_trigger``
implements, so that is what this stage runs (docs/baselines.md lists what differs).

Stage 2 fine-tunes the model on the clean subset with every image stamped and no label
loss: with z the penultimate features (the input of the last linear layer) of the model
being trained on the stamped input, and z+ / z- the frozen backdoored copy's features of
the clean / stamped input,

    L = mean softplus((cos(z, z-) - cos(z, z+)) / tau),   tau = 0.5,

the release's cross-entropy over the two cosine similarities with the positive first.
It pulls the stamped input's features towards those of its clean version and away from
the backdoored ones. The loss never reaches the linear head (its gradient stays unset, so
neither the step nor weight decay moves it): only the feature extractor changes, BatchNorm
in train mode, as in the release. Its schedule (20 epochs, batch 64, lr 0.1 / 0.01 / 0.001
from epochs 0 / 1 / 10) is the ``bench`` preset's (settings/presets.py: BENCH_DEFENSES).

**Rectified features (ours, ``rectify``, on by default).** The release's models (WRN,
ResNet-18) feed their head post-ReLU, non-negative features, so cos(z, z-) >= 0 and the
loss's minimum lies near z = z+. PreAct-ResNet18's head input (BackdoorBench's and ours) is
signed: the loss then also falls by turning every z towards z+ - z-, one direction for all
inputs, which sends every image to one class. Measured on the ci BadNets record (release
schedule): clean accuracy 54% after one epoch with BatchNorm in train mode, 10% (chance) with
it frozen, ASR 0 in both; on relu(features) the release's geometry is restored (72%, ASR 0;
the ``cpu`` preset: 75%). ``rectify: false`` gives the release's loss on the raw features.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from functools import partial
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..datasets import ImageSet
from ..method.inversion import InversionConfig, Trigger, invert_trigger, save_trigger_png, stamp_normalized
from ..method.pav_sources import single_target
from ..settings.fields import preset_default
from ..util.hooks import capture, last_linear
from .loop import LoopConfig, Method, apply_update

log = logging.getLogger(__name__)

_D = partial(preset_default, defense="mcl")


@dataclass
class MCLConfig(LoopConfig):
    """Loop settings plus MCL's: ``temperature`` tau (0.5), the trigger search's budget, and
    ``rectify`` (the loss on relu(features); see the module docstring)."""

    lr: float = _D("lr")
    weight_decay: float = _D("wd")
    epochs: int = _D("epochs")
    batch_size: int = _D("batch_size")
    augment: bool = _D("augment")
    lr_scheduler: str = _D("lr_scheduler")
    steplr_milestones: Tuple[int, ...] = tuple(_D("steplr_milestones"))
    cos_t_max: int = _D("cos_t_max")
    temperature: float = _D("temperature")
    inversion_steps: int = _D("mcl_inversion_steps")
    inversion_batch_size: int = _D("mcl_inversion_batch_size")
    rectify: bool = _D("mcl_rectify")

    def problems(self) -> List[str]:
        found = super().problems()
        if self.temperature <= 0:
            found.append(f"temperature={self.temperature} (must be > 0)")
        for name in ("inversion_steps", "inversion_batch_size"):
            if getattr(self, name) < 1:
                found.append(f"mcl_{name}={getattr(self, name)} (must be >= 1)")
        return found


def contrastive_loss(z: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     temperature: float, rectify: bool = False) -> torch.Tensor:
    """mean over the batch of softplus((cos(z, z-) - cos(z, z+)) / tau), on relu(features)
    when ``rectify``."""
    if rectify:
        z, positive, negative = F.relu(z), F.relu(positive), F.relu(negative)
    pos = F.cosine_similarity(z, positive, dim=-1)
    neg = F.cosine_similarity(z, negative, dim=-1)
    return F.softplus((neg - pos) / temperature).mean()


def penultimate(model: torch.nn.Module):
    """Captures the input of the model's head (its last linear layer): ``store[name]``."""
    return capture(model, last_linear(model)[0], inputs=True)


def features(store: dict, model: torch.nn.Module) -> torch.Tensor:
    """The head's input captured by :func:`penultimate`, flattened (B, D)."""
    return store[last_linear(model)[0]].flatten(1)


class MCLMethod(Method):
    name = "mcl"

    def __init__(self, cfg: MCLConfig, targets: torch.Tensor):
        super().__init__(cfg)
        self.target = single_target(targets, "MCL")
        self.trigger: Optional[Trigger] = None
        self.frozen: Optional[torch.nn.Module] = None

    def start(self, model, train: ImageSet, normalize, hflip, device):
        last_linear(model)  # fail before the search when there is no head
        inv = InversionConfig(steps=self.cfg.inversion_steps, batch_size=self.cfg.inversion_batch_size,
                              seed=self.cfg.seed)
        self.trigger = invert_trigger(model, train, self.target, normalize, inv, device)
        log.info("MCL: trigger for class %d, mask L1 %.2f, flips %.1f%% of the clean subset", self.target,
                 self.trigger.norm, 100 * self.trigger.flip_rate)
        self._freeze(model, device)

    def _freeze(self, model, device) -> None:
        self.frozen = copy.deepcopy(model).to(device).eval()
        for q in self.frozen.parameters():
            q.requires_grad_(False)

    def hooks(self, model):
        return penultimate(model)

    def stamp(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized clean inputs -> normalized inputs carrying the trigger (stamped in float)."""
        x01 = x * self.normalizer.std.to(x.device) + self.normalizer.mean.to(x.device)
        return stamp_normalized(x01, self.trigger.mask.to(x.device), self.trigger.pattern.to(x.device),
                                self.normalizer)

    def step(self, model, x, y, store, opt, epoch):
        stamped = self.stamp(x)
        logits = model(stamped)
        z = features(store, model)
        with torch.no_grad(), penultimate(self.frozen) as fixed:
            self.frozen(x)
            positive = features(fixed, self.frozen)
            self.frozen(stamped)
            negative = features(fixed, self.frozen)
        loss = contrastive_loss(z, positive, negative, self.cfg.temperature, self.cfg.rectify)
        if torch.isfinite(loss):
            apply_update(model, opt, loss, self.cfg.grad_clip)
        # train_acc of this defense is the accuracy on stamped inputs (true labels): 1 - a training ASR.
        return {"loss": loss.detach(), "logits": logits.detach()}

    def state_dict(self) -> dict:
        t = self.trigger
        return {"frozen": {k: v.cpu() for k, v in self.frozen.state_dict().items()},
                "trigger": {"target": t.target, "mask": t.mask.cpu(), "pattern": t.pattern.cpu(), "norm": t.norm,
                            "flip_rate": t.flip_rate}}

    def load_state_dict(self, state: dict, model, device: str) -> None:
        self._freeze(model, device)
        self.frozen.load_state_dict(state["frozen"])
        self.trigger = Trigger(**state["trigger"])

    def write_artifacts(self, out) -> dict:
        if self.trigger is None:
            return {}
        save_trigger_png(self.trigger, out / "mcl_trigger.png")
        return {"mcl_trigger": {"target": self.trigger.target, "mask_l1": self.trigger.norm,
                                "flip_rate": self.trigger.flip_rate}}
