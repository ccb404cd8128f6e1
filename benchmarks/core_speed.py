"""Forward and generate time of a Loupe model on one image (CPU by default).

    python benchmarks/core_speed.py                       # tiny test twin (scratch:test), 128x96 asset
    python benchmarks/core_speed.py --model CKPT --size 448

Prints the median of several runs for: one teacher-forced forward (with a mask), ``Assistant.assess``
(brief) and ``Assistant.detect_forgery`` (with mask) on one image. The machine is shared and noisy:
compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loupe_vlm.assistant.inference import Assistant  # noqa: E402
from tests.helpers import ASSETS, build_tiny_checkpoint, chat, TAMPERED_ANSWER  # noqa: E402


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint folder (default: build the tiny test twin)")
    p.add_argument("--size", type=int, default=0, help="resize the test image to SIZE x SIZE (0: keep 128x96)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.model) if args.model else build_tiny_checkpoint(Path(tmp) / "ck")
        a = Assistant.from_pretrained(ckpt)
        img = Image.open(ASSETS / "tampered.png").convert("RGB")
        if args.size:
            img = img.resize((args.size, args.size))
        mask = Image.open(ASSETS / "tampered_mask.png").resize(img.size)
        lp = a.processor
        batch = lp.collate([lp.encode(chat("forgery.detect", TAMPERED_ANSWER), [img], train=True, masks=[
            __import__("numpy").asarray(mask) > 127])])
        with torch.no_grad():
            fwd = median_time(lambda: a.model(batch), args.repeats)
        assess = median_time(lambda: a.assess(img), args.repeats)
        forgery = median_time(lambda: a.detect_forgery(img), args.repeats)
        n_new = len(a.tokenizer.encode(a.detect_forgery(img).raw_text, add_special_tokens=False))
    print(f"model: {a.name}  image: {img.size[0]}x{img.size[1]}  threads: {args.threads}")
    print(f"forward (teacher-forced, 1 mask):  {fwd * 1000:8.1f} ms")
    print(f"assess (brief, generate):          {assess * 1000:8.1f} ms")
    print(f"detect_forgery (generate + mask):  {forgery * 1000:8.1f} ms  ({n_new} new tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
