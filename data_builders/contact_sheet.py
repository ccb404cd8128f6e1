"""``loupe build-data contact-sheet``: one PNG grid of every distortion function x 5 severities.

Rows are the functions of ``prompts.DISTORTIONS`` (grouped by category), columns the pristine crop
then severities 1..5, each tile labelled. Look at it to check that severity k of one function is
about as bad as severity k of the others.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import cv2
import numpy as np

from loupe_vlm.prompts import DISTORTIONS, SEVERITIES

from . import distortions as D
from .sources import builtin_photos, load_rgb, procedural, random_view, save_png

log = logging.getLogger(__name__)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    out = tile.copy()
    cv2.rectangle(out, (0, 0), (out.shape[1], 16), (0, 0, 0), -1)
    cv2.putText(out, text, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def contact_sheet(img: np.ndarray, tile: int = 160, seed: int = 0, names: list[str] | None = None) -> np.ndarray:
    """The grid as a uint8 RGB array: one row per function, columns pristine + severities 1..5."""
    base = random_view(img, np.random.default_rng(seed), tile) if min(img.shape[:2]) != tile else img
    rows = []
    for name in names or DISTORTIONS.ids:
        cells = [_label(base, name[:24])]
        for level in range(1, 6):
            out = D.apply(base, name, level, np.random.default_rng([seed, level]))
            cells.append(_label(out, f"{level} {SEVERITIES.terms[level - 1].id}"))
        rows.append(np.hstack(cells))
    return np.vstack(rows)


def default_image() -> tuple[np.ndarray, str]:
    """A colourful built-in photo (skimage's coffee, else the first pool photo, else a procedural scene)."""
    photos = builtin_photos()
    for p in photos:
        if p.id in ("skimage:coffee", "skimage:astronaut"):
            return p.load(), p.id
    if photos:
        return photos[0].load(), photos[0].id
    return procedural("dead_leaves", 0), "procedural:dead_leaves:0000"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loupe build-data contact-sheet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="PNG file to write, e.g. sheet.png")
    ap.add_argument("--image", help="photo to distort (default: a built-in photo)")
    ap.add_argument("--tile", type=int, default=192, help="tile size in px (default 192)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distortions", nargs="*", help="only these function ids (default: all)")
    ap.add_argument("--forgery", metavar="DATASET", help="instead: examples of a forgery dataset folder with "
                    "their masks tinted red (see data_builders.forgery.forgery_contact_sheet)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.forgery:
        from .forgery import forgery_contact_sheet
        path = forgery_contact_sheet(args.forgery, args.out, thumb=args.tile, seed=args.seed)
        print(f"wrote {path}: forgery examples of {args.forgery}")
        return 0
    if args.image:
        img, name = load_rgb(args.image), args.image
    else:
        img, name = default_image()
    sheet = contact_sheet(img, args.tile, args.seed, args.distortions)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_png(out, sheet)
    print(f"wrote {out} ({sheet.shape[1]}x{sheet.shape[0]}): {len(args.distortions or DISTORTIONS.ids)} functions "
          f"x 5 severities on {name}")
    return 0
