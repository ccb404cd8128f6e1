"""``loupe train``: fine-tune a Loupe model from a YAML recipe. One file, read top to bottom:

    main  -> parse the recipe and overrides, then setup -> fit -> finish
    setup -> accelerate, the model (scratch / LoRA / QLoRA), data, optimizer, schedule, resume
    fit   -> the loop: micro-batches, grad accumulation, clipping, logging, validate, save
    validate -> validation loss, token accuracy and mask IoU

Runs on one CPU, one GPU or many (``accelerate launch`` / ``torchrun``: DDP) without code changes.
Resumable checkpoints (``<output>/checkpoints/step-N``) hold the trainable weights, optimizer,
schedule, every process's RNG and the data position, so ``--resume latest`` continues exactly. The
final model is written to ``<output>`` itself as a self-describing checkpoint that
``Assistant.from_pretrained(<output>)`` loads; its ``loupe_config.json`` records the training config
and the hashes of the dataset cards.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from loupe_vlm.assistant.bases import base_family
from loupe_vlm.assistant.modeling import CheckpointError, ExplainableVLM, load_prefixed, new_model
from loupe_vlm.assistant.processing import IGNORE_INDEX, LoupeProcessor

from .config import (ConfigError, TrainConfig, build_config, field_default, field_docs, field_names, flatten, is_bool_field,
                     is_list_field, load_recipe)
from .data import (
    BadRecords,
    Collator,
    DataError,
    LoupeDataset,
    Split,
    card_hashes,
    corpus_texts,
    epoch_batches,
    first_records,
    read_split,
)

logger = logging.getLogger("loupe_vlm.finetune.train")

# Modules kept in full precision under 4-bit QLoRA are the family's ``quant_skip`` (full prefixes: transformers 5
# matches no bare "visual"). The Loupe heads live outside the transformers model, so they are never quantised.

LAUNCH_HELP = """\
launch lines:
  loupe train --config finetune/recipes/tiny-smoke.yaml --data DATASET          # one CPU or GPU
  accelerate launch --num_processes 4 -m loupe_vlm.finetune.train --config R.yaml         # 4 GPUs, DDP
  ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m loupe_vlm.finetune.train ...     # 2 CPU processes
  loupe train --config R.yaml --resume latest                                   # continue a run
  loupe train refit-heads --checkpoint RUN --data Q F --out RUN2                # the heads alone, further
                                                   # (loupe train refit-heads --help)
  loupe train calibrate --checkpoint CKPT --report VAL_EVAL_DIR                 # fit the verdict temperature
                                                   # (loupe train calibrate --help)
  loupe train reference --checkpoint CKPT --data Q/train.jsonl --val Q/val.jsonl  # full-reference readings
                                                   # (loupe train reference --help)
  loupe train noreference --checkpoint CKPT --data Q/train.jsonl --val Q/val.jsonl  # readings of one image
                                                   # (loupe train noreference --help)
  loupe train forensic --checkpoint CKPT --data F/train.jsonl --val F/val.jsonl --work DIR  # forgery maps
                                                   # (loupe train forensic --help)
"""


# ==================================================================================================
# main
# ==================================================================================================

def parse_args(argv: list[str] | None) -> TrainConfig:
    """``--config R.yaml`` plus ``--field value`` overrides -> a checked ``TrainConfig``."""
    parser = argparse.ArgumentParser(
        prog="loupe train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=LAUNCH_HELP,
        description="Fine-tune a Loupe model (LoRA, QLoRA or from scratch) from a YAML recipe. Every recipe "
                    "field can be overridden: --lr 1e-4, --data a b, --gradient-checkpointing.")
    parser.add_argument("--config", help="YAML recipe (see finetune/recipes/); fields not given keep their defaults")
    docs = field_docs()
    for name in field_names():
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": f"{docs.get(name, '')} (default: {field_default(name)!r})".replace("%", "%%")}
        if is_list_field(name):
            kwargs["nargs"] = "+"
        elif is_bool_field(name):
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif name == "resume":
            kwargs.update(nargs="?", const="latest", metavar="CHECKPOINT|latest")
        parser.add_argument(*flags, **kwargs)
    args = vars(parser.parse_args(argv))
    recipe = args.pop("config")
    values = flatten(load_recipe(recipe)) if recipe else {}
    values.update(args)
    return build_config(values, recipe)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``loupe train``; returns a process exit code. ``loupe train refit-heads ...`` trains a
    finished model's heads further (``finetune/heads.py``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["refit-heads"]:
        from loupe_vlm.finetune.heads import main as refit_main

        return refit_main(args[1:])
    if args[:1] == ["reference"]:
        from loupe_vlm.finetune.reference import main as reference_main

        return reference_main(args[1:])
    if args[:1] == ["noreference"]:
        from loupe_vlm.finetune.noreference import main as noreference_main

        return noreference_main(args[1:])
    if args[:1] == ["forensic"]:
        from loupe_vlm.finetune.forensic import main as forensic_main

        return forensic_main(args[1:])
    if args[:1] == ["calibrate"]:
        from loupe_vlm.finetune.calibrate import main as calibrate_main

        return calibrate_main(args[1:])
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = parse_args(argv)
        run = setup(cfg)
        pretrain_lowlevel(run)
        fit(run)
        finish(run)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as exc:
        print(f"loupe train: {exc}", file=sys.stderr)
        return 2
    return 0


# ==================================================================================================
# setup
# ==================================================================================================

@dataclass
class Run:
    """Everything the loop needs, built once by ``setup``."""

    cfg: TrainConfig
    accelerator: Any
    model: Any  # ExplainableVLM, maybe wrapped by DDP
    processor: Any
    lp: LoupeProcessor
    train: Split
    val: Split
    val_ids: list[int]
    optimizer: Any
    scheduler: Any
    bad: BadRecords
    out: Path
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of the current epoch already consumed by this process
    tb: Any = None
    last_val: dict[str, float] | None = None

    @property
    def unwrapped(self) -> ExplainableVLM:
        return self.accelerator.unwrap_model(self.model)


def pick_precision(cfg: TrainConfig) -> str:
    """Mixed precision where the hardware has it: bf16 on GPUs with it, fp16 on older GPUs, none on CPU
    unless bf16 is asked for.

    On the CPU, ``auto`` is full precision, and ``bf16`` is used where the CPU has bf16 instructions
    (AVX512-BF16 or AMX, oneDNN's check): as on a GPU, the frozen base is loaded in bf16 and its products
    run under torch's CPU autocast, while LoRA, the trainable token rows and Loupe's modules stay fp32.
    Measured on such a CPU (loupe-smol's stage 2, 20 steps of 4, 2 threads): the steps alone 74-76 s against
    91-93 s in fp32 (autocast over an fp32 base: 83 s); whole processes 0.79 of the time
    (``benchmarks/train_precision.py``). Elsewhere it warns and trains in full precision."""
    gpu = torch.cuda.is_available() and not cfg.cpu
    if not gpu:
        if cfg.mixed_precision == "bf16":
            if cpu_has_bf16():
                return "bf16"
            logger.warning("mixed_precision bf16 asked for, but this CPU has no bf16 instructions (AVX512-BF16 "
                           "or AMX); training in full precision")
        elif cfg.mixed_precision == "fp16":
            logger.warning("mixed_precision fp16 needs a GPU; training on the CPU in full precision "
                           "(bf16 runs on CPUs that have bf16 instructions)")
        return "no"
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def cpu_has_bf16() -> bool:
    """Whether oneDNN runs bf16 matrix products natively on this CPU (AVX512-BF16 or AMX)."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and check())


def build_model(cfg: TrainConfig, device: torch.device, precision: str) -> tuple[ExplainableVLM, Any]:
    """The model for ``cfg.resolved_method``, with exactly the intended parameters trainable."""
    method = cfg.resolved_method
    loupe_fields = cfg.model_fields()
    if cfg.is_scratch:
        # a new model's tokenizer is trained on the texts it will learn to write
        model, processor = new_model(cfg.base, corpus=corpus_texts(cfg.data), seed=cfg.seed, **loupe_fields)
    else:
        load: dict[str, Any] = {}
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        if method == "qlora":
            from transformers import BitsAndBytesConfig

            load["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=half or torch.float32,
                llm_int8_skip_modules=list(base_family(cfg.base, cfg.trust_remote_code).quant_skip))
            load["device_map"] = {"": device}  # 4-bit weights are placed at load time, not moved later
        elif method == "lora" and half is not None:
            load["dtype"] = half  # frozen base in half precision; LoRA weights and heads stay fp32
        model, processor = new_model(cfg.base, seed=cfg.seed, load_kwargs=load, trust_remote_code=cfg.trust_remote_code,
                                     pretrained_trunk=cfg.image_pretrained, **loupe_fields)
    if method == "full":
        model.requires_grad_(True)
        if cfg.gradient_checkpointing:
            model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model, processor

    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model.vlm = prepare_model_for_kbit_training(
            model.vlm, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        model.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.vlm.enable_input_require_grads()  # so checkpointed blocks see a grad-requiring input under peft
    # LoRA on the language model; the mask token's embedding (and output) row is trained too
    new_rows = [model.config.mask_token_id] + [processor.tokenizer.convert_tokens_to_ids(t)
                                                for t in model.family.new_trainable_tokens]
    model.apply_lora(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target or None,
                     trainable_token_ids=new_rows)
    for name, p in model.vlm.named_parameters():
        role = model.family.module_role(name)
        if (role == "projector" and cfg.train_projector) or (role == "vision" and cfg.train_vision):
            p.requires_grad_(True)
    for _, module in model.head_modules():  # Loupe's own modules train fully
        module.requires_grad_(True)
    if model.image_encoder is not None and not cfg.train_image_trunk:
        model.image_encoder.trunk.requires_grad_(False)
    return model, processor


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at ``step`` of the main loop (see ``lr_curve``)."""
    return lr_curve(step, cfg.warmup_steps, cfg.max_steps, cfg.schedule)


def lr_curve(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup over ``warmup`` steps, then cosine / linear decay to 0 at ``total``, or constant.

    Written out (the same curves as transformers' schedules) because importing
    ``transformers.optimization`` pulls in peft, bitsandbytes and torch.compile: ~12 s per start."""
    if step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(model: ExplainableVLM, cfg: TrainConfig) -> tuple[Any, Any]:
    """AdamW over the trainable parameters (heads may get their own lr) and the warmup + decay schedule."""
    fusion_parts = ("fusion", "fusion_gate")
    heads = {id(p) for name, m in model.head_modules() if name not in fusion_parts for p in m.parameters()}
    if model.image_encoder is not None:  # a pretrained trunk is fine-tuned at the body's lr, not the new heads'
        heads -= {id(p) for p in model.image_encoder.trunk.parameters()}
    if model.heads_trunk is not None:  # so is the heads' own copy of it
        heads -= {id(p) for p in model.heads_trunk.parameters()}
    fusion = {id(p) for name, m in model.head_modules() if name in fusion_parts for p in m.parameters()}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in heads | fusion]
    head = [p for p in model.parameters() if p.requires_grad and id(p) in heads]
    groups = [{"params": body, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr},
              # the fusion map (and its gate) starts at zero: its own lr, and no decay pulling it back
              {"params": [p for p in model.parameters() if id(p) in fusion], "lr": cfg.scratch.fusion_lr or cfg.lr,
               "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, cfg=cfg))
    return optimizer, scheduler


def setup(cfg: TrainConfig) -> Run:
    """Build the accelerator, model, data, optimizer and schedule; restore a checkpoint if resuming."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    precision = pick_precision(cfg)
    # batches without a mask token leave parts of the mask decoder unused: DDP must allow that
    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=precision,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    set_seed(cfg.seed)
    out = Path(cfg.output)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "train_config.yaml")

    model, processor = build_model(cfg, accelerator.device, precision)
    model.config.training = {"config": cfg.to_dict(), "datasets": card_hashes(cfg.data)}
    lp = LoupeProcessor.for_model(model, processor)
    bad = BadRecords(cfg.max_bad_records)
    train = read_split(cfg.data, "train", lp, bad, cfg.max_length)
    val = read_split(cfg.data, "val", lp, bad, cfg.max_length, required=False)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("%s training of %s: %d train / %d val records, %.2fM trainable parameters, precision %s, %d process(es)",
                cfg.resolved_method, cfg.base, len(train.records), len(val.records), n_train / 1e6, precision,
                accelerator.num_processes)

    if cfg.scratch.lowlevel_init:
        load_lowlevel(model, Path(cfg.scratch.lowlevel_init))
    if cfg.scratch.lowlevel_freeze:
        set_lowlevel_frozen(model, True)  # before the optimizer and DDP see the parameters
    optimizer, scheduler = build_optimizer(model, cfg)
    # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
    # once per process), and the DataLoader is sharded by hand so the data position is exact
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(cfg.seed + accelerator.process_index)  # dropout differs per process, reproducibly
    run = Run(cfg, accelerator, model, processor, lp, train, val, first_records(val, cfg.val_samples), optimizer,
              scheduler, bad, out)
    if cfg.resume:
        load_checkpoint(run, resolve_resume(cfg.resume, out))
    if cfg.tensorboard and accelerator.is_main_process:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(["tensorboard: the tensorboard package is not installed (pip install tensorboard)"]) from None
        run.tb = SummaryWriter(str(out / "tensorboard"))
    return run


# ==================================================================================================
# fit
# ==================================================================================================

def loader(run: Run, batches: list[list[int]], split: Split) -> torch.utils.data.DataLoader:
    """A DataLoader over a fixed list of batches (this process's share, from the data position on).

    It gets its own generator: a DataLoader iterator otherwise draws its worker seed from the global
    RNG, and a resumed run (which makes one more iterator) would then see different dropout masks."""
    return torch.utils.data.DataLoader(LoupeDataset(split, run.lp, run.cfg.max_length), batch_sampler=batches,
                                       collate_fn=Collator(run.lp), num_workers=run.cfg.num_workers,
                                       generator=torch.Generator().manual_seed(run.cfg.seed))


def sync_batch(run: Run, batch: Any) -> bool:
    """Count the batch's bad records and say whether to train on it. With several processes, the bad
    counts are summed over all of them and a batch is skipped by all if any process has nothing
    usable, so every process steps, and stops past ``max_bad_records``, together."""
    for item in batch.bad:
        run.bad.add(item, check=False)
    has = batch.data is not None
    if run.accelerator.num_processes > 1:
        local = sum(1 for item in batch.bad if item.kind == "bad")
        flags = run.accelerator.gather(torch.tensor([[int(has), local]], device=run.accelerator.device))
        has = bool(flags[:, 0].min().item())
        run.bad.count += int(flags[:, 1].sum().item()) - local
        if run.bad.count > run.bad.limit and not run.bad.last:
            run.bad.last = "a record seen by another process"
    run.bad.check()
    return has


def load_lowlevel(model: ExplainableVLM, checkpoint: Path) -> None:
    """Start the LowLevelEncoder from another checkpoint's (its heads.safetensors, sizes must match), and
    with ``lowlevel_trunk`` the ImageEncoder trunk its heads read, so that stage 1 of an earlier run of
    the same recipe can be reused as a whole (the trunk would otherwise start from ImageNet).

    A checkpoint whose heads were refitted on their own copy of the trunk (``loupe train refit-heads``)
    brings that copy too: the model gets a ``heads_trunk`` (config.heads_trunk), since those heads were
    trained on it and would misread the trunk the image tokens come from."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(checkpoint / "heads.safetensors"))
        load_prefixed(model.lowlevel, state, "lowlevel.")
        if model.config.lowlevel_trunk:
            load_prefixed(model.image_encoder.trunk, state, "image_encoder.trunk.")
            own = any(k.startswith("heads_trunk.") for k in state)
            if own:
                model.give_heads_own_trunk()
            if model.heads_trunk is not None:  # the heads' own copy, or, from a model without one, the trunk they read
                load_prefixed(model.heads_trunk, state, "heads_trunk." if own else "image_encoder.trunk.")
    except RuntimeError as exc:
        raise ConfigError([f"lowlevel_init: {checkpoint}'s LowLevelEncoder (or trunk) does not match this recipe's "
                           f"(lowlevel_width, aux_weight > 0, image_trunk): {str(exc).splitlines()[0]}"]) from None
    logger.info("LowLevelEncoder initialised from %s", checkpoint)


def set_lowlevel_frozen(model: ExplainableVLM, frozen: bool, train_trunk: bool = True) -> None:
    """Freeze (or unfreeze) the LowLevelEncoder's convolutions and auxiliary heads, and with
    ``lowlevel_trunk`` the ImageEncoder trunk the heads read; its token projection (``to_tokens``) and
    the ImageEncoder's projector always train with the language model. Unfreezing leaves the trunk
    fixed unless ``train_trunk`` (the recipe's train_image_trunk)."""
    for name, p in model.lowlevel.named_parameters():
        if not name.startswith("to_tokens."):
            p.requires_grad_(not frozen)
    if model.config.lowlevel_trunk:
        model.heads_trunk_net.requires_grad_(not frozen and train_trunk)
        if frozen and model.heads_trunk is not None:
            # stage 1's trunk, which the image tokens come from, stays fixed with the heads' own copy,
            # as it does when the heads read it
            model.image_encoder.trunk.requires_grad_(False)


def pretrain_lowlevel(run: Run) -> None:
    """Stage 1 of a new run (``lowlevel_pretrain_steps``): the LowLevelEncoder alone, on the auxiliary
    labels, with its own AdamW at ``lr`` and the run's ``schedule`` over its own steps (warm-up of a tenth
    of them at most, then the decay of the main loop). Only the encoder runs, so a
    step costs a fraction of a full one. With several processes the encoder's gradients are averaged
    by hand (it is outside DDP's bucketed all-reduce here). A run resumed from a checkpoint skips it;
    one killed during it starts it again."""
    cfg, acc = run.cfg, run.accelerator
    if not cfg.scratch.lowlevel_pretrain_steps or run.step > 0 or run.batch > 0 or run.epoch > 0:
        return
    model = run.unwrapped
    set_lowlevel_frozen(model, False, cfg.train_image_trunk)  # trained here by its own optimizer, outside DDP
    params = [p for p in model.lowlevel.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": cfg.lr}]
    if cfg.lowlevel_trunk:  # the heads are new (head_lr); the pretrained trunk they read is fine-tuned at lr
        groups = [{"params": params, "lr": cfg.head_lr or cfg.lr}]
        trunk = [p for p in model.heads_trunk_net.parameters() if p.requires_grad]
        groups.append({"params": trunk, "lr": cfg.lr})
        params = params + trunk
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    warmup = max(1, min(cfg.warmup_steps, cfg.scratch.lowlevel_pretrain_steps // 10))
    # (step + 1): the first step already trains, as it did under the warm-up-then-constant schedule
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_curve(s + 1, warmup, cfg.scratch.lowlevel_pretrain_steps + 1, cfg.schedule))
    bar = tqdm(total=cfg.scratch.lowlevel_pretrain_steps, desc="lowlevel", disable=not acc.is_main_process,
               dynamic_ncols=True)
    model.train()
    step, epoch, total, n = 0, 0, 0.0, 0
    while step < cfg.scratch.lowlevel_pretrain_steps:
        # its own data order (seed + 1): the main loop's plan and position stay untouched
        plan = epoch_batches(run.train, cfg.batch_size, epoch=epoch, seed=cfg.seed + 1,
                             weights=cfg.data_weights or None, bucketing=False,
                             world_size=acc.num_processes)[acc.process_index::acc.num_processes]
        for batch in loader(run, plan, run.train):
            if not sync_batch(run, batch):
                continue
            low = model.encode_lowlevel(batch.data.get("lowlevel_pixels", []))
            loss = model.aux_loss(low, batch.data)
            labelled = loss is not None
            if not labelled:  # no aux labels in this batch: keep every process stepping together
                loss = 0.0 * sum(p.sum() for p in params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if acc.num_processes > 1:
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad = acc.reduce(p.grad, "mean")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            if labelled:
                total, n = total + loss.item(), n + 1
            bar.update(1)
            if (step % cfg.log_every == 0 or step == cfg.scratch.lowlevel_pretrain_steps) and n:
                log_metrics(run, {"step": step, "split": "lowlevel_pretrain", "aux": total / n,
                                  "lr": sched.get_last_lr()[0]})
                bar.set_postfix(aux=f"{total / n:.4f}")
                total, n = 0.0, 0
            if step >= cfg.scratch.lowlevel_pretrain_steps:
                break
        epoch += 1
    bar.close()
    if cfg.scratch.lowlevel_freeze:
        set_lowlevel_frozen(model, True)


def fit(run: Run) -> None:
    """Train until ``max_steps`` optimizer steps, validating and saving on the way."""
    cfg, acc = run.cfg, run.accelerator
    run.model.train()
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", disable=not acc.is_main_process, dynamic_ncols=True)
    sums: dict[str, float] = {}
    micro = 0
    samples = 0
    t0 = time.perf_counter()
    while run.step < cfg.max_steps:
        plan = epoch_batches(run.train, cfg.batch_size, epoch=run.epoch, seed=cfg.seed,
                             weights=cfg.data_weights or None, bucketing=cfg.bucketing,
                             world_size=acc.num_processes)[acc.process_index::acc.num_processes]
        for batch in loader(run, plan[run.batch:], run.train):
            run.batch += 1
            if not sync_batch(run, batch):
                continue
            micro += 1
            last = micro == cfg.grad_accum
            # gradients are all-reduced only on the last micro-batch of a step
            with contextlib.nullcontext() if last else acc.no_sync(run.model):
                with acc.autocast():  # logits at the labelled positions only: the same loss, faster
                    out = run.model(batch.data, scored_only=True)
                acc.backward(out.loss / cfg.grad_accum)
            add_losses(sums, out)
            samples += batch.size
            if not last:
                continue
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            micro = 0
            elapsed = time.perf_counter() - t0
            metrics = step_metrics(run, sums, samples * acc.num_processes / max(elapsed, 1e-9))
            sums, samples = {}, 0
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.1f}")
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                log_metrics(run, metrics)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.max_steps:
                log_metrics(run, validate(run))
            if cfg.task_eval_every and run.step % cfg.task_eval_every == 0 and run.step < cfg.max_steps:
                log_metrics(run, task_eval(run))
            if cfg.save_every and run.step % cfg.save_every == 0:
                save_checkpoint(run)
            t0 = time.perf_counter()  # throughput counts training only, not validation or saving
            if run.step >= cfg.max_steps:
                break
        else:  # the epoch ran out before max_steps
            run.epoch += 1
            run.batch = 0
    bar.close()


def add_losses(sums: dict[str, float], out: Any) -> None:
    """Accumulate one micro-batch's loss parts (mask losses only where the batch had masks)."""
    sums["loss"] = sums.get("loss", 0.0) + out.loss.item()
    sums["ce"] = sums.get("ce", 0.0) + out.ce_loss.item()
    sums["micro"] = sums.get("micro", 0) + 1
    if out.bce_loss is not None:
        sums["bce"] = sums.get("bce", 0.0) + out.bce_loss.item()
        sums["dice"] = sums.get("dice", 0.0) + out.dice_loss.item()
        sums["mask_micro"] = sums.get("mask_micro", 0) + 1
    if out.aux_loss is not None:
        sums["aux"] = sums.get("aux", 0.0) + out.aux_loss.item()
        sums["aux_micro"] = sums.get("aux_micro", 0) + 1


def step_metrics(run: Run, sums: dict[str, float], samples_per_s: float) -> dict[str, Any]:
    """The metrics of one optimizer step, averaged over micro-batches and processes."""
    parts = torch.tensor([sums["loss"], sums["ce"], sums["micro"], sums.get("bce", 0.0), sums.get("dice", 0.0),
                          sums.get("mask_micro", 0), sums.get("aux", 0.0), sums.get("aux_micro", 0)],
                         dtype=torch.float64, device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        parts = run.accelerator.reduce(parts, "sum")
    loss, ce, n, bce, dice, nm, aux, na = parts.tolist()
    metrics = {"step": run.step, "epoch": run.epoch, "loss": loss / n, "ce": ce / n,
               "lr": run.scheduler.get_last_lr()[0], "samples_per_s": samples_per_s, "bad_records": run.bad.count}
    if nm:
        metrics.update(bce=bce / nm, dice=dice / nm,
                       mask=(run.cfg.bce_weight * bce + run.cfg.dice_weight * dice) / nm)
    if na:
        metrics["aux"] = aux / na
    return metrics


def log_metrics(run: Run, metrics: dict[str, Any]) -> None:
    """Append to metrics.jsonl (and TensorBoard) on the main process."""
    if not run.accelerator.is_main_process:
        return
    with (run.out / "metrics.jsonl").open("a") as fh:
        fh.write(json.dumps(metrics) + "\n")
    if run.tb is not None:
        prefix = metrics.get("split", "train")
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                run.tb.add_scalar(f"{prefix}/{key}", value, metrics["step"])


# ==================================================================================================
# validate
# ==================================================================================================

def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> float:
    """IoU of ``logits > 0`` (h, w) against a target mask (H, W), compared at the logits' size."""
    if target.shape != logits.shape:
        target = F.adaptive_avg_pool2d(target[None, None].float(), logits.shape)[0, 0]
    pred, gt = logits > 0, target > 0.5
    union = (pred | gt).sum().item()
    return 1.0 if union == 0 else (pred & gt).sum().item() / union


@torch.no_grad()
def validate(run: Run) -> dict[str, Any]:
    """Validation loss, next-token accuracy on the answer tokens, and mask IoU over ``val_samples`` records."""
    acc = run.accelerator
    model = run.unwrapped  # no DDP collectives inside: processes may get different numbers of batches
    model.eval()
    ids = run.val_ids[acc.process_index::acc.num_processes]
    batches = [ids[i:i + run.cfg.batch_size] for i in range(0, len(ids), run.cfg.batch_size)]
    # loss sum, batches, correct tokens, answer tokens, IoU sum, masks
    sums = torch.zeros(6, dtype=torch.float64, device=acc.device)
    for batch in loader(run, batches, run.val) if batches else []:
        if batch.data is None:
            continue
        with acc.autocast():
            out = model(batch.data, scored_only=True)
        labels = batch.data["labels"].to(out.logits.device)[:, 1:]
        answer = labels != IGNORE_INDEX
        correct = out.logits.argmax(-1) == labels[out.scored]  # the logits of the answer tokens only
        targets = [t for per_row in batch.data["masks"] if per_row is not None for t in per_row]
        ious = [mask_iou(lg.float(), tg.to(lg.device)) for lg, tg in zip(out.mask_logits, targets)]
        sums += torch.tensor([out.loss.item(), 1, correct.sum().item(), answer.sum().item(), sum(ious), len(ious)],
                             dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        sums = acc.reduce(sums, "sum")
    loss, n, correct, tokens, iou, n_masks = sums.tolist()
    model.train()
    result: dict[str, Any] = {"step": run.step, "split": "val", "val_loss": loss / n if n else None,
                              "val_token_accuracy": correct / tokens if tokens else None,
                              "val_mask_iou": iou / n_masks if n_masks else None, "val_records": len(run.val_ids)}
    run.last_val = result
    if acc.is_main_process and n:
        logger.info("step %d: val loss %.4f, token accuracy %.3f, mask IoU %s", run.step, result["val_loss"],
                    result["val_token_accuracy"] or 0.0,
                    "n/a" if result["val_mask_iou"] is None else f"{result['val_mask_iou']:.3f}")
    return result


def task_eval(run: Run) -> dict[str, Any]:
    """The task metrics of ``loupe eval`` (generation through ``Assistant``, the same code as the CLI)
    on the first ``task_eval_samples`` val records of each dataset folder. Runs on the main process."""
    from loupe_vlm.assistant.inference import Assistant

    from .eval import evaluate

    acc, cfg = run.accelerator, run.cfg
    row: dict[str, Any] = {"step": run.step, "split": "task_eval"}
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = run.unwrapped
        assistant = Assistant(model, run.processor, name=f"{cfg.name}@step{run.step}")
        for folder in cfg.data:
            val = Path(folder) / "val.jsonl"
            if not val.is_file() or not val.read_text().strip():
                continue
            with acc.autocast():
                result = evaluate(assistant, val, limit=cfg.task_eval_samples, progress=False)
            for name, item in result["metrics"].items():
                if isinstance(item["value"], (int, float)) and not name.startswith("cost."):
                    row[f"{Path(folder).name}/{name}"] = item["value"]
        model.train()
    acc.wait_for_everyone()
    return row


# ==================================================================================================
# checkpoints
# ==================================================================================================

def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run: Run) -> Path:
    """Write ``checkpoints/step-N``: a loadable Loupe checkpoint plus ``trainer/`` (trainable weights,
    optimizer, schedule, every process's RNG, data position). Written to a temporary name and renamed,
    so a run killed mid-save never leaves a half-written checkpoint behind."""
    from safetensors.torch import save_file

    acc = run.accelerator
    final = run.out / "checkpoints" / f"step-{run.step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "trainer").mkdir(parents=True)
        model = run.unwrapped
        model.save_pretrained(tmp, processor=run.processor)
        keep = resumable_names(model)
        trainable = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if n in keep}
        save_file(trainable, str(tmp / "trainer" / "trainable.safetensors"))
        # optimizer/schedule/RNG states are nested Python containers of tensors: torch.save, read
        # back with weights_only=True (no pickle code execution)
        torch.save(run.optimizer.state_dict(), tmp / "trainer" / "optimizer.pt")
        torch.save(run.scheduler.state_dict(), tmp / "trainer" / "scheduler.pt")
        position = {"step": run.step, "epoch": run.epoch, "batch": run.batch, "bad_records": run.bad.count,
                    "processes": acc.num_processes}
        (tmp / "trainer" / "state.json").write_text(json.dumps(position, indent=2) + "\n")
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / "trainer" / f"rng-{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        old = sorted(p for p in final.parent.glob("step-*") if not p.name.endswith(".tmp"))
        for stale in old[:-run.cfg.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("saved %s", final)
    acc.wait_for_everyone()
    return final


def resolve_resume(resume: str, out: Path) -> Path:
    """``latest`` -> the newest checkpoint under ``<out>/checkpoints``; otherwise the folder given."""
    if resume == "latest":
        found = sorted(p for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
        if not found:
            raise CheckpointError(f"{out / 'checkpoints'}: no checkpoint to resume from; start without --resume")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer" / "state.json").is_file():
        raise CheckpointError(f"{path}: not a resumable checkpoint (no trainer/state.json); pass a "
                              "<output>/checkpoints/step-N folder or 'latest'")
    return path


def resumable_names(model: ExplainableVLM) -> set[str]:
    """Parameters a checkpoint must carry to resume: the trainable ones, plus the whole LowLevelEncoder,
    which may be frozen after its pretraining stage yet cannot be rebuilt from the base, and with
    ``lowlevel_trunk`` the ImageEncoder trunk that stage fine-tuned (frozen after it, and not the
    pretrained weights a resumed run would rebuild: a run resumed without it read ImageNet features
    through heads trained on the fine-tuned ones, and its verdicts fell to chance)."""
    frozen_trained = ("lowlevel.", "image_encoder.trunk.", "heads_trunk.") if model.config.lowlevel_trunk else ("lowlevel.",)
    return {n for n, p in model.named_parameters() if p.requires_grad or n.startswith(frozen_trained)}


def load_checkpoint(run: Run, path: Path) -> None:
    """Restore trainable weights, optimizer, schedule, RNG and data position from ``path``."""
    from safetensors.torch import load_file

    trainer = path / "trainer"
    position = json.loads((trainer / "state.json").read_text())
    if position["processes"] != run.accelerator.num_processes:
        raise CheckpointError(f"{path}: saved with {position['processes']} process(es) but resuming with "
                              f"{run.accelerator.num_processes}; the data position would not match")
    weights = load_file(str(trainer / "trainable.safetensors"))
    params = dict(run.unwrapped.named_parameters())
    expected = resumable_names(run.unwrapped)
    if set(weights) != expected:
        diff = sorted(expected ^ set(weights))[:5]
        raise CheckpointError(f"{path}: its trainable parameters differ from this config's (e.g. {diff}); "
                              "resume with the recipe that made it")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    run.optimizer.load_state_dict(torch.load(trainer / "optimizer.pt", weights_only=True))
    run.scheduler.load_state_dict(torch.load(trainer / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(trainer / f"rng-{run.accelerator.process_index}.pt", weights_only=True))
    run.step, run.epoch, run.batch = position["step"], position["epoch"], position["batch"]
    run.bad.count = position["bad_records"]
    # metrics after the checkpoint belong to the interrupted run; the resumed run writes them again
    metrics = run.out / "metrics.jsonl"
    if run.accelerator.is_main_process and metrics.is_file():
        keep = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= run.step]
        metrics.write_text("".join(line + "\n" for line in keep))
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", path, run.step, run.epoch, run.batch)


# ==================================================================================================
# finish
# ==================================================================================================

def finish(run: Run) -> Path:
    """Validate, save the final self-describing checkpoint to ``<output>``, and plot the losses."""
    val = validate(run)
    log_metrics(run, val)
    if run.cfg.task_eval_every:
        log_metrics(run, task_eval(run))
    acc = run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = run.unwrapped
        model.config.training.update(steps=run.step, bad_records=run.bad.count, skipped_too_long=run.bad.too_long,
                                     train_records=len(run.train.records), processes=acc.num_processes,
                                     final_val={k: v for k, v in val.items() if k.startswith("val_")})
        model.save_pretrained(run.out, processor=run.processor)
        plot_losses(run.out / "metrics.jsonl", run.out / "loss.png")
        if run.tb is not None:
            run.tb.close()
        logger.info("final model: %s (load it with Assistant.from_pretrained(%r))", run.out, str(run.out))
    acc.wait_for_everyone()
    return run.out


def plot_losses(metrics_path: Path, png: Path) -> None:
    """Loss curves (train loss, CE, mask loss, validation loss) from metrics.jsonl as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [r for r in rows if "split" not in r]
    val = [r for r in rows if r.get("split") == "val" and r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train loss"), ("ce", "token CE"), ("mask", "mask loss (BCE + Dice, weighted)")):
        pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
