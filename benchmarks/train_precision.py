"""Stage 2 of loupe-smol in full precision and in bf16 (``--mixed_precision bf16``), side by side, on a CPU
with bf16 instructions (AVX512-BF16 or AMX).

    .venv/bin/python benchmarks/train_precision.py --data DATA/quality DATA/forgery              # 2 rounds of 20 steps
    .venv/bin/python benchmarks/train_precision.py --data DATA/quality DATA/forgery --rounds 3 --steps 40

Each round runs the build script's stage 2 command (``finetune/recipes/build-loupe-smol.sh``: the recipe, data
weights 3 2, the heads taken from the shipped model as ``--scratch.lowlevel_init`` takes them) for
``--steps`` steps, once per precision, as a whole ``loupe train`` process; which one runs first alternates
by round, so load from other users of the machine hits both alike. It prints each run's wall time (model
loading and a closing validation of 48 records included), the ratio bf16 / full per round, and the two runs'
last training and validation losses, which should be close but not equal: bf16 rounds the base's
products. On a CPU without bf16 instructions it stops, since ``loupe train`` would run both in full precision.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loupe_vlm.finetune.train import cpu_has_bf16  # noqa: E402
from train_logits import parse_stage2, stage2_parser  # noqa: E402  (this folder, first on sys.path)


def stage2(data: list[Path], heads: Path, out: Path, steps: int, precision: str) -> list[str]:
    return [sys.executable, "-m", "loupe_vlm.cli", "train", "--config", str(ROOT / "finetune/recipes/loupe-smol.yaml"),
            "--data", *map(str, data), "--data_weights", "3", "2", "--scratch.lowlevel_init", str(heads),
            "--scratch.lowlevel_pretrain_steps", "0", "--output", str(out), "--max_steps", str(steps),
            "--warmup_steps", str(min(5, steps)), "--eval_every", "0", "--save_every", "0",
            "--mixed_precision", precision]


def last_losses(out: Path) -> tuple[float | None, float | None]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if "split" not in r]
    val = [r["val_loss"] for r in rows if r.get("split") == "val"]
    return (train[-1] if train else None), (val[-1] if val else None)


def main(argv: list[str] | None = None) -> int:
    p = stage2_parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="training steps per run (default: 20)")
    p.add_argument("--rounds", type=int, default=2, help="runs of each precision (default: 2)")
    args = parse_stage2(p, argv)
    if not cpu_has_bf16():
        print("this CPU has no bf16 instructions (AVX512-BF16 or AMX): loupe train would run both in full "
              "precision, so there is nothing to compare", file=sys.stderr)
        return 1
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    walls: dict[str, list[float]] = {"no": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for precision in ("no", "bf16") if r % 2 == 0 else ("bf16", "no"):
                out = Path(tmp) / f"{precision}-{r}"
                t0 = time.perf_counter()
                done = subprocess.run(stage2(list(args.data), args.heads, out, args.steps, precision), env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                walls[precision].append(time.perf_counter() - t0)
                if done.returncode != 0:
                    print(f"loupe train ({precision}) failed:\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                train, val = last_losses(out)
                print(f"round {r + 1}, {precision:4s}: {walls[precision][-1]:.1f} s; loss at step {args.steps} "
                      f"{train:.4f}, validation loss {val:.4f}", flush=True)
    ratios = [b / f for f, b in zip(walls["no"], walls["bf16"])]
    print(f"\n{args.rounds} round(s) of {args.steps} steps of 4, {args.threads} thread(s), whole loupe train processes")
    print("| precision | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, key in (("full (fp32)", "no"), ("bf16 base, fp32 training weights", "bf16")):
        t = walls[key]
        print(f"| {name} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} |")
    print(f"\nbf16 / full, per round: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
