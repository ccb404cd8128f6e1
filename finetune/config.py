"""Training configuration: the ``TrainConfig`` dataclass, YAML recipes and ``--key value`` overrides.

A recipe (``finetune/recipes/*.yaml``) maps one-to-one onto ``TrainConfig``'s fields; any field can
be overridden on the command line (``--lr 1e-4``, ``--data a b``, ``--gradient-checkpointing``).
Every problem (unknown keys, wrong types, values out of range) is collected and raised as one
``ConfigError`` naming each field, instead of failing on the first one.

The docstring under each field is its documentation; ``field_docs()`` reads them (as litgpt's
argument parser does) so ``loupe train --help`` shows them.
"""

from __future__ import annotations

import ast
import inspect
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

METHODS = ("auto", "full", "lora", "qlora")
SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "no", "bf16", "fp16")


class ConfigError(ValueError):
    """One or more problems in a training config; ``problems`` lists them, each naming its field."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{len(problems)} problem(s) in the training config:\n  - " + "\n  - ".join(problems))


@dataclass
class TrainConfig:
    """Everything one training run needs. Recipes set these fields; the CLI overrides them."""

    # ---- model ---------------------------------------------------------------------------------
    base: str = "scratch:tiny"
    """Base model: a hub id (Qwen/Qwen2.5-VL-3B-Instruct), a local folder, or scratch:<test|tiny|small>[:family]."""
    method: str = "auto"
    """auto | full | lora | qlora. auto: full training for scratch bases, LoRA for hub/folder bases."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch."""
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    """Regex of the modules that get LoRA adapters (the language model only, by default)."""
    train_vision: bool = False
    """Also train the vision tower (LoRA/QLoRA runs; full runs train everything)."""
    train_projector: bool = False
    """Also train the vision-language projector (the vision tower's merger)."""
    decoder_width: int = 64
    """Width of the MaskDecoder."""
    lowlevel_width: int = 32
    """Width of the LowLevelEncoder's convolutions."""
    lowlevel_max_side: int = 448
    """Long side (px) at which the LowLevelEncoder sees each image (and masks are learnt)."""
    trust_remote_code: bool = False
    """Allow the base's own Python code to run (off unless you trust the base)."""
    name: str = "loupe"
    """Model name recorded in the checkpoint (shown as <name>@<hash> in results)."""

    # ---- loss ----------------------------------------------------------------------------------
    ce_weight: float = 1.0
    """Weight of the token cross-entropy."""
    bce_weight: float = 2.0
    """Weight of the mask binary cross-entropy."""
    dice_weight: float = 0.5
    """Weight of the mask Dice loss."""
    lowlevel_context: int = 0
    """Residual dilated convs (dilation 2, 4, ...) in the LowLevelEncoder at 1/4 resolution: a wider view
    for each pixel of the tampering map and the mask decoder's features."""
    lowlevel_pool_map: bool = False
    """The LowLevelEncoder's image-level heads (tampered, categories) also read the peak of its tampering
    map, not only globally pooled features that a small edited region barely moves. Needs aux_weight > 0."""
    mask_prior: bool = False
    """The mask decoder starts from the LowLevelEncoder's own tampering map (added to its logits with a
    learned scale) and learns the rest. Needs aux_weight > 0."""
    lowlevel_pretrain_steps: int = 0
    """Before the main loop of a new run, train the LowLevelEncoder alone on the auxiliary labels
    for N steps (no language model, so each step is cheap): the language model then starts from a
    branch that already sees. Needs aux_weight > 0. A run resumed from a checkpoint skips it."""
    evidence_tokens: bool = False
    """Give the language model the auxiliary heads' verdicts as three extra tokens per image, each a
    probability-weighted mix of the LM's own embeddings of the words (distortion category, severity,
    tampered/authentic), so it can copy them like prompt words. Needs aux_weight > 0."""
    evidence_fusion: bool = False
    """Late fusion: a learned linear map from the auxiliary heads' probabilities (the judged image, and
    the other image of a pair) to a bias on the verdict words' logits (key_token_ids), starting at
    zero. Needs aux_weight > 0."""
    fusion_scope: str = "key"
    """Which logits evidence fusion biases: "key" (the verdict words only) or "vocab" (every token).
    "vocab" lets the answer's opening words carry the verdict, where a template commits to it before
    the verdict word itself (the forgery templates up to template@2: "Yes, this picture ..." / "This image
    appears ...")."""
    fusion_lr: float = 0.0
    """Learning rate of the evidence-fusion map (0: lr). It has no weight decay."""
    lowlevel_init: str = ""
    """A Loupe checkpoint folder whose LowLevelEncoder (heads.safetensors, same width and aux heads)
    this run starts from, e.g. one pretrained by an earlier run; then lowlevel_freeze may be used
    without lowlevel_pretrain_steps."""
    lowlevel_freeze: bool = False
    """Keep the LowLevelEncoder's convolutions and auxiliary heads fixed in the main loop (its token
    projection still trains): the language-model loss then cannot wash out what pretraining taught."""
    key_token_weight: float = 1.0
    """Weight of the answer tokens that carry the verdict (first tokens of the taxonomy's words:
    distortions, severities, ratings, verdicts, manipulations, locations, A/B) in the token
    cross-entropy, relative to the other answer tokens (1: plain mean)."""
    aux_weight: float = 0.0
    """Weight of the auxiliary losses that supervise the LowLevelEncoder directly with the builders'
    per-image labels (Sample.meta: distortion categories, severity, tampered pixels). 0 turns the
    auxiliary heads off; from-scratch models need them to learn to see (see loupe-tiny.yaml)."""

    # ---- data ----------------------------------------------------------------------------------
    data: list[str] = field(default_factory=list)
    """Dataset folders (train.jsonl, val.jsonl, images/, masks/, card.md), as `loupe build-data` writes."""
    data_weights: list[float] = field(default_factory=list)
    """Mixing weight of each dataset folder (empty: by size). An epoch draws records in these proportions."""
    min_pixels: int = 56 * 56
    """Pixel budget: smallest image area given to the vision tower."""
    max_pixels: int = 448 * 448
    """Pixel budget: largest image area given to the vision tower (bigger images are downscaled)."""
    max_length: int = 2048
    """Longest sequence in tokens; longer records are skipped (never truncated: that would cut image tokens)."""
    bucketing: bool = True
    """Group records of similar length into batches, so padding stays low."""
    max_bad_records: int = 100
    """Bad records (broken JSON, missing or corrupt images) skipped with a warning before the run stops."""
    val_samples: int = 64
    """Validation records used at each evaluation (the first N of val.jsonl, across folders)."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""

    # ---- optimisation --------------------------------------------------------------------------
    lr: float = 2e-4
    """Peak learning rate."""
    head_lr: float = 0.0
    """Learning rate of the LowLevelEncoder and MaskDecoder (0: same as lr)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_steps: int = 1000
    """Optimizer steps to train for."""
    batch_size: int = 4
    """Records per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    mixed_precision: str = "auto"
    """auto | no | bf16 | fp16. auto: bf16 on GPUs that have it, fp16 on older GPUs, none on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% slower."""
    cpu: bool = False
    """Train on the CPU even if a GPU is present."""

    # ---- run -----------------------------------------------------------------------------------
    output: str = "runs/loupe"
    """Output folder: the final checkpoint, checkpoints/, metrics.jsonl, loss.png."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    eval_every: int = 100
    """Validate every N optimizer steps (0: only at the end)."""
    task_eval_every: int = 0
    """Every N steps also run `loupe eval`'s evaluate() (generation, the task metrics) on val records (0: off)."""
    task_eval_samples: int = 32
    """Validation records per dataset folder for the task evaluation."""
    save_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (0: never)."""
    keep_last: int = 2
    """Resumable checkpoints to keep (older ones are deleted)."""
    log_every: int = 1
    """Write a metrics.jsonl line every N optimizer steps."""
    tensorboard: bool = False
    """Also log to TensorBoard (<output>/tensorboard)."""
    resume: str = ""
    """Resume from a checkpoint folder, or 'latest' for the newest in <output>/checkpoints."""

    # ---- checks --------------------------------------------------------------------------------
    def problems(self) -> list[str]:
        """Every problem with the values, each naming its field (empty when all is well)."""
        p = []
        if not self.base:
            p.append("base: must name a hub id, a local folder or scratch:<size>")
        if self.method not in METHODS:
            p.append(f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method in ("lora", "qlora") and self.base.startswith("scratch:"):
            p.append(f"method: {self.method} needs pretrained weights; scratch bases train fully (use auto or full)")
        if self.schedule not in SCHEDULES:
            p.append(f"schedule: {self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        if self.mixed_precision not in PRECISIONS:
            p.append(f"mixed_precision: {self.mixed_precision!r} is not one of {', '.join(PRECISIONS)}")
        positive = ("lora_r", "lora_alpha", "decoder_width", "lowlevel_width", "lowlevel_max_side", "min_pixels",
                    "max_pixels", "max_length", "batch_size", "grad_accum", "max_steps", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be > 0, got {getattr(self, name)}")
        non_negative = ("lora_dropout", "ce_weight", "bce_weight", "dice_weight", "aux_weight", "head_lr",
                        "lowlevel_pretrain_steps", "lowlevel_context", "key_token_weight", "fusion_lr", "weight_decay",
                        "warmup_steps", "max_grad_norm", "max_bad_records", "val_samples", "num_workers",
                        "eval_every", "save_every", "task_eval_every", "task_eval_samples")
        for name in non_negative:
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            p.append(f"lr: must be > 0, got {self.lr}")
        if self.lora_dropout >= 1:
            p.append(f"lora_dropout: must be < 1, got {self.lora_dropout}")
        if self.min_pixels > self.max_pixels:
            p.append(f"min_pixels: {self.min_pixels} is above max_pixels {self.max_pixels}")
        if self.warmup_steps >= self.max_steps > 0 and self.warmup_steps > 0:
            p.append(f"warmup_steps: {self.warmup_steps} leaves no steps after warmup (max_steps {self.max_steps})")
        if not self.data:
            p.append("data: give at least one dataset folder (in the recipe or with --data DIR [DIR ...])")
        if self.data_weights and len(self.data_weights) != len(self.data):
            p.append(f"data_weights: {len(self.data_weights)} weight(s) for {len(self.data)} dataset folder(s)")
        if any(w <= 0 for w in self.data_weights):
            p.append("data_weights: every weight must be > 0")
        if self.lowlevel_freeze and not (self.lowlevel_pretrain_steps or self.lowlevel_init):
            p.append("lowlevel_freeze: would hold an untrained LowLevelEncoder fixed; set lowlevel_pretrain_steps > 0 "
                     "or lowlevel_init")
        from loupe_vlm.assistant.modeling import FUSION_SCOPES

        if self.fusion_scope not in FUSION_SCOPES:
            p.append(f"fusion_scope: {self.fusion_scope!r} is not one of {', '.join(FUSION_SCOPES)}")
        if self.mask_prior and self.aux_weight <= 0:
            p.append("mask_prior: the tampering map is an auxiliary head; set aux_weight > 0 too")
        if self.lowlevel_pool_map and self.aux_weight <= 0:
            p.append("lowlevel_pool_map: the tampering map is an auxiliary head; set aux_weight > 0 too")
        if self.evidence_fusion and self.aux_weight <= 0:
            p.append("evidence_fusion: it reads the auxiliary heads; set aux_weight > 0 too")
        if self.evidence_tokens and self.aux_weight <= 0:
            p.append("evidence_tokens: they are read from the auxiliary heads; set aux_weight > 0 too")
        if self.lowlevel_init and not (Path(self.lowlevel_init) / "heads.safetensors").is_file():
            p.append(f"lowlevel_init: {self.lowlevel_init} has no heads.safetensors; give a Loupe checkpoint folder")
        if self.lowlevel_pretrain_steps and self.aux_weight <= 0:
            p.append("lowlevel_pretrain_steps: the LowLevelEncoder is pretrained on the auxiliary labels; "
                     "set aux_weight > 0 too")
        if self.ce_weight == 0 and self.bce_weight == 0 and self.dice_weight == 0:
            p.append("ce_weight: all loss weights are 0; nothing would be learnt")
        return p

    def check(self, source: str | None = None) -> "TrainConfig":
        """Raise one ``ConfigError`` naming every bad field; return self when all is well."""
        problems = self.problems()
        if problems:
            raise ConfigError(problems, source)
        return self

    @property
    def is_scratch(self) -> bool:
        return self.base.startswith("scratch:")

    @property
    def resolved_method(self) -> str:
        """full | lora | qlora, with auto resolved by the base."""
        if self.method != "auto":
            return self.method
        return "full" if self.is_scratch else "lora"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as a YAML recipe (it loads back to the same config)."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------------
# Reading fields: docs, types, coercion
# --------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """The docstring under each ``TrainConfig`` field, read from the source (for --help)."""
    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _is_list(tp: Any) -> bool:
    return typing.get_origin(tp) is list


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML or a CLI string) as type ``tp``; raises ValueError saying what was expected."""
    if _is_list(tp):
        (inner,) = typing.get_args(tp)
        if value is None:
            return []
        if isinstance(value, str):  # "a,b" on the command line
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(name, v, inner) for v in value]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        try:
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return "" if value is None else str(value)
    raise TypeError(f"{name}: unsupported field type {tp}")


def build_config(values: dict[str, Any], source: str | None = None) -> TrainConfig:
    """A checked ``TrainConfig`` from a mapping of field -> value (YAML types or CLI strings)."""
    types_ = _field_types()
    problems = []
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types_:
            problems.append(f"{key}: unknown field; known fields are {', '.join(types_)}")
            continue
        try:
            kwargs[name] = _coerce(name, value, types_[name])
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
    if problems:
        raise ConfigError(problems, source)
    return TrainConfig(**kwargs).check(source)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The raw field -> value mapping of a YAML recipe (checked when built into a TrainConfig)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"config: recipe file {path} not found; see finetune/recipes/ for examples"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"config: not valid YAML ({exc})"], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError(["config: a recipe must be a mapping of field: value"], str(path))
    return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load a YAML recipe, apply overrides (field -> value), check, and return the config."""
    values = load_recipe(path)
    values.update({k.replace("-", "_"): v for k, v in (overrides or {}).items()})
    return build_config(values, str(path))


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def is_list_field(name: str) -> bool:
    return _is_list(_field_types()[name])


def is_bool_field(name: str) -> bool:
    return _field_types()[name] is bool
