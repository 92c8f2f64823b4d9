"""Every defense the command line runs, by BackdoorBench's names, built from the flat
settings dictionary of ``config.py``. Each entry returns a :class:`Method` of the
shared loop, so PGBD and the baselines get the same data, budget, selection rule
and output files."""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch

from .baselines.ftsam import FTSAMConfig, FTSAMMethod
from .baselines.ibau import IBAUConfig, IBAUMethod
from .baselines.mcl import MCLConfig, MCLMethod
from .baselines.nad import NADConfig, NADMethod
from .finetune import LoopConfig, Method
from .pgbd import PGBDConfig, PGBDMethod
from .registry import Registry

DEFENSES: Registry = Registry("defense")


def loop_settings(cfg: Dict[str, Any]) -> Dict[str, Any]:
    return {"lr": cfg["lr"], "momentum": cfg["sgd_momentum"], "weight_decay": cfg["wd"], "epochs": cfg["epochs"],
            "batch_size": cfg["batch_size"], "optimizer": cfg["optimizer"], "freeze_bn": cfg["freeze_bn"],
            "augment": cfg["augment"], "grad_clip": cfg["grad_clip"], "lr_scheduler": cfg["lr_scheduler"],
            "scheduler_interval": cfg["scheduler_interval"], "cos_t_max": cfg["cos_t_max"],
            "steplr_milestones": tuple(cfg["steplr_milestones"]), "steplr_gamma": cfg["steplr_gamma"],
            "amsgrad": cfg["amsgrad"], "seed": cfg["random_seed"]}


def _pgbd_config(cfg: Dict[str, Any], layer: str, variant: str) -> PGBDConfig:
    return PGBDConfig(**loop_settings(cfg), layer=layer, lam=cfg["lambda"], form=cfg["loss_form"],
                      reduction=cfg["reduction"], warmup_epochs=cfg["warmup_epochs"], clusters=cfg["clusters"],
                      update_gap=cfg["update_gap"], alpha=cfg["alpha"], variant=variant, cycle=cfg["cycle"],
                      nt_classes=tuple(cfg["nt_classes"] or ()), proto_memory_mb=cfg["proto_memory_mb"],
                      st_steps=cfg["st_steps"], st_batch_size=cfg["st_batch_size"],
                      mapping_components=cfg["mapping_components"], mapping_steps=cfg["mapping_steps"])


# PGBD's variants by the --variant names they answer to.
VARIANT_DEFENSES = {"pgbd": "pgbd", "nt": "nt-pgbd", "st": "st-pgbd"}


@DEFENSES.register("pgbd")
def _pgbd(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return PGBDMethod(_pgbd_config(cfg, layer, "pgbd"), targets, layer, teacher)


@DEFENSES.register("nt-pgbd")
def _nt_pgbd(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return PGBDMethod(_pgbd_config(cfg, layer, "nt"), targets, layer, teacher)


@DEFENSES.register("st-pgbd")
def _st_pgbd(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return PGBDMethod(_pgbd_config(cfg, layer, "st"), targets, layer, teacher)


@DEFENSES.register("ft")
def _ft(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return Method(LoopConfig(**loop_settings(cfg)))


@DEFENSES.register("nad")
def _nad(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return NADMethod(NADConfig(**loop_settings(cfg), te_epochs=cfg["te_epochs"], te_lr_scheduler=cfg["te_lr_scheduler"],
                               betas=tuple(cfg["betas"]), p=cfg["p"], layers=tuple(cfg["nad_layers"])))


@DEFENSES.register("ft-sam")
def _ftsam(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return FTSAMMethod(FTSAMConfig(**loop_settings(cfg), rho=cfg["rho"], adaptive=cfg["adaptive"], eta=cfg["sam_eta"],
                                   label_smoothing=cfg["label_smoothing"]))


@DEFENSES.register("i-bau")
def _ibau(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return IBAUMethod(IBAUConfig(**loop_settings(cfg), fixed_point_iters=cfg["K"], fixed_point_lr=cfg["fixed_point_lr"],
                                 pert_lr=cfg["pert_lr"], pert_decay=cfg["pert_decay"], portion=cfg["portion"]))


@DEFENSES.register("mcl")
def _mcl(cfg: Dict[str, Any], targets: torch.Tensor, layer: str, teacher=None) -> Method:
    return MCLMethod(MCLConfig(**loop_settings(cfg), temperature=cfg["temperature"], rectify=cfg["mcl_rectify"],
                               inversion_steps=cfg["mcl_inversion_steps"],
                               inversion_batch_size=cfg["mcl_inversion_batch_size"]), targets)


def build_method(name: str, cfg: Dict[str, Any], targets: torch.Tensor, layer: str,
                 teacher_features: Optional[torch.Tensor] = None) -> Method:
    """``teacher_features`` (rows matching the training images) turn on PGBD's large-model
    mapping; the baselines have no use for them."""
    if teacher_features is not None and name not in ("pgbd", "nt-pgbd"):
        raise ValueError(f"the large-model mapping is a setting of pgbd and nt-pgbd, not of {name}")
    method = DEFENSES.get(name)(cfg, targets, layer, teacher_features)
    method.name = name
    return method
