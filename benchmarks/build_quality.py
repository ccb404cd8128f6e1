"""Builder throughput: samples/s of ``loupe build-data quality`` on one core, template labeller and PNG
writing included (pool setup and the card are timed apart).

    .venv/bin/python benchmarks/build_quality.py                 # 448 px, built-in pool, 1 worker
    .venv/bin/python benchmarks/build_quality.py --size 224 --n 600 --workers 2

Target (issue 3): at least 40 samples/s per core at 448 px.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loupe_vlm.data_builders.quality import BuildConfig, build  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--images", nargs="*", default=[], help="folders instead of the built-in pool")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cfg = BuildConfig(out=out, n=args.n, image_size=args.size, workers=args.workers, images=args.images)
        cpu0 = time.process_time()
        s = build(cfg, progress=False)
        cpu = time.process_time() - cpu0
        size = sum(f.stat().st_size for f in os.scandir(os.path.join(out, "images")))
        n_png = len(os.listdir(os.path.join(out, "images")))
    per_core = s["samples_per_s"] / max(1, args.workers)
    print(f"quality builder: {args.n} samples at {args.size}px, {args.workers} worker(s)")
    print(f"  building: {s['units_s']:.1f} s -> {s['samples_per_s']:.1f} samples/s ({per_core:.1f} per core)")
    if args.workers == 1:
        print(f"  CPU time of the whole run (setup and card included): {cpu:.1f} s -> "
              f"{args.n / cpu:.1f} samples per CPU-second (robust to other load on the machine)")
    print(f"  setup (pool scan, cached after first run): {s['setup_s']:.1f} s; card: {s['card_s']:.1f} s")
    print(f"  images: {n_png} PNGs, {size / n_png / 1024:.0f} KiB each, {n_png / args.n:.2f} per sample")
    print(f"  target >= 40 samples/s per core: {'met' if per_core >= 40 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
