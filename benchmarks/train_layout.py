"""Training steps of the EfficientNet-Lite0 parts in the usual (NCHW) and the channels-last layout, side by side.

    .venv/bin/python benchmarks/train_layout.py                 # 2 threads, 7 pairs of each
    .venv/bin/python benchmarks/train_layout.py --pairs 11 --threads 1

``loupe train forensic`` and ``loupe train refit-heads`` train their EfficientNet-Lite0 convolutions in
channels-last layout (the same float32 arithmetic, in the memory layout oneDNN's convolutions prefer);
stage 1 of ``loupe train``, one image at a time, stays in the usual layout (its whole step gained nothing
measurable: the README's figures). This times what each of them trains, in both layouts, in one
process, interleaved (usual, channels-last, usual, ...), so load from other users of the machine hits
both alike; the figure to read is the median of the per-pair ratios.

1. forensic: a training step of ``ForensicNet`` (ImageNet weights) on a batch of 16 at 224 px: forward,
   ``finetune.forensic.losses``, backward and AdamW;
2. trunk, 1 image: forward and backward of the heads' EfficientNet trunk on one 224 px image, as stage 1
   runs it (one image at a time);
3. trunk, 8 images: the same on a batch of 8 same-sized images, as refit-heads groups them.

The timed steps exclude data loading and the low-level encoder's own small convolutions, so a whole
step gains less than these ratios say; the README gives whole-command figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loupe_vlm.assistant.forensic import ForensicNet
from loupe_vlm.assistant.modeling import _EfficientNetTrunk
from loupe_vlm.finetune.forensic import losses


def forensic_step(layout: torch.memory_format):
    torch.manual_seed(0)
    net = ForensicNet(pretrained=True).to(memory_format=layout).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.rand(16, 3, 224, 224).contiguous(memory_format=layout)
    target, tampered = torch.rand(16, 56, 56), torch.arange(16) % 2 == 0

    def step() -> None:
        maps, logits = net(x)
        loss = losses(maps, logits, target, tampered)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def trunk_step(layout: torch.memory_format, batch: int):
    trunk = _EfficientNetTrunk(pretrained=True).to(memory_format=layout)
    x = torch.rand(batch, 3, 224, 224).contiguous(memory_format=layout)

    def step() -> None:
        tokens, dense = trunk(x)
        trunk.zero_grad()
        (tokens.square().mean() + dense.square().mean()).backward()
    return step


def timed(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=7, help="timed pairs per part, after one warm-up pair")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the build's setting)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    usual, last = torch.contiguous_format, torch.channels_last
    parts = [("forensic, batch 16", lambda f: forensic_step(f)),
             ("trunk, 1 image", lambda f: trunk_step(f, 1)),
             ("trunk, batch 8", lambda f: trunk_step(f, 8))]
    print(f"{args.threads} threads, {args.pairs} pairs after one warm-up pair; seconds a step (median)")
    print("| part | usual | channels-last | usual / channels-last (median of pairs) |\n|---|---|---|---|")
    for name, make in parts:
        a, b = make(usual), make(last)
        timed(a), timed(b)  # warm-up: oneDNN picks and caches its kernels
        ta, tb = [], []
        for _ in range(args.pairs):
            ta.append(timed(a))
            tb.append(timed(b))
        ratio = statistics.median(x / y for x, y in zip(ta, tb))
        print(f"| {name} | {statistics.median(ta):.3f} | {statistics.median(tb):.3f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
