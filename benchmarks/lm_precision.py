"""What ``--lm-precision fp16`` buys on this CPU, in one run (assistant/lm_precision.py).

    python benchmarks/lm_precision.py                     # the default model, 448 px, 2 threads
    python benchmarks/lm_precision.py --model CKPT --repeats 5 --json out.json

1. The products themselves, by the default model's widest layer shape (576 -> 1536), over R rows
   (R = 1, 8, 51, 400: one token, a batch of 8, a prompt, 8 prompts): fp32 ``F.linear``, bf16 weights
   and inputs (for reference: this CPU has no bf16 arithmetic), and fbgemm's packed fp16 weights
   (``torch.ops.quantized.linear_dynamic_fp16``, what ``--lm-precision fp16`` runs); the median of
   ``--repeats`` rounds of 40 products each, and the largest difference from fp32.
2. The model: ``Assistant.assess`` (a brief answer), ``Assistant.detect_forgery`` (with its mask) and
   ``Assistant.run`` of 8 brief assessments at batch 8 (``loupe caption``'s work), on
   ``tests/assets/tampered.png`` resized to SIZE x SIZE (the batch: the test assets), with one loaded model
   switched between exact fp32 and the packed copies (``lm_precision.enable`` / ``disable``), interleaved
   A B A B; the median of ``--repeats`` after one warm-up each, the ratio, and whether the texts are the
   same.

For agreement on many images, run ``loupe eval`` with ``--lm-precision fp16`` and with its default
(``fp32``) on the same records and compare the two reports.
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

ROWS = (1, 8, 51, 400)


def product_times(repeats: int) -> list[dict]:
    import torch

    torch.manual_seed(0)
    weights = [torch.randn(1536, 576) / 24 for _ in range(40)]
    kinds = {
        "fp32_us": (weights, lambda x, w: torch.nn.functional.linear(x, w)),
        "bf16_us": ([w.bfloat16() for w in weights],
                    lambda x, w: torch.nn.functional.linear(x.bfloat16(), w).float()),
        "fp16_packed_us": ([torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights],
                           lambda x, w: torch.ops.quantized.linear_dynamic_fp16(x, w)),
    }
    out = []
    for rows in ROWS:
        row: dict = {"rows": rows}
        x = torch.randn(rows, 576)
        exact = torch.nn.functional.linear(x, weights[0])
        for name, (ws, fn) in kinds.items():
            rounds = []
            for _ in range(repeats + 1):
                t0 = time.perf_counter()
                for w in ws:
                    fn(x, w)
                rounds.append((time.perf_counter() - t0) / len(ws) * 1e6)
            row[name] = statistics.median(rounds[1:])  # the first round warms the caches
            row[name.replace("_us", "_max_error")] = float((fn(x, ws[0]) - exact).abs().max())
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

    from loupe_vlm.assistant import lm_precision
    from loupe_vlm.assistant.inference import Assistant, Request

    torch.set_num_threads(args.threads)
    products = product_times(args.repeats)
    print("| rows | fp32 | bf16 weights and inputs | fp16 packed (fbgemm) | fp32 / fp16 packed | max error bf16 / fp16 |\n"
          "|---|---|---|---|---|---|")
    for r in products:
        print(f"| {r['rows']} | {r['fp32_us']:.0f} us | {r['bf16_us']:.0f} us | {r['fp16_packed_us']:.0f} us | "
              f"{r['fp32_us'] / r['fp16_packed_us']:.2f} | {r['bf16_max_error']:.1e} / {r['fp16_packed_max_error']:.1e} |")

    assistant = Assistant.from_pretrained(args.model, device="cpu", lm_precision="fp32")
    img = Image.open(REPO / "tests" / "assets" / "tampered.png").convert("RGB").resize((args.size, args.size))
    assets = sorted(p for p in (REPO / "tests" / "assets").glob("*.png") if "mask" not in p.stem)
    batch = [Request("quality.assess", [str(assets[i % len(assets)])], ["A"]) for i in range(8)]
    lm = assistant.model.vlm
    cases = {
        "brief assessment (assess)": lambda: [assistant.assess(img).text],
        "forgery with mask (detect_forgery)": lambda: [assistant.detect_forgery(img).text],
        "8 brief assessments at batch 8 (run)": lambda: [r.text for r in assistant.run(batch, batch_size=8)],
    }
    model_rows = []
    print(f"\n{assistant.name}, {args.size} px, {args.threads} threads, median of {args.repeats}\n"
          "| call | fp32 | fp16 packed | fp32 / fp16 | same texts |\n|---|---|---|---|---|")
    for label, fn in cases.items():
        times: dict[str, list[float]] = {"fp32": [], "fp16": []}
        texts: dict[str, list] = {}
        for mode in ("fp32", "fp16"):  # warm-up, and the texts of each
            (lm_precision.enable if mode == "fp16" else lm_precision.disable)(lm)
            texts[mode] = fn()
        for _ in range(args.repeats):
            for mode in ("fp32", "fp16"):
                (lm_precision.enable if mode == "fp16" else lm_precision.disable)(lm)
                t0 = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
        a, b = statistics.median(times["fp32"]), statistics.median(times["fp16"])
        same = sum(x == y for x, y in zip(texts["fp32"], texts["fp16"]))
        model_rows.append({"call": label, "fp32_s": a, "fp16_s": b, "speedup": a / b, "same_texts": same,
                           "n_texts": len(texts["fp32"]), "runs": times, "texts": texts})
        print(f"| {label} | {a:.2f} s | {b:.2f} s | {a / b:.2f} | {same} of {len(texts['fp32'])} |")
    for r in model_rows:
        for x, y in zip(r["texts"]["fp32"], r["texts"]["fp16"]):
            if x != y:
                print(f"\n{r['call']}:\n  fp32: {x}\n  fp16: {y}")
    if args.json:
        args.json.write_text(json.dumps({"model": assistant.name, "size": args.size, "threads": args.threads,
                                         "products": products, "model_calls": model_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
