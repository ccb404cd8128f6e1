"""How well can the LowLevelEncoder see, trained alone on the builders' labels?

A diagnostic for the forensic branch, with no language model: a fresh ``LowLevelEncoder`` with its
auxiliary heads is trained for a few minutes on the images of a quality and/or a forgery dataset
(labels from ``Sample.meta``, as ``aux_labels`` reads them), then measured on the val split:

* distortion-category top-1 on single-distortion images, clean images called clean, severity MAE;
* tampered-vs-authentic AUC and accuracy at 0.5, pixel-F1 of the tampering map at 0.5.

It bounds what the full model can say: if the branch alone cannot tell blur from noise, the
language model reading its tokens cannot either. Run with one thread on this 2-core machine:

    OMP_NUM_THREADS=1 python benchmarks/lowlevel_probe.py --quality data/loupe-tiny/quality \\
        --forgery data/loupe-tiny/forgery --minutes 5
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loupe_vlm.assistant.modeling import ExplainableVLM, LowLevelEncoder, lowlevel_aux_loss  # noqa: E402
from loupe_vlm.assistant.processing import AUX_DIM, aux_labels, load_image, load_mask, to_lowlevel_tensor  # noqa: E402
from loupe_vlm.finetune.metrics import roc_auc  # noqa: E402
from loupe_vlm.prompts import load_jsonl  # noqa: E402


def items(root: Path | None, split: str, side: int, limit: int | None = None) -> list[tuple]:
    """(image tensor, aux labels, tampered map or None) per image of a split, loaded once."""
    if root is None:
        return []
    out = []
    for s in load_jsonl(root / f"{split}.jsonl")[:limit]:
        y = aux_labels(s)
        for i, rel in enumerate(s.images):
            if torch.isnan(y[i]).all():
                continue
            img = to_lowlevel_tensor(load_image(root / rel), side)
            target = None
            if s.task.startswith("forgery."):
                h, w = img.shape[-2:]
                target = torch.zeros(h, w)
                for m in s.masks:
                    target = torch.maximum(target, torch.from_numpy(load_mask(root / m, (w, h))).float())
            out.append((img, y[i], target))
    return out


def loss_of(enc: LowLevelEncoder, batch: list[tuple]) -> torch.Tensor:
    outs = []
    for img, _, _ in batch:
        outs.append(enc(img)[2])
    return lowlevel_aux_loss(outs, torch.stack([y for _, y, _ in batch]), [t for _, _, t in batch])


@torch.no_grad()
def measure(enc: LowLevelEncoder, data: list[tuple], model: ExplainableVLM | None = None) -> dict[str, float]:
    """The heads' figures on ``data``; with ``model`` (a checkpoint's), through ``encode_lowlevel``, so a
    branch that also reads the ImageEncoder's trunk (lowlevel_trunk) gets its features."""
    enc.eval()
    hit = single = clean_ok = clean = 0
    sev, tam_y, tam_p, f1s = [], [], [], []
    for img, y, target in data:
        logits, dense = enc(img)[2] if model is None else model.encode_lowlevel([img]).aux[0]
        if not torch.isnan(y[0]):
            cats = y[:-2]
            if cats.sum() == 1:
                single += 1
                hit += int(logits[:-2].argmax() == cats.argmax())
            elif cats.sum() == 0:
                clean += 1
                clean_ok += int(logits[:-2].sigmoid().max() < 0.5)
            sev.append(abs(float(logits[-2].sigmoid() - y[-2])) * 5)
        if not torch.isnan(y[-1]):
            tam_y.append(bool(y[-1]))
            tam_p.append(float(logits[-1].sigmoid()))
            if y[-1] == 1 and target is not None:
                t = torch.nn.functional.adaptive_avg_pool2d(target[None, None], dense.shape)[0, 0] > 0.5
                p = dense.sigmoid() > 0.5
                tp = float((p & t).sum())
                f1s.append(2 * tp / max(float(p.sum() + t.sum()), 1.0))
    enc.train()
    out: dict[str, float] = {}
    if single:
        out.update(category_top1=hit / single, single_images=single)
    if clean:
        out["clean_called_clean"] = clean_ok / clean
    if sev:
        out["severity_mae"] = float(np.mean(sev))
    if tam_y:
        out.update(tampered_auc=roc_auc(tam_y, tam_p) or float("nan"),
                   tampered_acc=float(np.mean([(p > 0.5) == t for p, t in zip(tam_p, tam_y)])))
    if f1s:
        out["pixel_f1"] = float(np.mean(f1s))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", type=Path, help="a quality dataset folder (from loupe build-data quality)")
    p.add_argument("--forgery", type=Path, help="a forgery dataset folder (from loupe build-data forgery)")
    p.add_argument("--side", type=int, default=192, help="long side the encoder sees (loupe-tiny: 192)")
    p.add_argument("--width", type=int, default=32, help="encoder width (loupe-tiny: 32)")
    p.add_argument("--context", type=int, default=0, help="dilated context convs at 1/4 resolution")
    p.add_argument("--pool-map", action="store_true", help="image-level heads also read the tampering map's peak")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-limit", type=int, default=3000, help="records read from each train split")
    p.add_argument("--val-limit", type=int, default=300, help="records read from each measured split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="val", choices=("val", "test"), help="the split measured")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="measure this Loupe checkpoint's LowLevelEncoder (trained with aux_weight > 0) "
                        "instead of training a fresh one; --side and --width come from it")
    args = p.parse_args(argv)
    if args.quality is None and args.forgery is None:
        p.error("give --quality and/or --forgery")
    torch.manual_seed(args.seed)
    enc = model = None
    if args.checkpoint is not None:
        model, _ = ExplainableVLM.from_pretrained(args.checkpoint)
        model.eval()
        if model.config.aux_weight <= 0:
            p.error(f"{args.checkpoint}: was trained without auxiliary heads (aux_weight 0); nothing to measure")
        enc = model.lowlevel
        cfg = model.config
        args.side, args.minutes = cfg.lowlevel_max_side, 0.0
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    train = [] if enc is not None else (items(args.quality, "train", args.side, args.train_limit) +
                                        items(args.forgery, "train", args.side, args.train_limit))
    val = (items(args.quality, args.split, args.side, args.val_limit) +
           items(args.forgery, args.split, args.side, args.val_limit))
    print(f"loaded {len(train)} train / {len(val)} {args.split} images in {time.perf_counter() - t0:.0f} s", flush=True)
    if enc is None:
        enc = LowLevelEncoder(64, args.width, 4, AUX_DIM, context=args.context, pool_map=args.pool_map)
    opt = torch.optim.AdamW(enc.parameters(), lr=args.lr, weight_decay=0.01)
    start, step, report = time.perf_counter(), 0, 60.0
    while time.perf_counter() - start < args.minutes * 60:
        loss = loss_of(enc, rng.sample(train, min(args.batch, len(train))))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if time.perf_counter() - start > report:
            report += 60.0
            print(f"{time.perf_counter() - start:5.0f} s step {step} loss {loss.item():.3f} "
                  f"{measure(enc, val[:: max(1, len(val) // 150)])}", flush=True)
    print(f"final after {step} steps ({args.batch} images each): {measure(enc, val, model)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
