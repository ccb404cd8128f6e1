"""What ``--decode-precision`` buys on this CPU, in one run (assistant/decode_precision.py).

    python benchmarks/decode_precision.py                     # the default model, 448 px, 2 threads
    python benchmarks/decode_precision.py --model CKPT --repeats 5 --json out.json

1. The products themselves: ``F.linear`` of R rows by the default model's widest layer shape
   (576 -> 1536), fp32 weights against bf16 weights, R = 1, 2, 4, 8, 16, 64: the median of
   ``--repeats`` rounds of 40 products each.
2. The model: ``Assistant.assess`` (a brief answer) and ``Assistant.detect_forgery`` (with its mask) on
   ``tests/assets/tampered.png`` resized to SIZE x SIZE, with the same loaded model switched between
   exact fp32 and the bf16 copies (``decode_precision.enable`` / ``disable``), interleaved A B A B; the
   median of ``--repeats`` after one warm-up each, the ratio, and whether the two answers' texts are the
   same.

For agreement on many images, run ``loupe eval --batch-size 1`` with ``--decode-precision bf16`` and
``fp32`` on the same records and compare the two reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROWS = (1, 2, 4, 8, 16, 64)


def product_times(repeats: int) -> list[dict]:
    import torch

    out = []
    for rows in ROWS:
        row = {"rows": rows}
        for name, dtype in (("fp32_us", torch.float32), ("bf16_us", torch.bfloat16)):
            weights = [torch.randn(1536, 576).to(dtype) for _ in range(40)]
            x = torch.randn(rows, 576).to(dtype)
            rounds = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for w in weights:
                    torch.nn.functional.linear(x, w)
                rounds.append((time.perf_counter() - t0) / len(weights) * 1e6)
            row[name] = statistics.median(rounds[1:])  # the first round warms the caches
        row["ratio"] = row["bf16_us"] / row["fp32_us"]
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Loupe checkpoint folder (default: the embedded default model)")
    p.add_argument("--size", type=int, default=448, help="image side in pixels (default: 448)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (default: 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")

    import torch
    from PIL import Image

    from loupe_vlm.assistant import decode_precision
    from loupe_vlm.assistant.inference import Assistant

    torch.set_num_threads(args.threads)
    products = product_times(args.repeats)
    print("| rows | fp32 weights | bf16 weights | bf16 / fp32 |\n|---|---|---|---|")
    for r in products:
        print(f"| {r['rows']} | {r['fp32_us']:.0f} us | {r['bf16_us']:.0f} us | {r['ratio']:.2f} |")

    assistant = Assistant.from_pretrained(args.model, device="cpu", decode_precision="fp32")
    img = Image.open(REPO / "tests" / "assets" / "tampered.png").convert("RGB").resize((args.size, args.size))
    lm = assistant.model.vlm
    cases = {"brief assessment (assess)": assistant.assess, "forgery with mask (detect_forgery)": assistant.detect_forgery}
    model_rows = []
    print(f"\n{assistant.name}, {args.size} px, {args.threads} threads, median of {args.repeats}\n"
          "| call | fp32 | bf16 copies | fp32 / bf16 | same text |\n|---|---|---|---|---|")
    for label, fn in cases.items():
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        texts: dict[str, str | None] = {}
        for mode in ("fp32", "bf16"):  # warm-up, and the text of each
            (decode_precision.enable if mode == "bf16" else decode_precision.disable)(lm)
            texts[mode] = fn(img).text
        for _ in range(args.repeats):
            for mode in ("fp32", "bf16"):
                (decode_precision.enable if mode == "bf16" else decode_precision.disable)(lm)
                t0 = time.perf_counter()
                fn(img)
                times[mode].append(time.perf_counter() - t0)
        a, b = statistics.median(times["fp32"]), statistics.median(times["bf16"])
        same = texts["fp32"] == texts["bf16"]
        model_rows.append({"call": label, "fp32_s": a, "bf16_s": b, "speedup": a / b, "same_text": same,
                           "runs": times, "texts": texts})
        print(f"| {label} | {a:.2f} s | {b:.2f} s | {a / b:.2f} | {'yes' if same else 'no'} |")
    for r in model_rows:
        if not r["same_text"]:
            print(f"\n{r['call']}:\n  fp32: {r['texts']['fp32']}\n  bf16: {r['texts']['bf16']}")
    if args.json:
        args.json.write_text(json.dumps({"model": assistant.name, "size": args.size, "threads": args.threads,
                                         "products": products, "model_calls": model_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
