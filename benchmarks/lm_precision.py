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
   switched between exact fp32, packed copies one per layer (``enable(group_siblings=False)``) and
   packed copies with q/k/v and gate/up as one product each (``enable``, what ``--lm-precision fp16``
   runs), interleaved A B C A B C; the median of ``--repeats`` after one warm-up each, the ratios, and
   whether the texts are the same.

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
    modes = {  # what each mode does to the loaded LM before a call
        "fp32": lm_precision.disable,
        "fp16 alone": lambda m: (lm_precision.disable(m), lm_precision.enable(m, group_siblings=False)),
        "fp16": lambda m: (lm_precision.disable(m), lm_precision.enable(m)),
    }
    model_rows = []
    print(f"\n{assistant.name}, {args.size} px, {args.threads} threads, median of {args.repeats}; 'fp16 alone' "
          "packs every layer alone, 'fp16' (what --lm-precision fp16 runs) packs q/k/v and gate/up as one product\n"
          "| call | fp32 | fp16 alone | fp16 | fp32 / fp16 | fp16 alone / fp16 | same texts as fp32 (alone, fp16) |\n"
          "|---|---|---|---|---|---|---|")
    for label, fn in cases.items():
        times: dict[str, list[float]] = {mode: [] for mode in modes}
        texts: dict[str, list] = {}
        for mode, switch in modes.items():  # warm-up, and the texts of each
            switch(lm)
            texts[mode] = fn()
        for _ in range(args.repeats):
            for mode, switch in modes.items():
                switch(lm)
                t0 = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t0)
        med = {mode: statistics.median(t) for mode, t in times.items()}
        same = {mode: sum(x == y for x, y in zip(texts["fp32"], texts[mode])) for mode in modes}
        n = len(texts["fp32"])
        model_rows.append({"call": label, "fp32_s": med["fp32"], "fp16_alone_s": med["fp16 alone"],
                           "fp16_s": med["fp16"], "speedup": med["fp32"] / med["fp16"],
                           "grouping_speedup": med["fp16 alone"] / med["fp16"], "same_texts": same["fp16"],
                           "same_texts_alone": same["fp16 alone"], "grouped_equals_alone": texts["fp16"] == texts["fp16 alone"],
                           "n_texts": n, "runs": times, "texts": texts})
        print(f"| {label} | {med['fp32']:.2f} s | {med['fp16 alone']:.2f} s | {med['fp16']:.2f} s | "
              f"{med['fp32'] / med['fp16']:.2f} | {med['fp16 alone'] / med['fp16']:.2f} | "
              f"{same['fp16 alone']}, {same['fp16']} of {n} |")
    for r in model_rows:
        for x, y in zip(r["texts"]["fp32"], r["texts"]["fp16"]):
            if x != y:
                print(f"\n{r['call']}:\n  fp32: {x}\n  fp16: {y}")
        if not r["grouped_equals_alone"]:
            print(f"\n{r['call']}: grouped and alone fp16 texts differ (they should not)")
    if args.json:
        args.json.write_text(json.dumps({"model": assistant.name, "size": args.size, "threads": args.threads,
                                         "products": products, "model_calls": model_rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
