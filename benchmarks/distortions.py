"""Per-function speed of the distortion library at 448 px on one core, and its calibration table.

    .venv/bin/python benchmarks/distortions.py              # timing table (mean/max ms per function)
    .venv/bin/python benchmarks/distortions.py --calibrate  # perceptual difference per severity

Anchor (ANCHORS/issue 3): DepictQA-Wild's library takes 112 ms per image on average at 448 px on
one core. Target: every function <= 20 ms, mean <= 10 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

cv2.setNumThreads(1)

from loupe_vlm.data_builders import distortions as D  # noqa: E402
from loupe_vlm.prompts import DISTORTIONS  # noqa: E402
from loupe_vlm.data_builders import sources as S  # noqa: E402


def views(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """n views from the built-in photos (and procedural scenes if photos are missing)."""
    pool = S.builtin_pool(("photos",)) or S.procedural_pool({"dead_leaves": 4, "fractal": 4})
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = pool[(i * 7) % len(pool)]
        out.append(S.random_view(src.load(), rng, size))
    return out


def timing(size: int, reps: int, repeat: int, clock: str) -> int:
    imgs = views(reps, size)
    tick = time.thread_time if clock == "cpu" else time.perf_counter
    rows = []
    for name in DISTORTIONS.ids:
        D.apply(imgs[0], name, 3, 0)  # warm up (LUTs, allocations)
        times = []
        for i, img in enumerate(imgs):
            level = 1 + i % 5
            best = float("inf")
            for r in range(repeat):  # best of `repeat`: the usual timeit practice against scheduler noise
                t0 = tick()
                D.apply(img, name, level, np.random.default_rng([i, r]))
                best = min(best, tick() - t0)
            times.append(best * 1000)
        rows.append((name, float(np.mean(times)), float(np.max(times))))
    print(f"distortion timings at {size}x{size}, one core ({clock} clock, best of {repeat}), "
          f"{reps} images x levels 1-5 cycled")
    print(f"{'function':32s} {'mean ms':>8s} {'max ms':>8s}")
    for name, mean, mx in rows:
        flag = "  <-- over 20 ms" if mx > 20 else ""
        print(f"{name:32s} {mean:8.2f} {mx:8.2f}{flag}")
    means = [r[1] for r in rows]
    print(f"{'ALL (mean of means)':32s} {np.mean(means):8.2f} {max(r[2] for r in rows):8.2f}")
    print(f"anchor DepictQA-Wild: 112 ms mean; speed-up {112 / np.mean(means):.1f}x")
    return 0


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """max(1 - SSIM on luma, mean CIE76 colour difference / 40): the calibration measure."""
    from skimage.metrics import structural_similarity
    ya = cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)
    yb = cv2.cvtColor(b, cv2.COLOR_RGB2GRAY)
    ssim = structural_similarity(ya, yb, data_range=255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False)
    la = cv2.cvtColor(a.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    lb = cv2.cvtColor(b.astype(np.float32) / 255, cv2.COLOR_RGB2Lab)
    de = float(np.sqrt(((la - lb) ** 2).sum(-1)).mean())
    return max(1 - ssim, de / 40.0)


def calibrate(size: int, n: int) -> int:
    imgs = views(n, size, seed=1)
    print(f"calibration: mean difference (max(1-SSIM, dE/40)) over {n} views at {size}px")
    print(f"{'function':32s} " + " ".join(f"{'s' + str(k):>6s}" for k in range(1, 6)))
    table = {}
    for name in DISTORTIONS.ids:
        rng = np.random.default_rng(0)
        row = [float(np.mean([difference(img, D.apply(img, name, k, rng)) for img in imgs])) for k in range(1, 6)]
        table[name] = row
        print(f"{name:32s} " + " ".join(f"{v:6.3f}" for v in row))
    arr = np.array(list(table.values()))
    print(f"{'median over functions':32s} " + " ".join(f"{v:6.3f}" for v in np.median(arr, 0)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--reps", type=int, default=20, help="images timed per function")
    ap.add_argument("--repeat", type=int, default=3, help="timings per image; the best is kept")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="cpu: this thread's CPU time (robust on a shared machine); wall: elapsed time")
    ap.add_argument("--calibrate", action="store_true", help="print the calibration table instead")
    ap.add_argument("--views", type=int, default=12, help="views per function for --calibrate")
    args = ap.parse_args(argv)
    if args.calibrate:
        return calibrate(args.size, args.views)
    return timing(args.size, args.reps, args.repeat, args.clock)


if __name__ == "__main__":
    raise SystemExit(main())
