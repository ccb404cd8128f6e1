"""Make the demo's bundled example images from scikit-image's sample photos (offline, deterministic).

Writes small PNGs beside this file: a clean photo, three distorted copies (Gaussian noise, Gaussian
blur, heavy JPEG), a spliced (tampered) photo with its ground-truth mask, and a second clean photo
for A/B comparison. Run it again to regenerate them:

    python demo/examples/make_examples.py

The distortions are hand-written with OpenCV here rather than taken from ``data_builders`` because
``demo`` may import only ``prompts`` and ``assistant`` (tests/test_layering.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
import skimage.data
from PIL import Image

HERE = Path(__file__).resolve().parent
SIZE = (256, 192)  # (W, H): small enough that all examples stay well under 1 MB


def _photo(name: str) -> np.ndarray:
    """A scikit-image sample photo resized to SIZE, as HxWx3 uint8 RGB."""
    img = getattr(skimage.data, name)()
    return cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA)


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("OpenCV could not encode a JPEG")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def make(out: Path = HERE, seed: int = 0) -> list[Path]:
    """Write the examples into ``out``; returns the paths written."""
    rng = np.random.default_rng(seed)
    clean = _photo("chelsea")
    images: dict[str, np.ndarray] = {
        "clean.png": clean,
        "noisy.png": np.clip(clean.astype(np.float32) + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8),
        "blurred.png": cv2.GaussianBlur(clean, (0, 0), sigmaX=3.0),
        "jpeg.png": _jpeg(clean, quality=8),
        "clean_b.png": _photo("coffee"),
    }
    # Splice: an elliptical patch of the astronaut photo pasted onto the coffee photo, edges feathered
    # a little the way a careless editor would.
    host, donor = _photo("coffee"), _photo("astronaut")
    mask = np.zeros(host.shape[:2], np.uint8)
    cv2.ellipse(mask, (70, 60), (45, 38), 0, 0, 360, 255, thickness=-1)
    alpha = cv2.GaussianBlur(mask, (0, 0), 1.0).astype(np.float32)[..., None] / 255.0
    donor_shifted = np.roll(donor, shift=(-40, -60), axis=(0, 1))
    tampered = (host * (1 - alpha) + donor_shifted * alpha).astype(np.uint8)
    images["tampered.png"] = tampered
    images["tampered_mask.png"] = mask
    written = []
    for name, arr in images.items():
        path = out / name
        Image.fromarray(arr).save(path, optimize=True)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Regenerate the demo's bundled example images.")
    p.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: beside this script)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    paths = make(args.out)
    total = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} images, {total / 1024:.0f} KiB in all, to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
