"""``loupe train refit-heads``: train a finished model's auxiliary heads further, on their own copy of the trunk.

A recipe's stage 1 (``scratch.lowlevel_pretrain_steps``) trains the heads together with the pretrained
trunk that also gives the image tokens, then freezes both, because the language model is trained next
on those tokens. To train the heads further afterwards without moving anything the language model
reads, this gives them their own copy of the trunk (``heads_trunk`` in the model's config), starting
from the trunk they read, and fine-tunes that copy and the heads on the builders' labels: distortion
categories, severity, the tampered bit and the tampering map, plus (``--category-weight``) a softmax
cross-entropy over the category of single-distortion images. The LowLevelEncoder's convolutions (the
language model's low-level tokens), the ImageEncoder, the adapter, the fusion map and the mask decoder
stay as they are. The heads reach the answers through the evidence tokens, the fusion bias, the mask
prior and evidence guidance, so better heads change the answers without retraining the language model.

The result is a full checkpoint in ``--out`` (export it with ``loupe export``). Every ``--save-every``
steps the trained weights and the step are saved under ``--out/refit/`` (safetensors and JSON); a run
started again with the same ``--out`` continues from there (the optimizer's moments start afresh).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from loupe_vlm.assistant.modeling import CheckpointError, ExplainableVLM, lowlevel_aux_loss
from loupe_vlm.assistant.processing import AUX_CATEGORIES, LoupeProcessor
from loupe_vlm.finetune.data import BadRecords, Collator, DataError, LoupeDataset, epoch_batches, read_split
from loupe_vlm.finetune.metrics import roc_auc

logger = logging.getLogger("loupe_vlm.finetune.heads")

HEAD_PARTS = ("aux_head", "aux_dense", "aux_deep", "aux_trunk")
"""The LowLevelEncoder's auxiliary heads: the parts trained here besides the heads' trunk."""

N_CAT = len(AUX_CATEGORIES)


def prepare(model: ExplainableVLM) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """Give ``model`` its heads' own trunk (a copy of the one they read) if it has none, freeze everything
    else, and return the trainable groups: ("trunk", ...) and ("heads", ...)."""
    if not model.config.lowlevel_trunk or model.image_encoder is None:
        raise CheckpointError("refit-heads: this model's heads do not read a pretrained trunk (lowlevel_trunk); "
                              "there is no trunk to give them. Train its LowLevelEncoder with the recipe instead")
    model.give_heads_own_trunk()
    model.requires_grad_(False)
    heads = [p for name in HEAD_PARTS if getattr(model.lowlevel, name, None) is not None
             for p in getattr(model.lowlevel, name).parameters()]
    trunk = list(model.heads_trunk.parameters())
    for p in heads + trunk:
        p.requires_grad_(True)
    return [("trunk", trunk), ("heads", heads)]


def heads_out(model: ExplainableVLM, images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The heads' (logits, tampering map) per image; the trunk runs once per group of same-sized images."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for k, img in enumerate(images):
        by_shape.setdefault(tuple(img.shape), []).append(k)
    feats: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for ks in by_shape.values():
        x = torch.stack([images[k] for k in ks]).to(model.device)
        pooled, dense = model.heads_trunk(x.contiguous(memory_format=torch.channels_last))
        feats.update({k: (pooled[j], dense[j]) for j, k in enumerate(ks)})
    return [model.lowlevel(img.to(model.device), feats[k])[2] for k, img in enumerate(images)]


def category_ce(outs: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor) -> torch.Tensor | None:
    """Softmax cross-entropy over the categories of the images with exactly one distortion category."""
    cats = targets[:, :N_CAT]
    one = ~torch.isnan(cats).any(1) & (torch.nan_to_num(cats).sum(1) == 1)
    if not bool(one.any()):
        return None
    logits = torch.stack([o[0][:N_CAT] for o in outs])[one.to(outs[0][0].device)]
    return F.cross_entropy(logits, cats[one].argmax(1).to(logits.device))


@torch.no_grad()
def validate(model: ExplainableVLM, images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The heads alone on (image, labels) pairs: category top-1 among the true categories of distorted
    images, clean images with no category above 0.5, and the tampered bit's accuracy at 0.5 and AUC."""
    hit = n_cat = clean_ok = n_clean = 0
    p_t, y_t = [], []
    for img, y in images:
        logits = heads_out(model, [img])[0][0].float().sigmoid().cpu()
        cats = y[:N_CAT]
        if not torch.isnan(cats).any():
            if cats.sum() > 0:
                n_cat += 1
                hit += int(cats[int(logits[:N_CAT].argmax())] == 1)
            else:
                n_clean += 1
                clean_ok += int(logits[:N_CAT].max() < 0.5)
        if not torch.isnan(y[-1]):
            p_t.append(float(logits[-1]))
            y_t.append(int(y[-1]))
    out: dict[str, Any] = {"category_top1": hit / n_cat if n_cat else None, "n_distorted": n_cat,
                           "clean": clean_ok / n_clean if n_clean else None, "n_clean": n_clean}
    if y_t:
        out.update({"tampered_accuracy": sum((p >= 0.5) == bool(t) for p, t in zip(p_t, y_t)) / len(y_t),
                    "tampered_auc": roc_auc(y_t, p_t) if 0 < sum(y_t) < len(y_t) else None, "n_forgery": len(y_t)})
    return out


def val_images(split: Any, lp: LoupeProcessor, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``limit`` labelled images of each dataset folder's val split (a bad record is skipped)."""
    out = []
    for ix in split.by_source:
        got = 0
        for i in ix:
            if got >= limit:
                break
            rec = split.records[i]
            try:
                enc = lp.encode_sample(rec.sample, rec.root, train=False)
            except (ValueError, OSError) as exc:
                logger.warning("%s: skipped in validation (%s)", rec.where, exc)
                continue
            for img, y in zip(enc.lowlevel_pixels, enc.aux):
                if not torch.isnan(y).all() and got < limit:
                    out.append((img, y))
                    got += 1
    return out


def save_state(model: ExplainableVLM, where: Path, step: int) -> None:
    from safetensors.torch import save_file

    where.mkdir(parents=True, exist_ok=True)
    state = {f"heads_trunk.{k}": v for k, v in model.heads_trunk.state_dict().items()}
    state.update({f"lowlevel.{k}": v for k, v in model.lowlevel.state_dict().items() if k.startswith(HEAD_PARTS)})
    tmp = where / "weights.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    tmp.replace(where / "weights.safetensors")  # the weights first, then the step that names them
    (where / "state.tmp").write_text(json.dumps({"step": step}))
    (where / "state.tmp").replace(where / "state.json")


def load_state(model: ExplainableVLM, where: Path) -> int:
    from safetensors.torch import load_file

    if not (where / "state.json").is_file():
        return 0
    state = load_file(str(where / "weights.safetensors"))
    model.heads_trunk.load_state_dict({k[len("heads_trunk."):]: v for k, v in state.items()
                                       if k.startswith("heads_trunk.")})
    model.lowlevel.load_state_dict({k[len("lowlevel."):]: v for k, v in state.items() if k.startswith("lowlevel.")},
                                   strict=False)
    return int(json.loads((where / "state.json").read_text())["step"])


def refit(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model, processor = ExplainableVLM.from_pretrained(args.checkpoint)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    lp = LoupeProcessor.for_model(model, processor)
    groups = prepare(model)
    # the heads' trunk in channels-last layout while it trains (the same float32 arithmetic in the layout
    # oneDNN's convolutions prefer: 1.0 -> 0.7 s a step of 8 on 2 cores, the same losses; the trunk's part
    # alone 1.56x, benchmarks/train_layout.py), back to the usual layout before it is saved
    model.heads_trunk.to(memory_format=torch.channels_last)
    bad = BadRecords(args.max_bad_records)
    train = read_split(args.data, "train", lp, bad, max_length=10 ** 9)
    val = val_images(read_split(args.data, "val", lp, bad, max_length=10 ** 9, required=False), lp, args.val_limit)
    out = Path(args.out)
    start = load_state(model, out / "refit")
    if start:
        logger.info("refit-heads: continuing from step %d (%s)", start, out / "refit")
    opt = torch.optim.AdamW([{"params": groups[0][1], "lr": args.lr}, {"params": groups[1][1], "lr": args.head_lr}],
                            weight_decay=0.0)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 0 at --steps
        return min(1.0, (step + 1) / max(1, args.warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: factor(s + start))
    before = validate(model, val) if val and not start else None
    if before:
        logger.info("refit-heads: before: %s", before)
    dataset, collate = LoupeDataset(train, lp, max_length=10 ** 9), Collator(lp)
    params = groups[0][1] + groups[1][1]
    model.train()
    bar = tqdm(total=args.steps, initial=start, desc="refit-heads", disable=args.no_progress, dynamic_ncols=True)
    step, epoch, seen, running, t0 = start, 0, 0, [], time.perf_counter()
    while step < args.steps:
        for ix in epoch_batches(train, args.batch_size, epoch=epoch, seed=args.seed, weights=args.data_weights or None,
                                bucketing=False):
            if step >= args.steps:
                break
            seen += 1
            if seen <= start:  # a continued run goes on from where the data order stood (about)
                continue
            batch = collate([dataset[i] for i in ix])
            for item in batch.bad:
                bad.add(item)
            if batch.data is None or batch.data.get("aux") is None:
                continue
            images = batch.data["lowlevel_pixels"]
            outs = heads_out(model, images)
            loss = lowlevel_aux_loss(outs, batch.data["aux"], batch.data.get("aux_mask") or [])
            ce = category_ce(outs, batch.data["aux"]) if args.category_weight else None
            if ce is not None:
                loss = ce * args.category_weight if loss is None else loss + ce * args.category_weight
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            step += 1
            running.append(float(loss.detach()))
            bar.update(1)
            if step % 25 == 0:
                bar.set_postfix(loss=f"{sum(running) / len(running):.4f}")
                logger.info("refit-heads: step %d loss %.4f (%.1f s a step)", step, sum(running) / len(running),
                            (time.perf_counter() - t0) / len(running))
                running, t0 = [], time.perf_counter()
            if step % args.save_every == 0 and step < args.steps:
                save_state(model, out / "refit", step)
        epoch += 1
    bar.close()
    model.eval()
    model.heads_trunk.to(memory_format=torch.contiguous_format)
    after = validate(model, val) if val else None
    logger.info("refit-heads: after %d steps: %s", args.steps, after)
    settings = json.loads(json.dumps(vars(args), default=str))  # paths as text
    model.config.training = {**model.config.training,
                             "refit_heads": {"from": str(args.checkpoint), "settings": settings,
                                             "val_before": before, "val_after": after}}
    model.save_pretrained(out, processor=processor)
    save_state(model, out / "refit", args.steps)
    return {"out": str(out), "val_before": before, "val_after": after, "skipped_records": bad.count}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loupe train refit-heads", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, required=True, help="a trained Loupe checkpoint (run output or export)")
    p.add_argument("--data", nargs="+", type=Path, required=True, help="dataset folders (train.jsonl, val.jsonl)")
    p.add_argument("--data-weights", nargs="*", type=float, default=[], help="mixture weights, one per folder")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint folder (resumed if it holds a run)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default: 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="records per step (default: 8)")
    p.add_argument("--lr", type=float, default=3e-4, help="peak lr of the heads' trunk (default: 3e-4)")
    p.add_argument("--head-lr", type=float, default=1e-3, help="peak lr of the heads (default: 1e-3)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps (default: 50)")
    p.add_argument("--category-weight", type=float, default=1.0,
                   help="weight of the softmax category loss on single-distortion images (default: 1; 0 off)")
    p.add_argument("--val-limit", type=int, default=200, help="validation images per dataset folder (default: 200)")
    p.add_argument("--save-every", type=int, default=100, help="save the trained weights every N steps (default: 100)")
    p.add_argument("--max-bad-records", type=int, default=100, help="stop after this many unusable records")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    problems = [f"--{k.replace('_', '-')}: must be > 0" for k in ("steps", "batch_size", "save_every")
                if getattr(args, k) <= 0]
    if args.data_weights and len(args.data_weights) != len(args.data):
        problems.append(f"--data-weights: {len(args.data_weights)} weights for {len(args.data)} folders")
    if problems:
        p.error("; ".join(problems))
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        print(json.dumps(refit(args), indent=1))
    except (CheckpointError, DataError, FileNotFoundError) as exc:
        print(f"loupe train refit-heads: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
