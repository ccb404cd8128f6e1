"""``loupe build-data import-quality``: public IQA sets with MOS (KADID-10k, TID2013, KonIQ-10k) -> Sample folders.

A user who has downloaded one of these sets runs one command, then ``loupe eval`` on the result,
and gets SRCC/PLCC under the standard protocol (global, against the published MOS). Layouts:

* ``kadid10k``: ``dmos.csv`` with columns ``dist_img, ref_img, dmos, var``; images (``I01_01_03.png``
  = reference 01, distortion type 01, level 3, and ``I01.png``) in ``images/`` or beside the CSV.
  ``dmos`` is 1..5, higher is better.
* ``tid2013``: ``mos_with_names.txt`` with ``MOS name`` lines; ``distorted_images/i01_01_1.bmp``
  (reference 01, type 01, level 1) and ``reference_images/I01.BMP``; names match case-insensitively.
  MOS is 0..9, higher is better.
* ``koniq10k``: ``koniq10k_scores_and_distributions.csv`` (``image_name``, ``MOS``, ...) and the
  images in ``1024x768/``. MOS is 1..5. Authentic distortions: no distortion labels. If a ``set``
  column (training/validation/test) is present, here or in ``koniq10k_distributions_sets.csv``, it
  picks the split; otherwise every image goes to ``test.jsonl``.

Every record is ``quality.assess`` (no reference unless ``--with-reference``) with ``meta.mos`` (the
published value), ``meta.mos_range``, ``meta.reference_group`` (the reference image, for the
per-group variant), ``meta.source_distortion`` (the set's own type and level) and, where the set's
type maps onto Loupe's taxonomy, ``meta.distortions`` with severity = the set's level (1..5); types
that do not map are marked ``"mapped": false`` and carry no ``distortions``, so identification
metrics skip them. ``meta.rating`` buckets the MOS range into five equal bins (Q-Align's levels).
``--pairs N`` adds N ``quality.rate`` pairs of two distortions of one reference (better = higher
MOS, gap at least ``--min-gap`` of the MOS range), DepictQA's A/B protocol on KADID/TID.

Images are symlinked (or, with ``--copy``, copied) into ``OUT/images/``; records name only paths
inside the output folder. Only files under ``--root`` are read.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from loupe_vlm.prompts import (
    CATEGORIES,
    DISTORTIONS,
    RATINGS,
    SEVERITIES,
    Sample,
    canonical_question,
    category_of,
    image_roles_for,
    save_jsonl,
    severity_name,
    user_content,
)

from .importers import _inside  # the importers' one "resolves inside --root" check

log = logging.getLogger(__name__)

LAYOUTS = ("kadid10k", "tid2013", "koniq10k")
MOS_RANGE = {"kadid10k": (1.0, 5.0), "tid2013": (0.0, 9.0), "koniq10k": (1.0, 5.0)}

# The set's distortion types -> (category, function or None). A function is given only where the
# set's generator is the same operation as ours; a category alone where only the kind agrees.
# None: no counterpart in Loupe's taxonomy (the record keeps the set's name, unmapped).
KADID_TYPES: dict[int, tuple[str, tuple[str, str | None] | None]] = {
    1: ("gaussian blur", ("blur", "blur_gaussian")),
    2: ("lens blur", ("blur", "blur_lens")),
    3: ("motion blur", ("blur", "blur_motion")),
    4: ("color diffusion", None),
    5: ("color shift", None),
    6: ("color quantization", ("quantization", None)),
    7: ("color saturation 1", ("saturate_weaken", "saturate_weaken_hsv")),
    8: ("color saturation 2", ("saturate_strengthen", None)),
    9: ("jpeg2000", ("compression", "compression_jpeg2000")),
    10: ("jpeg", ("compression", "compression_jpeg")),
    11: ("white noise", ("noise", "noise_gaussian_rgb")),
    12: ("white noise in color component", ("noise", "noise_gaussian_ycbcr")),
    13: ("impulse noise", ("noise", "noise_impulse")),
    14: ("multiplicative noise", ("noise", "noise_speckle")),
    15: ("denoise", None),
    16: ("brighten", ("brighten", None)),
    17: ("darken", ("darken", None)),
    18: ("mean shift", None),
    19: ("jitter", ("blur", "blur_jitter")),
    20: ("non-eccentricity patch", None),
    21: ("pixelate", ("pixelate", "pixelate")),
    22: ("quantization", ("quantization", "quantization_otsu")),
    23: ("color block", None),
    24: ("high sharpen", ("oversharpen", "oversharpen")),
    25: ("contrast change", None),
}

TID_TYPES: dict[int, tuple[str, tuple[str, str | None] | None]] = {
    1: ("additive gaussian noise", ("noise", "noise_gaussian_rgb")),
    2: ("additive noise in color components", ("noise", "noise_gaussian_ycbcr")),
    3: ("spatially correlated noise", ("noise", "noise_spatially_correlated")),
    4: ("masked noise", None),
    5: ("high frequency noise", None),
    6: ("impulse noise", ("noise", "noise_impulse")),
    7: ("quantization noise", ("quantization", None)),
    8: ("gaussian blur", ("blur", "blur_gaussian")),
    9: ("image denoising", None),
    10: ("jpeg compression", ("compression", "compression_jpeg")),
    11: ("jpeg2000 compression", ("compression", "compression_jpeg2000")),
    12: ("jpeg transmission errors", None),
    13: ("jpeg2000 transmission errors", None),
    14: ("non eccentricity pattern noise", None),
    15: ("local block-wise distortions", None),
    16: ("mean shift", None),
    17: ("contrast change", None),
    18: ("change of color saturation", None),
    19: ("multiplicative gaussian noise", ("noise", "noise_speckle")),
    20: ("comfort noise", None),
    21: ("lossy compression of noisy images", None),
    22: ("color quantization with dither", ("quantization", None)),
    23: ("chromatic aberrations", None),
    24: ("sparse sampling and reconstruction", None),
}


class QualityImportError(ValueError):
    """The folder does not look like the layout asked for; the message says what was expected."""


@dataclass
class QualityItem:
    """One image of a public set with its published MOS."""

    image: Path
    mos: float
    group: str | None = None
    reference: Path | None = None
    source_distortion: dict[str, Any] | None = None
    distortion: dict[str, Any] | None = None
    split: str = "test"


@dataclass
class Scan:
    items: list[QualityItem] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def _index(folder: Path, root: Path) -> dict[str, Path]:
    """Files of a folder by lower-case name (the sets mix .bmp/.BMP), only those resolving inside root."""
    if not folder.is_dir():
        return {}
    return {p.name.lower(): p for p in folder.iterdir() if p.is_file() and _inside(p, root)}


def _mapped(types: dict, type_id: int, level: int) -> tuple[dict, dict | None]:
    name, target = types.get(type_id, (f"type {type_id}", None))
    source = {"type": type_id, "name": name, "level": level, "mapped": target is not None}
    if target is None or not 1 <= level <= 5:
        return source, None
    category, function = target
    if function is not None and category_of(function) != category:
        raise AssertionError(f"mapping table error: {function} is not in {category}")
    return source, {"name": function, "category": category, "severity": level}


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise QualityImportError(f"{path}: not found; {what}")
    return path


def read_kadid10k(root: Path) -> Scan:
    """KADID-10k: dmos.csv + images/ (see the module docstring)."""
    csv_path = _need(root / "dmos.csv", "a KADID-10k folder holds dmos.csv (dist_img, ref_img, dmos, var)")
    files = {**_index(root, root), **_index(root / "images", root)}
    scan = Scan()
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name, ref = row.get("dist_img", "").strip(), row.get("ref_img", "").strip()
            m = re.fullmatch(r"(I\d+)_(\d+)_(\d+)\.\w+", name, re.IGNORECASE)
            img = files.get(name.lower())
            if not m or img is None:
                scan.problems.append((name or "?", "image not found" if m else "name is not Iaa_tt_ll.ext"))
                continue
            source, dist = _mapped(KADID_TYPES, int(m.group(2)), int(m.group(3)))
            scan.items.append(QualityItem(img, float(row["dmos"]), m.group(1).upper(), files.get(ref.lower()),
                                          source, dist))
    return scan


def read_tid2013(root: Path) -> Scan:
    """TID2013: mos_with_names.txt + distorted_images/ + reference_images/."""
    txt = _need(root / "mos_with_names.txt", "a TID2013 folder holds mos_with_names.txt ('MOS name' lines)")
    dist_files = _index(root / "distorted_images", root)
    ref_files = _index(root / "reference_images", root)
    scan = Scan()
    for line in txt.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        mos, name = parts
        m = re.fullmatch(r"(i\d+)_(\d+)_(\d+)\.\w+", name, re.IGNORECASE)
        img = dist_files.get(name.lower())
        if not m or img is None:
            scan.problems.append((name, "image not found in distorted_images/" if m else "name is not iaa_tt_l.ext"))
            continue
        group = m.group(1).upper()
        ref = next((p for n, p in ref_files.items() if n.split(".")[0] == group.lower()), None)
        source, dist = _mapped(TID_TYPES, int(m.group(2)), int(m.group(3)))
        scan.items.append(QualityItem(img, float(mos), group, ref, source, dist))
    return scan


_KONIQ_SPLIT = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}


def read_koniq10k(root: Path) -> Scan:
    """KonIQ-10k: koniq10k_scores_and_distributions.csv + 1024x768/ (optional official sets)."""
    csv_path = _need(root / "koniq10k_scores_and_distributions.csv",
                     "a KonIQ-10k folder holds koniq10k_scores_and_distributions.csv (image_name, MOS, ...)")
    files = _index(root / "1024x768", root)
    sets: dict[str, str] = {}
    sets_path = root / "koniq10k_distributions_sets.csv"
    if sets_path.is_file():
        with sets_path.open(newline="", encoding="utf-8") as fh:
            sets = {r["image_name"]: r.get("set", "") for r in csv.DictReader(fh)}
    scan = Scan()
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            name = row.get("image_name", "").strip()
            img = files.get(name.lower())
            if img is None or not row.get("MOS"):
                scan.problems.append((name or "?", "image not found in 1024x768/" if img is None else "no MOS"))
                continue
            split = _KONIQ_SPLIT.get((row.get("set") or sets.get(name) or "test").strip().lower(), "test")
            scan.items.append(QualityItem(img, float(row["MOS"]), None, None, None, None, split))
    return scan


READERS: dict[str, Callable[[Path], Scan]] = {"kadid10k": read_kadid10k, "tid2013": read_tid2013,
                                              "koniq10k": read_koniq10k}


def rating_for(mos: float, lo: float, hi: float) -> str:
    """Five equal bins of the MOS range, bad .. excellent (Q-Align's level split)."""
    k = min(4, max(0, int((mos - lo) / (hi - lo) * 5)))
    return RATINGS.ids[::-1][k]


def _answer(rating: str, dist: dict | None) -> str:
    lead = ""
    if dist is not None:
        what = DISTORTIONS[dist["name"]].text if dist["name"] else CATEGORIES[dist["category"]].text
        lead = f"The image shows {SEVERITIES[severity_name(dist['severity'])].text} {what}. "
    return f"{lead}Overall, the quality is {RATINGS[rating].text}."


def _place(src: Path, out: Path, rel: str, copy: bool) -> None:
    dst = out / rel
    if dst.exists() or dst.is_symlink():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def import_quality(layout: str, root: Path, out: Path, copy: bool = False, with_reference: bool = False,
                   pairs: int = 0, min_gap: float = 0.1, seed: int = 0, limit: int | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Convert one downloaded set into a Sample folder; returns counts and problems."""
    if layout not in READERS:
        raise QualityImportError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    root = Path(root)
    if not root.is_dir():
        raise QualityImportError(f"{root}: no such folder")
    scan = READERS[layout](root)
    items = scan.items[:limit] if limit else scan.items
    if not items:
        raise QualityImportError(f"{root}: no {layout} images found ({len(scan.problems)} problem(s), e.g. "
                           f"{scan.problems[:3]}); check --layout and --root")
    lo, hi = MOS_RANGE[layout]
    out = Path(out)
    splits: dict[str, list[Sample]] = defaultdict(list)
    question = canonical_question("quality.assess", False, with_reference)
    roles = image_roles_for("quality.assess", with_reference)
    for it in tqdm(items, desc=f"import {layout}", disable=not progress):
        rel = f"images/{it.image.name}"
        _place(it.image, out, rel, copy)
        images = [rel]
        if with_reference:
            if it.reference is None:
                scan.problems.append((it.image.name, "no reference image; left out (--with-reference)"))
                continue
            ref_rel = f"images/{it.reference.name}"
            _place(it.reference, out, ref_rel, copy)
            images = [ref_rel, rel]
        rating = rating_for(it.mos, lo, hi)
        meta: dict[str, Any] = {"mos": it.mos, "mos_range": [lo, hi], "rating": rating, "reference_group": it.group,
                                "source": f"{layout}:{it.image.name}", "labeller": f"import-{layout}",
                                "detail": "brief", "reference": with_reference}
        if it.source_distortion is not None:
            meta["source_distortion"] = it.source_distortion
        if it.distortion is not None:
            meta["distortions"] = [it.distortion]
        splits[it.split].append(Sample(
            id=f"{layout}-{it.image.stem}", task="quality.assess", images=images, image_roles=roles,
            messages=[{"role": "user", "content": user_content(roles, question)},
                      {"role": "assistant", "content": [{"type": "text", "text": _answer(rating, it.distortion)}]}],
            meta=meta))
    if pairs:
        splits["test"] += _pairs(items, pairs, (hi - lo) * min_gap, seed, layout)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        save_jsonl(splits.get(split, []), out / f"{split}.jsonl")
    _card(out, layout, splits, scan, copy, with_reference, pairs, min_gap)
    return {"counts": {k: len(v) for k, v in splits.items()}, "problems": scan.problems}


def _pairs(items: list[QualityItem], n: int, gap: float, seed: int, layout: str) -> list[Sample]:
    """A/B pairs within one reference group, MOS apart by at least ``gap``, A better half the time."""
    rng = random.Random(seed)
    groups: dict[str, list[QualityItem]] = defaultdict(list)
    for it in items:
        if it.group is not None:
            groups[it.group].append(it)
    candidates = [(a, b) for g in groups.values() for i, a in enumerate(g) for b in g[i + 1:]
                  if abs(a.mos - b.mos) >= gap]
    rng.shuffle(candidates)
    roles = image_roles_for("quality.rate")
    question = canonical_question("quality.rate")
    samples = []
    for k, (a, b) in enumerate(candidates[:n]):
        if rng.random() < 0.5:
            a, b = b, a
        better = "A" if a.mos > b.mos else "B"
        rels = [f"images/{a.image.name}", f"images/{b.image.name}"]
        samples.append(Sample(
            id=f"{layout}-pair-{k:06d}", task="quality.rate", images=rels, image_roles=roles,
            messages=[{"role": "user", "content": user_content(roles, question)},
                      {"role": "assistant", "content": [{"type": "text", "text": f"Image {better} is better."}]}],
            meta={"better": better, "mos_A": a.mos, "mos_B": b.mos, "reference_group": a.group,
                  "labeller": f"import-{layout}", "detail": "brief", "reference": False}))
    return samples


def _card(out: Path, layout: str, splits: dict, scan: Scan, copy: bool, with_reference: bool, pairs: int,
          min_gap: float) -> None:
    types = {"kadid10k": KADID_TYPES, "tid2013": TID_TYPES}.get(layout, {})
    lines = [f"# {layout} imported for Loupe evaluation", "",
             f"- builder: import-quality --layout {layout}" + (" --with-reference" if with_reference else "")
             + (f" --pairs {pairs} --min-gap {min_gap}" if pairs else ""),
             f"- images: {'copied' if copy else 'symlinked'} into images/",
             f"- MOS range {MOS_RANGE[layout]} (higher is better); rating = five equal bins of the range",
             "- counts: " + ", ".join(f"{k} {len(v)}" for k, v in sorted(splits.items())),
             f"- problems: {len(scan.problems)}", ""]
    if types:
        lines += ["## Distortion mapping", "", "| id | set's type | Loupe category | Loupe function |",
                  "|---|---|---|---|"]
        for tid, (name, target) in types.items():
            cat, fn = target if target else ("unmapped", None)
            lines.append(f"| {tid} | {name} | {cat} | {fn or '-'} |")
        lines.append("")
    if scan.problems:
        lines += ["## Problems (first 50)", ""] + [f"- {n}: {why}" for n, why in scan.problems[:50]]
    (out / "card.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe build-data import-quality",
        description="Convert a downloaded quality set with MOS (KADID-10k, TID2013, KonIQ-10k) into a Loupe dataset "
                    "folder for `loupe eval` (records are quality.assess with meta.mos).",
        epilog="example:\n  loupe build-data import-quality --layout kadid10k --root ~/data/kadid10k --out data/kadid\n"
               "  loupe eval --data data/kadid/test.jsonl --out reports/kadid",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="which set the folder holds")
    p.add_argument("--root", required=True, type=Path, help="the downloaded set's folder")
    p.add_argument("--out", required=True, type=Path, help="output dataset folder")
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.add_argument("--with-reference", action="store_true",
                   help="give the pristine reference image too (full-reference variant; KADID/TID only)")
    p.add_argument("--pairs", type=int, default=0, metavar="N", help="also make N quality.rate A/B pairs (KADID/TID)")
    p.add_argument("--min-gap", type=float, default=0.1, metavar="F",
                   help="A/B pairs differ in MOS by at least this share of the MOS range (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed for pair sampling")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N images")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        res = import_quality(args.layout, args.root, args.out, copy=args.copy, with_reference=args.with_reference,
                             pairs=args.pairs, min_gap=args.min_gap, seed=args.seed, limit=args.limit)
    except (QualityImportError, OSError) as exc:
        print(f"loupe build-data import-quality: {exc}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in sorted(res["counts"].items()))
    print(f"wrote {args.out} ({counts}); {len(res['problems'])} problem(s) listed in {args.out}/card.md")
    kinds = Counter(why for _, why in res["problems"])
    for why, n in kinds.most_common(3):
        print(f"  {n} x {why}")
    return 0
