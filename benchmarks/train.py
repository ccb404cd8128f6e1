"""Training speed and memory: the tiny recipe measured here, the big recipes estimated.

1. Samples/s and peak RSS of ``finetune/recipes/loupe-tiny.yaml`` on this machine (a child process
   runs ``loupe train`` for ``--steps`` steps; samples/s is the median over steps after the first two,
   peak RSS is the child's ``ru_maxrss``).
2. Padding fraction of the batches with and without length bucketing, at the tiny recipe's batch size,
   over the data's train split: from the estimated lengths the planner uses, and from the real encoded
   lengths of the same batches.
3. A GPU memory estimate for the 3B-LoRA, 4B-LoRA and 7B-QLoRA recipes at their settings. Method:
   parameter counts are exact, from the published config.json values below instantiated on the
   ``meta`` device (no download); bytes = frozen weights (bf16: 2 B/param; NF4 with double quantisation:
   ~4.13 bits for the language model's linear layers) + trainable parameters x 16 B (fp32 weight,
   grad and two Adam moments) + activations (gradient checkpointing: each layer's bf16 input kept,
   one layer's internals recomputed at a time, ~T x (16 h + 6 I) bytes with T tokens per micro-batch;
   logits T x V x 10 B: bf16 logits, their fp32 upcast in the loss, and its gradient; the frozen vision
   tower keeps no activations) + 0.8 GB CUDA context, then +10% allocator slack. The activation term is
   a rough model (+-50%); the weight and optimizer terms are exact.

Run:  .venv/bin/python benchmarks/train.py [--data DIR ...] [--steps 20] [--threads 1]
Without --data it builds a small quality + forgery dataset with ``loupe build-data`` first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Published config.json values (huggingface.co/<id>/blob/main/config.json), only what sizes the model.
PUBLISHED = {
    "Qwen/Qwen2.5-VL-3B-Instruct": ("qwen2_5_vl", dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]))),
    "Qwen/Qwen2.5-VL-7B-Instruct": ("qwen2_5_vl", dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31]))),
    "Qwen/Qwen3-VL-4B-Instruct": ("qwen3_vl", dict(
        text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
        vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2560,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[5, 11, 17]))),
}
RECIPES = ["qwen2.5vl-3b-lora.yaml", "qwen3vl-4b-lora.yaml", "qwen2.5vl-7b-qlora.yaml"]
TYPICAL_TEXT_TOKENS = 300  # question + a detailed answer, from the builders' data (brief answers are ~40)
GB = 1024 ** 3


def build_data(work: Path) -> list[Path]:
    """A small quality + forgery dataset from the project's own builders."""
    loupe = [sys.executable, "-m", "loupe_vlm.cli", "build-data"]
    q, f = work / "quality", work / "forgery"
    subprocess.run(loupe + ["quality", "--out", str(q), "--n", "240", "--no-progress"], check=True, cwd=ROOT)
    subprocess.run(loupe + ["forgery", "--out", str(f), "--n", "120"], check=True, cwd=ROOT)
    return [q, f]


def measure_tiny(data: list[Path], steps: int, work: Path, threads: int | None = None) -> dict:
    """Run the loupe-tiny recipe for ``steps`` steps in a child process: samples/s and peak RSS."""
    out = work / "tiny-run"
    cmd = [sys.executable, "-m", "loupe_vlm.finetune.train", "--config", str(ROOT / "finetune/recipes/loupe-tiny.yaml"),
           "--data", *map(str, data), "--output", str(out), "--max_steps", str(steps), "--eval_every", "0",
           "--save_every", "0", "--val_samples", "8", "--log_every", "1", "--cpu", "true",
           "--warmup_steps", "2"]
    t0 = time.perf_counter()
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r.get("split") != "val" and r["step"] > 2]
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB -> MiB (Linux)
    return {"steps": steps, "batch_size": 8, "samples_per_s_median": statistics.median(rates),
            "samples_per_s_min": min(rates), "samples_per_s_max": max(rates), "peak_rss_mib": rss,
            "wall_s": wall, "torch_threads": threads or os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}


def padding(data: list[Path]) -> dict:
    """Padding fraction with and without bucketing (estimated and real lengths), batch 8, tiny recipe."""
    from loupe_vlm.assistant.modeling import new_model
    from loupe_vlm.assistant.processing import LoupeProcessor
    from loupe_vlm.finetune.config import load_config
    from loupe_vlm.finetune.data import BadRecords, LoupeDataset, corpus_texts, epoch_batches, padding_fraction, read_split

    cfg = load_config(ROOT / "finetune/recipes/loupe-tiny.yaml", {"data": [str(d) for d in data]})
    model, processor = new_model(cfg.base, corpus=corpus_texts(cfg.data), lowlevel_max_side=cfg.lowlevel_max_side,
                                 min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    lp = LoupeProcessor.for_model(model, processor)
    split = read_split(cfg.data, "train", lp, BadRecords(cfg.max_bad_records), cfg.max_length)
    est = [r.length for r in split.records]
    ds = LoupeDataset(split, lp, cfg.max_length)
    real = [int(ds[i].input_ids.numel()) for i in range(len(ds))]
    result = {"records": len(est), "length_estimate_mean_abs_error": statistics.mean(abs(a - b) for a, b in zip(est, real)),
              "real_length_min": min(real), "real_length_max": max(real)}
    for bucketing in (False, True):
        fracs_est, fracs_real = [], []
        for epoch in range(5):
            plan = epoch_batches(split, cfg.batch_size, epoch=epoch, seed=0, bucketing=bucketing)
            fracs_est.append(padding_fraction(plan, est))
            fracs_real.append(padding_fraction(plan, real))
        key = "bucketed" if bucketing else "random"
        result[f"padding_{key}_estimated"] = statistics.mean(fracs_est)
        result[f"padding_{key}_real"] = statistics.mean(fracs_real)
    return result


def count_params(base: str) -> dict:
    """Exact parameter counts of a published architecture, instantiated on the meta device."""
    import torch
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen3VLConfig

    family, spec = PUBLISHED[base]
    cls = Qwen2_5_VLConfig if family == "qwen2_5_vl" else Qwen3VLConfig
    cfg = cls(text_config=spec["text"], vision_config=spec["vision"],
              tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(cfg)
    total = sum(p.numel() for p in model.parameters())
    linear_lm = sum(m.weight.numel() for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and ".language_model." in n)
    return {"total": total, "lm_linear": linear_lm, "text": spec["text"], "family": family}


def lora_params(text: dict, r: int) -> int:
    """LoRA parameters on q, k, v, o, gate, up, down of every language-model layer: r x (in + out) each."""
    h, i, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
    hd = text.get("head_dim", h // text["num_attention_heads"])
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    return layers * sum(r * (a + b) for a, b in shapes)


def head_params(hidden: int, cfg) -> int:
    """LowLevelEncoder + MaskDecoder parameters at the recipe's widths (built for real, they are small)."""
    from loupe_vlm.assistant.modeling import LowLevelEncoder, MaskDecoder

    low = LowLevelEncoder(hidden, cfg.lowlevel_width, 4)
    dec = MaskDecoder(hidden, low.dense_dim, cfg.decoder_width)
    return sum(p.numel() for m in (low, dec) for p in m.parameters())


def estimate(recipe: str) -> dict:
    """GPU memory estimate for one recipe at its settings (see the module docstring for the method)."""
    from loupe_vlm.finetune.config import load_config

    cfg = load_config(ROOT / "finetune/recipes" / recipe, {"data": ["-"]})
    counts = count_params(cfg.base)
    text = counts["text"]
    h, i, v, layers = text["hidden_size"], text["intermediate_size"], text["vocab_size"], text["num_hidden_layers"]
    cell = 32 if counts["family"] == "qwen3_vl" else 28
    image_tokens = cfg.max_pixels // (cell * cell)
    trainable = lora_params(text, cfg.lora_r) + head_params(h, cfg) + 2 * h  # + the mask token's rows
    if cfg.resolved_method == "qlora":
        weights = counts["lm_linear"] * 4.127 / 8 + (counts["total"] - counts["lm_linear"]) * 2
    else:
        weights = counts["total"] * 2
    optim = trainable * 16
    rows = {}
    for case, seq in (("typical", image_tokens + 4 + TYPICAL_TEXT_TOKENS), ("worst", cfg.max_length)):
        tokens = cfg.batch_size * seq
        acts = tokens * h * 2 * layers + tokens * (16 * h + 6 * i) + tokens * v * 10
        acts += cfg.batch_size * 0.05 * GB  # LowLevelEncoder + MaskDecoder at 448 px
        total = (weights + optim + acts + 0.8 * GB) * 1.1
        rows[case] = {"seq_len": seq, "activations_gb": acts / GB, "total_gb": total / GB}
    return {"recipe": recipe, "base": cfg.base, "method": cfg.resolved_method, "params_b": counts["total"] / 1e9,
            "trainable_m": trainable / 1e6, "weights_gb": weights / GB, "grads_adam_gb": optim / GB,
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "image_tokens": image_tokens, **rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", help="dataset folders (default: build a small one)")
    parser.add_argument("--steps", type=int, default=20, help="training steps for the speed measurement")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the training child (default: torch's)")
    parser.add_argument("--skip-speed", action="store_true", help="only the padding and memory figures")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = [Path(d) for d in args.data] if args.data else build_data(work)
        if not args.skip_speed:
            speed = measure_tiny(data, args.steps, work, args.threads)
            print("## loupe-tiny recipe on this machine (CPU)")
            print(json.dumps(speed, indent=2))
        pad = padding(data)
        print("## padding fraction, batch 8 (mean of 5 epochs)")
        print(json.dumps(pad, indent=2))
    print("## GPU memory estimates (per GPU)")
    print(f"{'recipe':<26}{'params':>8}{'train':>9}{'weights':>9}{'grad+adam':>10}{'act typ':>9}{'total typ':>10}"
          f"{'act max':>9}{'total max':>10}")
    for recipe in RECIPES:
        e = estimate(recipe)
        print(f"{recipe:<26}{e['params_b']:>7.2f}B{e['trainable_m']:>8.1f}M{e['weights_gb']:>8.1f}G"
              f"{e['grads_adam_gb']:>9.2f}G{e['typical']['activations_gb']:>8.1f}G{e['typical']['total_gb']:>9.1f}G"
              f"{e['worst']['activations_gb']:>8.1f}G{e['worst']['total_gb']:>9.1f}G"
              f"   (batch {e['batch_size']}, seq typ {e['typical']['seq_len']} / max {e['worst']['seq_len']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
