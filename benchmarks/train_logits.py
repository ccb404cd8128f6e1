"""A stage 2 training step of loupe-smol with the vocabulary logits at every position, and at the labelled
positions only (``ExplainableVLM.forward(scored_only=True)``, what ``loupe train`` runs), side by side.

    .venv/bin/python benchmarks/train_logits.py --data DATA/quality DATA/forgery           # 8 batches, 2 threads
    .venv/bin/python benchmarks/train_logits.py --data DATA/quality DATA/forgery --batches 4 --threads 1

The model is built as ``loupe train --config finetune/recipes/loupe-smol.yaml`` builds it for stage 2 (LoRA
on SmolLM2-135M-Instruct from the packaged base, trainable rows for the added tokens, the evidence fusion
and its gate, the heads frozen and taken from the shipped model, as ``--scratch.lowlevel_init`` takes
them). The batches are the first of the recipe's own plan (batch size 4, length bucketing, data weights
3 2). Each batch runs forward and backward once each way, interleaved (the first way alternating by
batch), so load from other users of the machine hits both alike; the figure to read is the median of the
per-batch ratios. It also prints the largest difference
between the two losses, which should be rounding only. The optimizer does not step, so every pass sees
the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loupe_vlm.finetune.data import epoch_batches  # noqa: E402
from loupe_vlm.finetune.train import loader, parse_args, setup  # noqa: E402


def stage2_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a benchmark of loupe-smol's stage 2: its two datasets, the heads it starts from, threads
    (``benchmarks/train_precision.py`` uses it too)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs=2, required=True, type=Path, metavar=("QUALITY", "FORGERY"),
                   help="the quality and forgery datasets (loupe build-data), as the build script gives them")
    p.add_argument("--heads", type=Path, default=ROOT / "assistant/weights/loupe-smol",
                   help="the checkpoint whose heads stage 2 starts from (default: the shipped loupe-smol)")
    p.add_argument("--threads", type=int, default=2)
    return p


def parse_stage2(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``p``'s arguments, with an error naming a dataset folder that has no training split."""
    args = p.parse_args(argv)
    for d in args.data:
        if not (d / "train.jsonl").is_file():
            p.error(f"{d}: no train.jsonl; build it with `loupe build-data` (see the README)")
    return args


def main(argv: list[str] | None = None) -> int:
    p = stage2_parser(__doc__)
    p.add_argument("--batches", type=int, default=8, help="batches to time (each once per way)")
    args = parse_stage2(p, argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(["--config", str(ROOT / "finetune/recipes/loupe-smol.yaml"), "--data", *map(str, args.data),
                          "--data_weights", "3", "2", "--scratch.lowlevel_pretrain_steps", "0",
                          "--scratch.lowlevel_init", str(args.heads), "--output", tmp])
        run = setup(cfg)
        model = run.unwrapped
        model.train()
        plan = epoch_batches(run.train, cfg.batch_size, epoch=0, seed=cfg.seed, weights=cfg.data_weights or None,
                             bucketing=cfg.bucketing, world_size=1)[:args.batches]
        times: dict[bool, list[float]] = {False: [], True: []}
        diffs, shares = [], []
        for batch in loader(run, plan, run.train):
            if batch.data is None:
                continue
            losses = {}
            # which way runs first alternates by batch: the first pass over a new shape also pays for
            # oneDNN's kernel setup
            for scored_only in (False, True) if len(diffs) % 2 == 0 else (True, False):
                torch.manual_seed(0)  # the same dropout masks both ways
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                out = model(batch.data, scored_only=scored_only)
                out.loss.backward()
                times[scored_only].append(time.perf_counter() - t0)
                losses[scored_only] = float(out.loss)
            labels = batch.data["labels"][:, 1:]
            shares.append(float((labels != -100).float().mean()))
            diffs.append(abs(losses[True] - losses[False]))
            print(f"batch {len(diffs)}: {tuple(batch.data['input_ids'].shape)} tokens, {shares[-1]:.0%} scored; "
                  f"full {times[False][-1]:.2f} s, scored {times[True][-1]:.2f} s", flush=True)
    if not diffs:
        print("no batch could be read", file=sys.stderr)
        return 1
    ratios = [s / f for f, s in zip(times[False], times[True])]
    print(f"\n{len(diffs)} batches of {cfg.batch_size}, {args.threads} thread(s); positions scored: median "
          f"{statistics.median(shares):.0%}")
    print("| forward + backward | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, key in (("logits at every position", False), ("logits where labelled (scored_only)", True)):
        t = times[key]
        print(f"| {name} | {statistics.median(t):.2f} | {min(t):.2f} | {max(t):.2f} |")
    print(f"\nscored / full, per batch: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}); largest loss difference {max(diffs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
