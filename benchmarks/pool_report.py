"""What each source of the built-in pool adds: counts, and the spread of low-level statistics of its views.

    .venv/bin/python benchmarks/pool_report.py [--views 40] [--size 224]

For each pool part: images, source-photo groups (the split unit), and over random views the mean and
spread of luminance, colourfulness (Hasler & Suesstrunk), edge density (Canny) and the share of
high-frequency energy. A source adds variety when it widens these ranges, not only when it adds files.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from loupe_vlm.data_builders import sources as S  # noqa: E402


def stats(img: np.ndarray) -> tuple[float, float, float, float]:
    g = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    r, gg, b = (img[..., i].astype(np.float32) for i in range(3))
    rg, yb = r - gg, 0.5 * (r + gg) - b
    colourful = float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))
    edges = float((cv2.Canny(g, 100, 200) > 0).mean())
    f = np.abs(np.fft.rfft2(g.astype(np.float32) - g.mean())) ** 2
    fy = np.abs(np.fft.fftfreq(g.shape[0]))[:, None]
    fx = np.fft.rfftfreq(g.shape[1])[None, :]
    hf = float(f[np.hypot(fx, fy) > 0.25].sum() / (f.sum() + 1e-9))
    return float(g.mean()), colourful, edges, hf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=40)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args(argv)
    pool = S.builtin_pool()
    parts: dict[str, list[S.SourceImage]] = {}
    for s in pool:
        key = "photos" if s.source in ("skimage", "matplotlib", "opencv-doc") else s.source
        parts.setdefault(key, []).append(s)
    print(f"{'source':24s} {'images':>6s} {'groups':>6s}  {'luminance':>13s} {'colourful':>13s} "
          f"{'edges %':>11s} {'HF energy %':>12s}")
    for name, srcs in parts.items():
        rng = np.random.default_rng(0)
        rows = []
        for i in range(args.views):
            src = srcs[int(rng.integers(len(srcs)))]
            rows.append(stats(S.random_view(src.load(), rng, args.size)))
        a = np.array(rows)
        cell = lambda j, k=1.0: f"{a[:, j].mean() * k:6.1f}±{a[:, j].std() * k:5.1f}"
        print(f"{name:24s} {len(srcs):6d} {len({s.group for s in srcs}):6d}  {cell(0)} {cell(1)} "
              f"{cell(2, 100)} {cell(3, 100)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
