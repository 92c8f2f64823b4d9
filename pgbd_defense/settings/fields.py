"""The field table: every setting of a run, described once.

Each :class:`Field` says what a setting is (type, choices, help), its value in every
preset, its command-line flag (ours and the BackdoorBench launcher's), the YAML keys
that set it (ours and the benchmark's spelling), and which parts consume it
(``uses``: section -> attribute of that part's config). Everything else is generated
from this table: the argument parsers of ``python -m pgbd_defense.run`` and of the
launcher a BackdoorBench checkout gets, what ``--bench-root`` forwards, YAML
validation, the saved ``config.yaml``, and the typed sections each part is built from
(``resolve.Settings.section``). This module imports nothing heavy, so the parts'
config classes take their own defaults from it (``preset_default``).

Sections and the parts that consume them:

- ``attack``: how the standalone path makes a backdoored record (``attacks.record.AttackSettings``)
- ``run``: the clean subset, evaluation and device (``pipeline.RunConfig``)
- ``loop``: the fine-tuning loop every defense shares (``defenses.loop.LoopConfig``)
- ``selection``: which epoch is returned (``defenses.loop.Selection``)
- ``targets``: the attack label(s) defended against, and target inference (``method.targets.TargetConfig``)
- ``mapping``: the large-model mapping's teacher (``method.mapping.MappingSource``)
- ``pgbd``, ``nad``, ``ftsam``, ``ibau``, ``mcl``: each defense's own settings (``defenses.*Config``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

from .presets import DEFENSE_OVERRIDES

# The presets: "paper" is the paper's settings (for a GPU), "cpu" finishes in minutes on 2
# cores, "bench" is "paper" with every baseline exactly as BackdoorBench runs it and the last
# epoch reported (presets.py gives each defense's changes per preset).
PRESET_NAMES = ("cpu", "paper", "bench")
DEFAULT_PRESET = "cpu"

SECTIONS = ("attack", "run", "loop", "selection", "targets", "mapping", "pgbd", "nad", "ftsam", "ibau", "mcl")


@dataclass(frozen=True)
class Field:
    """One setting.

    Attributes:
        name: the key in YAML files, the saved ``config.yaml`` and :class:`Settings`.
        type: ``int``, ``float``, ``str``, ``bool`` or ``list`` (of ``item``).
        default: the value in the ``paper`` preset (and every preset not in ``presets``).
        presets: the value in other presets where it differs (``bench`` falls back to ``paper``).
        help: one line for ``--help`` and the docs.
        item: the element type of a list.
        optional: ``None`` (YAML ``null``) is a valid value.
        path: the value is a file or folder (made absolute where another process reads it).
        choices: the valid values, if they are few.
        uses: section -> attribute name in the config of the part that consumes it.
        flag: our command-line flags (default ``--name-with-dashes``).
        bench_flag: the BackdoorBench launcher's flag (default ``--name_with_underscores``).
        attack_flag: the flag of BackdoorBench's attack scripts that sets the same thing (the
            attack side inside a checkout; an attack setting without one cannot apply there).
        bench_note: what BackdoorBench itself does with the key, where that matters (YAML keys
            of the benchmark that set this field: ``resolve.YAML_ALIASES``).
        neutral: for a field added after results were cached, the value that does what the code
            did before it existed: cached cells stay valid while a preset keeps this value
            (``experiments.cells.defaults_fingerprint``).
    """

    name: str
    type: type
    default: Any
    help: str
    presets: Mapping[str, Any] = field(default_factory=dict)
    item: Optional[type] = None
    optional: bool = False
    path: bool = False
    choices: Tuple[Any, ...] = ()
    uses: Mapping[str, str] = field(default_factory=dict)
    flag: Tuple[str, ...] = ()
    bench_flag: str = ""
    attack_flag: str = ""
    bench_note: str = ""
    neutral: Any = None

    @property
    def flags(self) -> Tuple[str, ...]:
        return self.flag or ("--" + self.name.replace("_", "-"),)

    @property
    def launcher_flag(self) -> str:
        return self.bench_flag or "--" + self.name

    def value_in(self, preset: str) -> Any:
        if preset in self.presets:
            return self.presets[preset]
        if preset == "bench" and "paper" in self.presets:
            return self.presets["paper"]
        return self.default


def _f(name, type_, default, help_, **kw) -> Field:
    return Field(name, type_, default, help_, **kw)


_LR_SCHEDULERS = ("constant", "cosine", "multistep")

FIELD_LIST = [
    # ------------------------------------------------------------------ attack (standalone path)
    _f("attack", str, "badnet", "attack that makes the record when none is given (see --record)",
       uses={"attack": "attack"}),
    _f("dataset", str, "fashion-mnist", "clean data set the attack poisons and the defense reads",
       attack_flag="--dataset", uses={"attack": "dataset"}),
    _f("model", str, "preactresnet18", "zoo model the attack trains (preactresnet18, vgg19_bn, resnet50)",
       attack_flag="--model", uses={"attack": "model"}),
    _f("width", float, 1.0, "channel multiplier of the attack's model", presets={"cpu": 0.125},
       uses={"attack": "width"}),
    _f("pratio", float, 0.1, "poisoning ratio of the attack's training split", attack_flag="--pratio",
       uses={"attack": "pratio"}),
    _f("attack_target", int, 0, "attack target label", attack_flag="--attack_target", uses={"attack": "target"}),
    _f("attack_label_trans", str, "all2one", "label transform: every class to the target, or y -> y+1",
       choices=("all2one", "all2all"), attack_flag="--attack_label_trans", uses={"attack": "label_mode"}),
    _f("attack_epochs", int, 100, "epochs that train the backdoored model", presets={"cpu": 3},
       attack_flag="--epochs", uses={"attack": "epochs"}),
    _f("attack_lr", float, 0.01, "learning rate of the attack's training (SGD, cosine)", presets={"cpu": 0.02},
       attack_flag="--lr", uses={"attack": "lr"}),
    _f("attack_batch_size", int, 128, "batch size of the attack's training", attack_flag="--batch_size",
       uses={"attack": "batch_size"}),
    _f("attack_train_subset", int, 0, "train the backdoored model on this many samples (0: all)",
       uses={"attack": "train_subset"}),
    _f("attack_augment", bool, True, "random-crop augmentation while training the backdoored model",
       presets={"cpu": False}, uses={"attack": "augment"}),
    _f("amp", bool, False, "mixed precision: bfloat16 autocast (CPU or CUDA) while training the backdoored model "
       "and while fine-tuning; evaluation stays in full precision", uses={"attack": "amp", "loop": "amp"},
       attack_flag="--amp", neutral=False,
       bench_note="BackdoorBench's YAMLs set amp: True (its ft.py uses it; i-bau and ft-sam never read it)"),
    _f("trigger_image", str, "", "blended: blend this image instead of our generated pattern", path=True,
       attack_flag="--attack_trigger_img_path", uses={"attack": "trigger_image"}),
    _f("trojan_optimize", bool, True,
       "trojan: optimize the patch to excite a neuron (TrojanNN) or stamp a fixed white one",
       uses={"attack": "trojan_optimize"}),
    _f("iab_mask_epochs", int, 25, "inputaware: epochs that train its mask generator alone before the joint "
       "training (BackdoorBench's clean_train_epochs)", presets={"cpu": 2}, attack_flag="--clean_train_epochs",
       uses={"attack": "iab_mask_epochs"}),
    _f("mmdr_lambda", float, 0.0, "ML-MMDR (Xia et al., TDSC 2022): weight of the MMD between clean and poisoned "
       "samples' activations added to the attack's training loss (0: off, the plain attack)",
       uses={"attack": "mmdr_lambda"}, neutral=0.0),
    _f("mmdr_layers", list, ["layer3", "layer4"], "ML-MMDR: the layers whose activations it pulls together",
       item=str, uses={"attack": "mmdr_layers"}, neutral=["layer3", "layer4"]),
    _f("overlays", str, "", "rof-tattoo / rof-mask: comma-separated RGBA PNG overlays (default: ours)",
       uses={"attack": "overlays"}),
    # ------------------------------------------------------------------ run: data, subset, evaluation
    _f("data_root", str, None, "folder holding the clean data set (Fashion-MNIST also: Debian's package)",
       optional=True, path=True, uses={"run": "data_root"}, bench_flag="--dataset_path", attack_flag="--dataset_path",
       bench_note="BackdoorBench's YAML key dataset_path; in a checkout the data set is read from "
                  "<dataset_path>/<dataset>"),
    _f("device", str, "cpu", "torch device (cpu, cuda, cuda:N)", uses={"run": "device"}),
    _f("ratio", float, 0.05, "share of the clean training split the defender holds", uses={"run": "ratio"}),
    _f("index", str, None, "file of clean-subset indices (BackdoorBench's index.txt) instead of a seeded draw",
       optional=True, path=True, uses={"run": "index"}),
    _f("random_seed", int, 0, "seed of the clean subset, the data order and every search",
       uses={"run": "seed", "attack": "seed", "loop": "seed", "targets": "seed"}, flag=("--seed", "--random-seed"),
       attack_flag="--random_seed"),
    _f("eval_every", int, 0, "diagnostic: also evaluate on the test sets after every N epochs (0: off; the "
       "returned model is always evaluated once, and selection never reads these numbers)",
       uses={"run": "eval_every"}),
    _f("diagnostics", bool, False, "diagnostic: log PGBD's sanitization term after every epoch (its mean, the share "
       "of samples it acts on, its share of the gradient at the layer, and the PAVs' alignment with the true trigger "
       "shift on the record's poisoned test images); evaluation only, never read by selection",
       uses={"run": "diagnostics"}, neutral=False),
    # ------------------------------------------------------------------ the shared loop
    _f("lr", float, 1e-4, "learning rate of the fine-tuning", presets={"cpu": 2e-2}, uses={"loop": "lr"}),
    _f("epochs", int, 35, "fine-tuning epochs (I-BAU: rounds)", presets={"cpu": 5}, uses={"loop": "epochs"}),
    _f("batch_size", int, 16, "fine-tuning batch size", uses={"loop": "batch_size"}),
    _f("optimizer", str, "sgd", "optimizer of the fine-tuning", choices=("sgd", "adam"), uses={"loop": "optimizer"},
       bench_note="BackdoorBench's YAML key client_optimizer"),
    _f("sgd_momentum", float, 0.9, "SGD's momentum", uses={"loop": "momentum"}),
    _f("wd", float, 1e-4, "weight decay", uses={"loop": "weight_decay"}),
    _f("amsgrad", bool, False, "Adam's AMSGrad variant (what BackdoorBench's adam builds)",
       uses={"loop": "amsgrad"}),
    _f("adam_betas", list, [0.9, 0.999], "Adam's betas", item=float, uses={"loop": "adam_betas"},
       bench_note="read by BackdoorBench's i-bau.py (argparser_opt_scheduler)"),
    _f("lr_scheduler", str, "constant", "learning-rate schedule (BackdoorBench's CosineAnnealingLR and "
       "MultiStepLR names work too)", presets={"cpu": "cosine"}, choices=_LR_SCHEDULERS,
       uses={"loop": "lr_scheduler"}),
    _f("scheduler_interval", str, "batch", "the schedule steps after every batch or every epoch",
       choices=("batch", "epoch"), uses={"loop": "scheduler_interval"}),
    _f("cos_t_max", int, 0, "the cosine's T_max in scheduler steps (0: the whole run; BackdoorBench: 100)",
       uses={"loop": "cos_t_max"}),
    _f("steplr_milestones", list, [], "multistep: the scheduler steps at which the rate drops", item=int,
       uses={"loop": "steplr_milestones"}),
    _f("steplr_gamma", float, 0.1, "multistep: the factor at each milestone", uses={"loop": "steplr_gamma"}),
    _f("freeze_bn", bool, True, "keep BatchNorm's statistics frozen (eval mode) while fine-tuning",
       presets={"cpu": False}, uses={"loop": "freeze_bn"}),
    _f("augment", bool, True, "random-crop augmentation of the clean subset", presets={"cpu": False},
       uses={"loop": "augment"}),
    _f("grad_clip", float, 0.0, "clip the gradient norm (0: off)", presets={"cpu": 5.0}, uses={"loop": "grad_clip"}),
    # ------------------------------------------------------------------ selection (clean held-out data only)
    _f("val_share", float, 0.1, "share of the clean subset held out to select the epoch (0: keep the last)",
       presets={"bench": 0.0}, uses={"selection": "val_share"}),
    _f("select", str, "best", "epoch returned: best held-out clean accuracy, or the last",
       presets={"bench": "last"}, choices=("best", "last"), uses={"selection": "select"}),
    _f("collapse_margin", float, 0.2, "stop when held-out clean accuracy falls this far below its start "
       "(0-1; 0: off) ...", uses={"selection": "collapse_margin"}),
    _f("collapse_patience", int, 2, "... for this many consecutive epochs", uses={"selection": "collapse_patience"}),
    # ------------------------------------------------------------------ targets
    _f("target", str, "record", "attack label(s) defended against: 'record' (read off the record's poisoned "
       "test set), a class index, 'all2all', or 'auto' (Neural Cleanse-style inference)",
       uses={"targets": "spec"}),
    _f("inversion_steps", int, 300, "--target auto: trigger-search steps per class", uses={"targets": "steps"}),
    _f("inversion_batch_size", int, 32, "--target auto: clean images per search step",
       uses={"targets": "batch_size"}),
    _f("inversion_classes", list, [], "--target auto: only these classes (empty: all)", item=int,
       uses={"targets": "classes"}),
    _f("inversion_scale", str, "log", "--target auto: anomaly index on log norms, or on norms (Neural Cleanse)",
       choices=("log", "linear"), uses={"targets": "scale"}),
    _f("inversion", str, "nc", "trigger inversion of --target auto and ST-PGBD: nc (Neural Cleanse's mask and "
       "pattern) or tao (Tao et al., CVPR 2022: an additive perturbation, changed pixels penalized; the paper's "
       "for ST-PGBD)", choices=("nc", "tao"), uses={"targets": "method", "pgbd": "inversion"}, neutral="nc"),
    _f("nt_topk", int, 0, "NT-PGBD with --target auto: cycle through the top k inferred classes (0: all)",
       uses={"targets": "nt_topk"}),
    # ------------------------------------------------------------------ PGBD
    _f("layer", str, None, "named module whose activations PGBD manipulates (default: the last convolution)",
       optional=True, uses={"pgbd": "layer"}),
    _f("lambda", float, 10.0, "weight of the sanitization loss", presets={"cpu": 1.0}, uses={"pgbd": "lam"}),
    _f("loss_form", str, "cos", "cos (the paper), abs_cos (the authors' release) or relu_cos (hinge, ours)",
       presets={"cpu": "relu_cos"}, choices=("cos", "abs_cos", "relu_cos"), uses={"pgbd": "form"}),
    _f("reduction", str, "sum", "the sanitization loss summed over the batch (the release) or averaged",
       presets={"cpu": "mean"}, choices=("sum", "mean"), uses={"pgbd": "reduction"}),
    _f("warmup_epochs", int, 0, "ramp lambda up over N epochs (0: off)", uses={"pgbd": "warmup_epochs"}),
    _f("lambda_mode", str, "fixed", "fixed: lambda as given; grad_share: each batch's lambda chosen so that the "
       "term's gradient at its layer is --grad-share of the total there (lambda is then ignored)",
       choices=("fixed", "grad_share"), uses={"pgbd": "lambda_mode"}, neutral="fixed"),
    _f("grad_share", float, 0.25, "lambda_mode grad_share: the term's share of the gradient norm at its layer "
       "(0-1, exclusive)", uses={"pgbd": "grad_share"}, neutral=0.25),
    _f("extra_layers", list, [], "PGBD: more layers, each with its own prototypes, PAVs and term (same lambda "
       "rule), e.g. layer3.1.conv2", item=str, uses={"pgbd": "extra_layers"}, neutral=[]),
    _f("nt_addition", bool, False, "PGBD: add NT-PGBD's cycling term (assumed target changing every --cycle "
       "epochs) to the known target's, at the same layer", uses={"pgbd": "nt_addition"}, neutral=False),
    _f("clusters", int, 3, "k-means clusters per class; the prototype is the mean of their centroids",
       uses={"pgbd": "clusters"}),
    _f("update_gap", int, 5, "re-estimate prototypes every N epochs (0: never)", presets={"cpu": 0},
       uses={"pgbd": "update_gap"}),
    _f("alpha", float, 0.75, "weight of the fresh prototypes when re-estimating", uses={"pgbd": "alpha"}),
    _f("cycle", int, 3, "NT-PGBD: epochs per assumed target", uses={"pgbd": "cycle"}),
    _f("nt_classes", list, [], "NT-PGBD: classes to cycle through, in order (empty: all)", item=int,
       uses={"pgbd": "nt_classes"}),
    _f("proto_memory_mb", float, 1024.0, "memory budget per class for exact k-means; above it, streaming "
       "MiniBatchKMeans", uses={"pgbd": "proto_memory_mb"}),
    _f("st_steps", int, 300, "ST-PGBD: trigger-search steps", uses={"pgbd": "st_steps"}),
    _f("st_batch_size", int, 32, "ST-PGBD: clean images per search step", uses={"pgbd": "st_batch_size"}),
    _f("mapping", str, "off", "large-model mapping: off, a teacher features file (.pt), or "
       "torchvision:NAME:WEIGHTS_FILE (local weights; nothing is downloaded)", uses={"mapping": "source"}),
    _f("teacher_input_size", int, 224, "side in pixels the teacher backbone sees (224 for ImageNet weights)",
       uses={"mapping": "input_size"}),
    _f("mapping_components", int, 64, "teacher PCA channels", uses={"pgbd": "mapping_components"}),
    _f("mapping_steps", int, 3000, "mapping optimizer steps at most", uses={"pgbd": "mapping_steps"}),
    # ------------------------------------------------------------------ NAD
    _f("te_epochs", int, 10, "NAD: epochs that make the teacher", uses={"nad": "te_epochs"}),
    _f("te_lr_scheduler", str, "", "NAD: the teacher's schedule ('': the student's)", choices=("",) + _LR_SCHEDULERS,
       uses={"nad": "te_lr_scheduler"}),
    _f("betas", list, [500.0, 1000.0, 1000.0], "NAD: attention-loss weight per distilled layer", item=float,
       uses={"nad": "betas"}, bench_note="BackdoorBench's YAML keys beta1, beta2, beta3"),
    _f("p", float, 2.0, "NAD: power of the attention map", uses={"nad": "p"}),
    _f("nad_layers", list, ["layer3", "layer4", "avgpool"], "NAD: the layers distilled", item=str,
       uses={"nad": "layers"}),
    # ------------------------------------------------------------------ FT-SAM
    _f("rho", float, 2.0, "FT-SAM: neighbourhood radius", uses={"ftsam": "rho"},
       bench_note="BackdoorBench's YAML key rho_max (its script's argparse default 2.0 wins over the YAML)"),
    _f("adaptive", bool, True, "FT-SAM: ASAM's adaptive neighbourhood", uses={"ftsam": "adaptive"}),
    _f("sam_eta", float, 0.01, "FT-SAM: ASAM's eta (BackdoorBench's SAM has none: 0)", uses={"ftsam": "eta"}),
    _f("label_smoothing", float, 0.1, "FT-SAM: label smoothing of its cross-entropy",
       uses={"ftsam": "label_smoothing"}),
    # ------------------------------------------------------------------ I-BAU
    _f("K", int, 5, "I-BAU: Neumann terms of the implicit hypergradient", uses={"ibau": "fixed_point_iters"}),
    _f("fixed_point_lr", float, 0.1, "I-BAU: step of the inner fixed-point map", uses={"ibau": "fixed_point_lr"}),
    _f("pert_lr", float, 10.0, "I-BAU: SGD step of the perturbation's fit", uses={"ibau": "pert_lr"}),
    _f("pert_decay", float, 0.001, "I-BAU: weight of ||delta||^2 in the inner loss", uses={"ibau": "pert_decay"}),
    _f("portion", float, 0.01, "I-BAU: share of each batch that gets the perturbation (at least one sample)",
       uses={"ibau": "portion"}),
    # ------------------------------------------------------------------ MCL
    _f("temperature", float, 0.5, "MCL: temperature of the contrastive loss", uses={"mcl": "temperature"}),
    _f("mcl_rectify", bool, True, "MCL: the loss on relu(features) (ours; false: the release's)",
       uses={"mcl": "rectify"}),
    _f("mcl_inversion_steps", int, 300, "MCL: trigger-search steps", uses={"mcl": "inversion_steps"}),
    _f("mcl_inversion_batch_size", int, 32, "MCL: clean images per search step",
       uses={"mcl": "inversion_batch_size"}),
]

FIELDS: Dict[str, Field] = {f.name: f for f in FIELD_LIST}
assert len(FIELDS) == len(FIELD_LIST), "a field is described twice"


def preset_default(name: str, preset: str = "paper", defense: Optional[str] = None) -> Any:
    """A field's value in a preset, with a defense's changes there (``presets.DEFENSE_OVERRIDES``):
    the defaults of the parts' config classes, so that they are the table's."""
    changed = DEFENSE_OVERRIDES.get(preset, {}).get(defense or "", {})
    value = changed[name] if name in changed else FIELDS[name].value_in(preset)
    return list(value) if isinstance(value, list) else value
