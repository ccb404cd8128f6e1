"""Benchmark: forgery samples per second per core at 512 px with the template labeller.

Measures ``data_builders.forgery.build_one`` (view of a source photo, tamper synthesis,
post-processing, facts, template answer, PNG encoding of image and masks) in one process with
OpenCV limited to one thread, per manipulation and for authentic images, after a warm-up that
fills the source cache. Then it times a whole ``build`` (writer included: atomic PNG writes, fsynced
JSONL) of the default mix.

Both wall-clock and CPU-time rates are printed: on a shared machine the CPU-time rate is the
honest per-core figure (the process is single-threaded).

Run:  .venv/bin/python benchmarks/build_forgery.py [--n 200] [--size 512]
The issue's target: >= 20 samples/s per core for splice and copy_move.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loupe_vlm.data_builders import forgery as F  # noqa: E402


def rate(cfg: F.BuildConfig, n: int) -> tuple[float, float, int]:
    """Samples/s of build_one over ``n`` indices after 10 warm-up samples: by wall clock, by this
    process's CPU time (the per-core figure, robust to other load on a shared machine), and failures."""
    ctx = F.make_context(cfg)
    F._init_worker(ctx)
    for i in range(10):
        F._work((i, False))
    t, c = time.perf_counter(), time.process_time()
    fails = sum(1 for i in range(10, 10 + n) if F._work((i, False)).error)
    return n / (time.perf_counter() - t), n / (time.process_time() - c), fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200, help="samples per measurement")
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--procedural", type=int, default=0,
                   help="procedural scenes in the pool (0: photos only, so rendering them is not timed)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as tmp:
        base = F.BuildConfig(out=Path(tmp) / "unused", n=10 ** 6, size=args.size, procedural=args.procedural)
        print(f"build_one at {args.size} px, 1 process, OpenCV 1 thread, template labeller:")
        rows = [("splice", replace(base, manipulations=("splice",), authentic=0.0)),
                ("copy_move", replace(base, manipulations=("copy_move",), authentic=0.0)),
                ("splice+copy_move", replace(base, manipulations=("splice", "copy_move"), authentic=0.0)),
                ("removal", replace(base, manipulations=("removal",), authentic=0.0)),
                ("aigc_edit", replace(base, manipulations=("aigc_edit",), authentic=0.0)),
                ("authentic", replace(base, authentic=1.0)),
                ("default mix (50% authentic)", base)]
        print(f"  {'':<28} {'wall':>8} {'per CPU-s':>10}")
        for name, cfg in rows:
            wall, cpu, fails = rate(cfg, args.n)
            print(f"  {name:<28} {wall:8.1f} {cpu:10.1f}  samples/s  ({fails} failed of {args.n})")
        out = Path(tmp) / "ds"
        cfg = replace(base, out=out, n=args.n)
        s = F.build(cfg)
        print(f"whole build, default mix, n={args.n} (setup + writer + card): {s['seconds']:.1f} s, "
              f"{s['rate']:.1f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
