"""Large-model mapping: PAVs computed in a teacher's feature space and mapped back.

A large pre-trained backbone (the teacher) sees D_S once; its features are
reduced by PCA to ``components`` channels per spatial position and resized to
the student layer's grid. A reversible linear map, two 3x3 convolutions
(student -> teacher and teacher -> student), is trained on the *same* samples'
pairs (student activation, teacher feature) with alignment and reconstruction
mean squared errors, for many steps with early stopping. The student's
activations are lifted to the teacher space, prototypes and PAVs are computed
there, and each PAV is brought back through the teacher -> student convolution's
linear part (a PAV is a difference of two points, so the bias cancels).

Teacher features come from a file (``N x C_t x H x W`` or ``N x C_t``, rows in
the clean subset's order, or a dict with ``features`` and the record's train
``index`` of each row), or from a torchvision backbone whose weights the user
gives as a local file. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA

from ..datasets.batches import Normalizer
from ..errors import UserError
from ..settings.fields import preset_default
from ..util.atomic import atomic_torch_save
from .prototypes import collect_activations

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MappingError(UserError, ValueError):
    """A teacher source that cannot be used; the message says how to fix it."""


@dataclass
class MappingConfig:
    """components: PCA channels kept per position (release: 64); steps: at most this many
    optimizer steps; lr: Adam's step size; batch_size: samples per step; patience and
    tol: stop when the loss has not improved by ``tol`` (relative) for ``patience`` steps."""

    components: int = 64
    steps: int = 3000
    lr: float = 1e-3
    batch_size: int = 64
    patience: int = 300
    tol: float = 1e-3
    seed: int = 0


def reduce_teacher(features: torch.Tensor, components: int, grid: Tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(N, C_t, H, W) or (N, C_t) teacher features -> (N, k, h, w): PCA over channels at
    every position (k = min(components, C_t)), then resized to the student's grid."""
    if features.dim() == 2:
        features = features[:, :, None, None]
    if features.dim() != 4:
        raise MappingError(f"teacher features must be N x C or N x C x H x W, got shape {tuple(features.shape)}")
    n, c, h, w = features.shape
    flat = features.permute(0, 2, 3, 1).reshape(-1, c).double().numpy()
    k = min(components, c, len(flat))
    if k < c:
        flat = PCA(n_components=k, random_state=seed).fit_transform(flat)
    reduced = torch.from_numpy(np.ascontiguousarray(flat)).float().view(n, h, w, k).permute(0, 3, 1, 2)
    if (h, w) != tuple(grid):
        mode = "nearest" if (h, w) == (1, 1) else "bilinear"
        reduced = F.interpolate(reduced, size=tuple(grid), mode=mode, **({} if mode == "nearest" else
                                                                          {"align_corners": False}))
    return reduced.contiguous()


class LinearMap(torch.nn.Module):
    """Student <-> teacher 3x3 convolutions; each space is scaled by its own spread
    so that both halves of the loss weigh alike."""

    def __init__(self, student_channels: int, teacher_channels: int, s_scale: float = 1.0, t_scale: float = 1.0):
        super().__init__()
        self.s2t = torch.nn.Conv2d(student_channels, teacher_channels, 3, padding=1)
        self.t2s = torch.nn.Conv2d(teacher_channels, student_channels, 3, padding=1)
        self.register_buffer("s_scale", torch.tensor(float(s_scale)))
        self.register_buffer("t_scale", torch.tensor(float(t_scale)))

    @classmethod
    def identity(cls, channels: int) -> "LinearMap":
        m = cls(channels, channels)
        with torch.no_grad():
            for conv in (m.s2t, m.t2s):
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :, 1, 1] = torch.eye(channels)
        return m

    def to_teacher(self, s: torch.Tensor) -> torch.Tensor:
        return self.s2t(s / self.s_scale) * self.t_scale

    def to_student(self, t: torch.Tensor) -> torch.Tensor:
        return self.t2s(t / self.t_scale) * self.s_scale

    def vector_to_student(self, v: torch.Tensor) -> torch.Tensor:
        """A difference of teacher-space points, mapped back (the bias cancels in differences)."""
        return F.conv2d(v / self.t_scale, self.t2s.weight, None, padding=1) * self.s_scale


def mapping_loss(m: LinearMap, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Alignment both ways plus reconstruction of each space through the other, in scaled units."""
    ss, ts = m.s_scale, m.t_scale
    t_hat, s_hat = m.to_teacher(s), m.to_student(t)
    return (F.mse_loss(t_hat / ts, t / ts) + F.mse_loss(s_hat / ss, s / ss)
            + F.mse_loss(m.to_student(t_hat) / ss, s / ss) + F.mse_loss(m.to_teacher(s_hat) / ts, t / ts))


@dataclass
class MapFit:
    model: LinearMap
    losses: List[float]  # mean loss of each block of 50 steps
    steps: int
    converged: bool
    student_error: float  # relative error of student -> teacher -> student on the training pairs
    teacher_error: float  # relative error of student -> teacher against the teacher features


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm().clamp_min(1e-12))


def train_map(student: torch.Tensor, teacher: torch.Tensor, cfg: MappingConfig = MappingConfig()) -> MapFit:
    """Fit the map on matching (N, C_s, h, w) / (N, k, h, w) pairs of the same samples."""
    if len(student) != len(teacher) or student.shape[2:] != teacher.shape[2:]:
        raise MappingError(f"student activations {tuple(student.shape)} and teacher features "
                           f"{tuple(teacher.shape)} must pair the same samples on the same grid")
    torch.manual_seed(cfg.seed)
    m = LinearMap(student.shape[1], teacher.shape[1], float(student.std()) or 1.0, float(teacher.std()) or 1.0)
    opt = torch.optim.Adam(m.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, since, block, losses, converged, step = float("inf"), 0, [], [], False, 0
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(student), (min(cfg.batch_size, len(student)),), generator=gen)
        loss = mapping_loss(m, student[idx], teacher[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        block.append(float(loss.detach()))
        if len(block) == 50:
            losses.append(float(np.mean(block)))
            block = []
            if losses[-1] < best * (1 - cfg.tol):
                best, since = losses[-1], 0
            else:
                since += 50
                if since >= cfg.patience:
                    converged = True
                    break
    with torch.no_grad():
        t_hat = m.to_teacher(student)
        fit = MapFit(m, losses, step, converged, relative_error(m.to_student(t_hat), student),
                     relative_error(t_hat, teacher))
    log.info("mapping: %d steps, loss %.4f -> %.4f (%s); student round trip error %.3f, teacher fit error %.3f",
             fit.steps, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
             "converged" if converged else "step budget reached", fit.student_error, fit.teacher_error)
    return fit


def student_maps(model: torch.nn.Module, layer: str, images: torch.Tensor, normalize: Normalizer,
                 device: str = "cpu") -> torch.Tensor:
    """The layer's (N, C, h, w) activations, model in eval mode."""
    maps = collect_activations(model, layer, images, normalize, device=device, flatten=False)
    if maps.dim() != 4:
        raise MappingError(f"layer {layer!r} gives {maps.dim()}-d outputs; the mapping needs a convolution's "
                           "C x H x W maps")
    return maps


# ---------------------------------------------------------------- teacher sources

def parse_source(spec: Optional[str]) -> Optional[Tuple[str, str, str]]:
    """``off``/None -> None; ``FILE.pt`` -> ("file", path, ""); ``torchvision:NAME:WEIGHTS`` ->
    ("torchvision", NAME, WEIGHTS)."""
    if spec in (None, "", "off", "none", False):
        return None
    spec = str(spec)
    if spec.startswith("torchvision:"):
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise MappingError(f"--mapping {spec!r}: write torchvision:NAME:WEIGHTS_FILE, e.g. "
                               "torchvision:resnet50:~/weights/resnet50.pth (weights are never downloaded)")
        weights = Path(parts[2]).expanduser()
        if not weights.is_file():
            raise MappingError(f"teacher weights {weights} not found: give a local state_dict file")
        return ("torchvision", parts[1], str(weights))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise MappingError(f"--mapping {spec!r} is neither 'off', a features file (.pt) nor "
                           "torchvision:NAME:WEIGHTS_FILE")
    return ("file", str(path), "")


@dataclass
class TeacherConfig:
    """Where the mapping's teacher features come from (``source``: ``off``, a features file, or
    ``torchvision:NAME:WEIGHTS_FILE``) and the side in pixels a backbone sees (``input_size``)."""

    source: str = preset_default("mapping")
    input_size: int = preset_default("teacher_input_size")

    def problems(self) -> List[str]:
        found = []
        try:
            parse_source(self.source)
        except MappingError as e:
            found.append(str(e))
        if self.input_size < 1:
            found.append(f"teacher_input_size={self.input_size} (must be >= 1)")
        return found

    @property
    def enabled(self) -> bool:
        return parse_source(self.source) is not None


def features_from_file(path: str, rows: Sequence[int], subset_indices: Sequence[int]) -> torch.Tensor:
    """Rows of a features file for the training samples. ``rows`` are their positions in
    the clean subset, ``subset_indices`` the subset's indices into the record's train split."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, dict):
        if "features" not in payload:
            raise MappingError(f"{path}: a dict of teacher features needs a 'features' entry (and 'index')")
        feats = payload["features"]
        if "index" in payload:
            where = {int(i): r for r, i in enumerate(torch.as_tensor(payload["index"]).tolist())}
            wanted = [int(subset_indices[r]) for r in rows]
            missing = [i for i in wanted if i not in where]
            if missing:
                raise MappingError(f"{path} has no features for {len(missing)} clean-subset samples "
                                   f"(e.g. train index {missing[0]}): compute them for this subset (index.txt)")
            return feats[[where[i] for i in wanted]].float()
    else:
        feats = payload
    if not isinstance(feats, torch.Tensor):
        raise MappingError(f"{path} holds {type(feats).__name__}, not a tensor of features")
    if len(feats) != len(subset_indices):
        raise MappingError(f"{path} has {len(feats)} rows but the clean subset has {len(subset_indices)} samples: "
                           "save a dict {'features': F, 'index': train indices} or one row per index.txt entry")
    return feats[list(rows)].float()


def _head_classes(state: dict) -> Optional[int]:
    """The class count of a torchvision classifier's state_dict (its last 2-d weight)."""
    heads = [v for k, v in state.items() if k.endswith("weight") and getattr(v, "dim", lambda: 0)() == 2]
    return int(heads[-1].shape[0]) if heads else None


def backbone_trunk(name: str, weights: str) -> torch.nn.Module:
    """A torchvision classifier's convolutional trunk, with the user's local weights
    (an ImageNet head or any other class count)."""
    import torchvision

    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    try:
        net = torchvision.models.get_model(name, weights=None, num_classes=_head_classes(state) or 1000)
    except ValueError as e:
        raise MappingError(f"torchvision has no model {name!r} ({e})") from None
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise MappingError(f"{weights} does not fit torchvision's {name}: {str(e)[:300]}") from None
    if hasattr(net, "features"):
        return net.features
    if hasattr(net, "layer4"):
        return torch.nn.Sequential(*[c for n, c in net.named_children() if n not in ("avgpool", "fc")])
    raise MappingError(f"{name}: only torchvision models with a convolutional trunk (resnets, vgg, densenet, "
                       "mobilenet, efficientnet, convnext) are supported; or save features to a file")


@torch.no_grad()
def backbone_features(trunk: torch.nn.Module, images: torch.Tensor, input_size: int = 224, batch_size: int = 32,
                      device: str = "cpu") -> torch.Tensor:
    trunk = trunk.to(device).eval()
    norm = Normalizer(IMAGENET_MEAN, IMAGENET_STD, 3)
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = norm(x.to(device))
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
        out.append(trunk(x).cpu())
    return torch.cat(out)


def cached_backbone_features(name: str, weights: str, images: torch.Tensor, cache_dir: Path,
                             input_size: int = 224, device: str = "cpu") -> torch.Tensor:
    """Backbone features of ``images``, computed once: cached under ``cache_dir`` by the
    backbone, its weights file and the images themselves."""
    h = hashlib.sha1(f"{name}|{input_size}".encode())
    h.update(Path(weights).read_bytes())
    h.update(images.contiguous().numpy().tobytes())
    path = Path(cache_dir) / f".teacher_{name}_{h.hexdigest()[:16]}.pt"
    if path.is_file():
        log.info("teacher features from the cache %s", path)
        return torch.load(path, map_location="cpu", weights_only=True)
    log.info("computing %s features of %d images (once; cached at %s)", name, len(images), path)
    feats = backbone_features(backbone_trunk(name, weights), images, input_size, device=device)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(feats, path)
    return feats
