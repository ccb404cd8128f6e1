"""Training configuration: the ``TrainConfig`` dataclass, YAML recipes and ``--key value`` overrides.

A recipe (``finetune/recipes/*.yaml``) maps one-to-one onto ``TrainConfig``'s fields; any field can
be overridden on the command line (``--lr 1e-4``, ``--data a b``, ``--gradient-checkpointing``).
``TrainConfig`` extends the model's own ``ModelOptions`` (the fields a checkpoint's ``LoupeConfig``
shares, with their checks), so neither repeats the other; the knobs of from-scratch models sit in
their own group, ``scratch:`` in a recipe and ``--scratch.NAME`` on the command line.
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

from loupe_vlm.assistant.modeling import ModelOptions, ScratchOptions

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
class ScratchTrainOptions(ScratchOptions):
    """The from-scratch group of a recipe: the model's ``ScratchOptions`` plus how to train them."""

    fusion_lr: float = 0.0
    """Learning rate of the evidence-fusion map (0: lr). It has no weight decay."""
    lowlevel_pretrain_steps: int = 0
    """Before the main loop of a new run, train the LowLevelEncoder alone on the auxiliary labels
    for N steps (no language model, so each step is cheap): the language model then starts from a
    branch that already sees. Needs aux_weight > 0. A run resumed from a checkpoint skips it."""
    lowlevel_init: str = ""
    """A Loupe checkpoint folder whose LowLevelEncoder (heads.safetensors, same width and aux heads)
    this run starts from, e.g. one pretrained by an earlier run; then lowlevel_freeze may be used
    without lowlevel_pretrain_steps."""
    lowlevel_freeze: bool = False
    """Keep the LowLevelEncoder's convolutions and auxiliary heads fixed in the main loop (its token
    projection still trains): the language-model loss then cannot wash out what pretraining taught."""

    def model_options(self) -> ScratchOptions:
        """The part of the group the model itself keeps (the checkpoint's ``scratch``)."""
        return ScratchOptions(**{f.name: getattr(self, f.name) for f in fields(ScratchOptions)})

    def problems(self, aux_weight: float) -> list[str]:
        p = super().problems(aux_weight)
        for name in ("fusion_lr", "lowlevel_pretrain_steps"):
            if getattr(self, name) < 0:
                p.append(f"scratch.{name}: must be >= 0, got {getattr(self, name)}")
        if self.lowlevel_freeze and not (self.lowlevel_pretrain_steps or self.lowlevel_init):
            p.append("scratch.lowlevel_freeze: would hold an untrained LowLevelEncoder fixed; set "
                     "scratch.lowlevel_pretrain_steps > 0 or scratch.lowlevel_init")
        if self.lowlevel_init and not (Path(self.lowlevel_init) / "heads.safetensors").is_file():
            p.append(f"scratch.lowlevel_init: {self.lowlevel_init} has no heads.safetensors; give a Loupe "
                     "checkpoint folder")
        if self.lowlevel_pretrain_steps and aux_weight <= 0:
            p.append("scratch.lowlevel_pretrain_steps: the LowLevelEncoder is pretrained on the auxiliary labels; "
                     "set aux_weight > 0 too")
        return p


@dataclass
class TrainConfig(ModelOptions):
    """Everything one training run needs. Recipes set these fields; the CLI overrides them.

    The model's fields (name, widths, pixel budget, loss weights) come from ``ModelOptions``."""

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
    lora_target: str = ""
    """Regex of the modules that get LoRA adapters (empty: the base family's default, its language
    model's linear layers only)."""
    train_vision: bool = False
    """Also train the vision tower (LoRA/QLoRA runs; full runs train everything)."""
    train_projector: bool = False
    """Also train the vision-language projector (the vision tower's merger)."""
    trust_remote_code: bool = False
    """Allow the base's own Python code to run (off unless you trust the base)."""
    image_pretrained: bool = True
    """Text-only LM bases: start the ImageEncoder's trunk from its pretrained weights (false: random init)."""
    train_image_trunk: bool = True
    """Text-only LM bases: fine-tune the ImageEncoder's trunk (false: keep it fixed; its projector trains)."""
    scratch: ScratchTrainOptions = field(default_factory=ScratchTrainOptions)
    """Knobs that make a small model read the image (loupe-tiny, loupe-smol); see ScratchTrainOptions.
    Off by default."""

    # ---- data ----------------------------------------------------------------------------------
    data: list[str] = field(default_factory=list)
    """Dataset folders (train.jsonl, val.jsonl, images/, masks/, card.md), as `loupe build-data` writes."""
    data_weights: list[float] = field(default_factory=list)
    """Mixing weight of each dataset folder (empty: by size). An epoch draws records in these proportions."""
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
    """Learning rate of the LowLevelEncoder, MaskDecoder and ImageEncoder projector (0: same as lr); a
    pretrained ImageEncoder trunk trains at lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "cosine"
    """Learning-rate schedule after warmup: cosine | linear | constant."""
    warmup_steps: int = 0
    """Linear warmup steps."""
    max_steps: int = 1000
    """Optimizer steps to train for. 0 with ``scratch.lowlevel_pretrain_steps``: stage 1 alone (the heads and
    their trunk), saved as a checkpoint for ``loupe train refit-heads`` and a later ``scratch.lowlevel_init``."""
    batch_size: int = 4
    """Records per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum x processes)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0: off)."""
    mixed_precision: str = "auto"
    """auto | no | bf16 | fp16. auto: bf16 on GPUs that have it, fp16 on older GPUs, none on CPU. On a CPU,
    bf16 is used where the CPU has bf16 instructions (AVX512-BF16 or AMX): the frozen base in bf16, what trains
    in fp32, about 0.8 of the step time for loupe-smol's stage 2; elsewhere it falls back to full precision."""
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
        """Every problem with the values, each naming its field (empty when all is well). The model's
        fields and the scratch group are checked by ``ModelOptions.model_problems``."""
        p = self.model_problems()
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
        positive = ("lora_r", "lora_alpha", "max_length", "batch_size", "grad_accum", "log_every", "keep_last")
        for name in positive:
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.scratch.lowlevel_pretrain_steps):
            p.append(f"max_steps: must be > 0, got {self.max_steps} (0 runs stage 1 alone, and needs "
                     "scratch.lowlevel_pretrain_steps > 0)")
        non_negative = ("lora_dropout", "head_lr", "weight_decay", "warmup_steps", "max_grad_norm", "max_bad_records",
                        "val_samples", "num_workers", "eval_every", "save_every", "task_eval_every",
                        "task_eval_samples")
        for name in non_negative:
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0:
            p.append(f"lr: must be > 0, got {self.lr}")
        if self.lora_dropout >= 1:
            p.append(f"lora_dropout: must be < 1, got {self.lora_dropout}")
        if self.warmup_steps >= self.max_steps > 0 and self.warmup_steps > 0:
            p.append(f"warmup_steps: {self.warmup_steps} leaves no steps after warmup (max_steps {self.max_steps})")
        if not self.data:
            p.append("data: give at least one dataset folder (in the recipe or with --data DIR [DIR ...])")
        if self.data_weights and len(self.data_weights) != len(self.data):
            p.append(f"data_weights: {len(self.data_weights)} weight(s) for {len(self.data)} dataset folder(s)")
        if any(w <= 0 for w in self.data_weights):
            p.append("data_weights: every weight must be > 0")
        return p

    def model_fields(self) -> dict[str, Any]:
        """The ``ModelOptions`` fields of this run, as ``new_model`` takes them (with ``scratch``)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(ModelOptions)}
        out["scratch"] = self.scratch.model_options()
        return out

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

GROUP = "scratch"  # the one nested group: ``scratch.NAME`` in flat form


def _class_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of ``cls`` itself, read from its source."""
    tree = ast.parse(inspect.getsource(cls).lstrip())
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


@lru_cache(maxsize=1)
def field_docs() -> dict[str, str]:
    """The docstring under each ``TrainConfig`` field (flat names, ``scratch.NAME`` for the group), for --help."""
    docs: dict[str, str] = {}
    for cls in reversed(TrainConfig.__mro__[:-1]):
        docs.update(_class_docs(cls))
    for cls in reversed(ScratchTrainOptions.__mro__[:-1]):
        docs.update({f"{GROUP}.{k}": v for k, v in _class_docs(cls).items()})
    docs.pop(GROUP, None)
    return docs


@lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    """Flat field name -> type: TrainConfig's fields and the group's as ``scratch.NAME``."""
    types_ = {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != GROUP}
    types_.update({f"{GROUP}.{k}": v for k, v in typing.get_type_hints(ScratchTrainOptions).items()})
    return types_


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


def flatten(values: dict[str, Any]) -> dict[str, Any]:
    """A recipe mapping with its ``scratch:`` mapping spelled flat (``scratch.NAME``); dashes become underscores.
    A group field given at the top level (as recipes wrote them before the group) is read into the group."""
    out: dict[str, Any] = {}
    group_fields = {f.name for f in fields(ScratchTrainOptions)}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == GROUP and isinstance(value, dict):
            out.update({f"{GROUP}.{k.replace('-', '_')}": v for k, v in value.items()})
        elif name in group_fields:
            out[f"{GROUP}.{name}"] = value
        else:
            out[name] = value
    return out


def build_config(values: dict[str, Any], source: str | None = None) -> TrainConfig:
    """A checked ``TrainConfig`` from a mapping of field -> value (YAML types or CLI strings)."""
    types_ = _field_types()
    problems = []
    kwargs: dict[str, Any] = {}
    group: dict[str, Any] = {}
    for name, value in flatten(values).items():
        if name == GROUP:
            problems.append(f"{GROUP}: must be a mapping of field: value (see ScratchTrainOptions)")
            continue
        if name not in types_:
            problems.append(f"{name}: unknown field; known fields are {', '.join(types_)}")
            continue
        try:
            coerced = _coerce(name, value, types_[name])
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if name.startswith(GROUP + "."):
            group[name[len(GROUP) + 1:]] = coerced
        else:
            kwargs[name] = coerced
    if problems:
        raise ConfigError(problems, source)
    return TrainConfig(**kwargs, scratch=ScratchTrainOptions(**group)).check(source)


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
    values = flatten(load_recipe(path))
    values.update(flatten(overrides or {}))
    return build_config(values, str(path))


def field_names() -> list[str]:
    """Every field in flat form, the group's as ``scratch.NAME``."""
    return list(_field_types())


def field_default(name: str) -> Any:
    """The default value of a flat field name."""
    cls, key = (ScratchTrainOptions, name[len(GROUP) + 1:]) if name.startswith(GROUP + ".") else (TrainConfig, name)
    f = next(f for f in fields(cls) if f.name == key)
    return f.default_factory() if callable(f.default_factory) else f.default


def is_list_field(name: str) -> bool:
    return _is_list(_field_types()[name])


def is_bool_field(name: str) -> bool:
    return _field_types()[name] is bool
