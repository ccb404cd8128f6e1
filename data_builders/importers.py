"""``loupe build-data import-forgery``: convert a downloaded forgery dataset to Loupe's format.

Layouts (``--layout``) and the name rules that pair each image with its mask (never file order):

* ``casia`` (CASIA v1.0 / v2.0 with the community ground truth): anywhere under the root,
  ``Au_<cat>_<num>.*`` is authentic; ``Sp_<S|D>_...`` (v1) and ``Tp_<S|D>_...`` (v2) are tampered,
  ``S`` = same source image (copy-move), ``D`` = different (splice); the mask of ``<stem>.*`` is
  ``<stem>_gt.*`` (or ``<stem>_mask.*``). Source ids in the names (``ani00018``, ``sec00096``) join the
  tampered image and its authentic sources into one split group.
* ``columbia`` (Columbia Uncompressed Image Splicing): ``4cam_auth/*.tif`` authentic,
  ``4cam_splc/*.tif`` spliced, mask ``4cam_splc/edgemask/<stem>_edgemask.*``: a colour mask whose
  green area is the spliced region.
* ``coverage`` (COVERAGE copy-move): ``image/<n>.tif`` authentic, ``image/<n>t.tif`` tampered, mask
  ``mask/<n>forged.tif`` (the pasted region); pair ``n`` is one split group.
* ``nist16`` (NIST Nimble 2016): the pipe-separated ``reference/manipulation/NC2016-manipulation-ref.csv``
  names each probe, its mask and its manipulation types; masks are inverted (black = manipulated).
* ``imd2020``: one folder per original photo: ``<id>_orig.*`` authentic, ``<name>.*`` tampered with
  mask ``<name>_mask.*``; the folder is the split group.
* ``folder``: ``images/`` and ``masks/``; a mask is named like its image, optionally with ``_mask``,
  ``_gt``, ``-mask``, ``_m`` or a ``mask_`` prefix, in any image format.

Masks are normalised (``normalise_mask``): 3-channel and 16-bit masks are reduced to one 8-bit
channel, 0/1 masks scaled, anti-aliased grey levels thresholded, inverted masks (known for NIST,
detected otherwise) flipped, and a size mismatch fixed when only the scale differs. Everything that
could not be paired or fixed is listed, with its reason, in ``import_report.md`` in the output folder.

Security: only files under ``--root`` are read; symlinks and CSV paths that lead outside it are
reported and skipped.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
from tqdm import tqdm

from loupe_vlm.prompts import MANIPULATION_DOMAIN, Sample, image_roles_for, training_question, user_content

from . import forgery_text

log = logging.getLogger(__name__)

TASK = "forgery.detect"
LAYOUTS = ("casia", "columbia", "coverage", "nist16", "imd2020", "folder")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
MIN_REGION = 0.001  # components below this fraction of the image join the largest region
MAX_REGIONS = 4  # more separate components than this: one region (one mask token) for all


class MaskProblem(ValueError):
    """A mask that cannot be used for its image (the reason goes into the report)."""


@dataclass
class Pair:
    """One image to import: its mask (None for authentic), manipulation, split group, mask style."""

    image: Path
    mask: Path | None
    manipulation: str | None
    group: str
    invert: bool | None = None  # True: known inverted (NIST); None: detect
    style: str = "binary"  # or "columbia" (colour edge mask)


@dataclass
class Scan:
    """What a layout reader found: pairs to import and problems (path relative to the root, reason)."""

    pairs: list[Pair] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


# ---- safe file walking ---------------------------------------------------------------------------

def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except (ValueError, OSError):
        return False


def _walk(top: Path, scan: Scan, root: Path | None = None) -> list[Path]:
    """Image files under ``top`` (sorted), never following a link out of ``root`` (default ``top``).

    Links that lead out are reported (paths relative to ``root``) and skipped.
    """
    root = root or top
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        d = Path(dirpath)
        for name in list(dirnames):
            if (d / name).is_symlink():
                dirnames.remove(name)
                scan.problems.append((_rel(d / name, root), "symlinked folder not followed"))
        for name in filenames:
            p = d / name
            if p.suffix.lower() not in IMAGE_EXTS:
                continue
            if p.is_symlink() and not _inside(p, root):
                scan.problems.append((_rel(p, root), "link to a file outside the root; skipped"))
                continue
            out.append(p)
    return sorted(out)


def _rel(p: Path, root: Path) -> str:
    try:
        return str(p.relative_to(root))
    except ValueError:
        return str(p)


def _by_stem(files: list[Path], root: Path, scan: Scan) -> dict[str, Path]:
    """Map stem -> file; a stem held by two files (e.g. x.jpg and x.tif) is ambiguous and reported."""
    seen: dict[str, list[Path]] = {}
    for f in files:
        seen.setdefault(f.stem, []).append(f)
    out = {}
    for stem, fs in seen.items():
        if len(fs) > 1:
            scan.problems.append((", ".join(_rel(f, root) for f in fs), "several files share this name; "
                                  "keep one and re-run"))
        else:
            out[stem] = fs[0]
    return out


# ---- layouts -------------------------------------------------------------------------------------

class _Groups:
    """Union-find over names: images that share a source photo end up in one split group."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


_CASIA_TAMPERED = re.compile(r"^(Sp|Tp)_([SD])_", re.IGNORECASE)
_CASIA_AUTH = re.compile(r"^Au_([a-z]{3})_?(\d+)$", re.IGNORECASE)
_CASIA_SOURCE = re.compile(r"(?<![a-z])([a-z]{3})(\d{4,5})(?!\d)", re.IGNORECASE)


def _casia_source_ids(stem: str) -> list[str]:
    """Source photo ids named in a CASIA stem: ``ani00018`` -> ``ani18`` (v1 and v2 pad differently)."""
    return [f"{c.lower()}{int(n)}" for c, n in _CASIA_SOURCE.findall(stem)]


def scan_casia(root: Path) -> Scan:
    scan = Scan()
    files = _walk(root, scan)
    masks = {f.stem[:-len(suffix)]: f for f in files for suffix in ("_gt", "_mask")
             if f.stem.lower().endswith(suffix)}
    images = [f for f in files if not f.stem.lower().endswith(("_gt", "_mask"))]
    groups = _Groups()
    entries: list[tuple[Path, str | None, Path | None]] = []
    used: set[str] = set()
    for f in images:
        auth = _CASIA_AUTH.match(f.stem)
        tam = _CASIA_TAMPERED.match(f.stem)
        if auth:
            groups.union(f.stem, f"{auth.group(1).lower()}{int(auth.group(2))}")
            entries.append((f, None, None))
        elif tam:
            manip = "copy_move" if tam.group(2).upper() == "S" else "splice"
            for sid in _casia_source_ids(f.stem[len(tam.group(0)):]):
                groups.union(f.stem, sid)
            mask = masks.get(f.stem)
            if mask is None:
                scan.problems.append((_rel(f, root), f"no ground-truth mask (expected {f.stem}_gt.png)"))
                continue
            used.add(f.stem)
            entries.append((f, manip, mask))
        else:
            scan.problems.append((_rel(f, root), "name is not a CASIA image (Au_*, Sp_*, Tp_*)"))
    for stem, m in sorted(masks.items()):
        if stem not in used:
            scan.problems.append((_rel(m, root), "mask without a matching tampered image"))
    for f, manip, mask in entries:
        scan.pairs.append(Pair(f, mask, manip, "casia:" + groups.find(f.stem)))
    return scan


def _find_dir(root: Path, name: str) -> Path | None:
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        for d in dirnames:
            if d.lower() == name.lower() and not (Path(dirpath) / d).is_symlink():
                return Path(dirpath) / d
    return None


def scan_columbia(root: Path) -> Scan:
    scan = Scan()
    auth_dir, splc_dir = _find_dir(root, "4cam_auth"), _find_dir(root, "4cam_splc")
    if auth_dir is None and splc_dir is None:
        raise FileNotFoundError(f"{root}: no 4cam_auth/ or 4cam_splc/ folder; is this the Columbia "
                                "Uncompressed Image Splicing dataset?")
    if auth_dir is not None:
        for f in _walk(auth_dir, scan, root):
            if f.parent == auth_dir:
                scan.pairs.append(Pair(f, None, None, "columbia:" + f.stem))
    if splc_dir is not None:
        files = _walk(splc_dir, scan, root)
        edge = {f.stem[:-len("_edgemask")]: f for f in files if f.stem.lower().endswith("_edgemask")}
        used = set()
        for f in files:
            if f.parent != splc_dir:
                continue
            mask = edge.get(f.stem)
            if mask is None:
                scan.problems.append((_rel(f, root), f"no edge mask (expected edgemask/{f.stem}_edgemask.jpg)"))
                continue
            used.add(f.stem)
            # The sources of a Columbia splice are not named; each spliced image is its own group.
            scan.pairs.append(Pair(f, mask, "splice", "columbia:" + f.stem, style="columbia"))
        for stem, m in sorted(edge.items()):
            if stem not in used:
                scan.problems.append((_rel(m, root), "edge mask without a matching spliced image"))
    return scan


def scan_coverage(root: Path) -> Scan:
    scan = Scan()
    img_dir, mask_dir = _find_dir(root, "image"), _find_dir(root, "mask")
    if img_dir is None:
        raise FileNotFoundError(f"{root}: no image/ folder; is this the COVERAGE dataset?")
    masks = _by_stem(_walk(mask_dir, scan, root), root, scan) if mask_dir else {}
    used = set()
    for f in _walk(img_dir, scan, root):
        m = re.fullmatch(r"(\d+)(t?)", f.stem)
        if not m:
            scan.problems.append((_rel(f, root), "name is not COVERAGE's <n>.tif / <n>t.tif"))
            continue
        group = "coverage:" + m.group(1)
        if not m.group(2):
            scan.pairs.append(Pair(f, None, None, group))
            continue
        mask = masks.get(f"{m.group(1)}forged")
        if mask is None:
            scan.problems.append((_rel(f, root), f"no mask (expected mask/{m.group(1)}forged.tif)"))
            continue
        used.add(mask.stem)
        scan.pairs.append(Pair(f, mask, "copy_move", group))
    for stem, p in sorted(masks.items()):
        if stem.endswith("forged") and stem not in used:
            scan.problems.append((_rel(p, root), "mask without a matching tampered image"))
    return scan


_NIST_TYPES = {"IsManipulationTypeRemoval": "removal", "IsManipulationTypeSplice": "splice",
               "IsManipulationTypeCopyClone": "copy_move"}


def scan_nist16(root: Path) -> Scan:
    scan = Scan()
    refs = sorted(p for p in root.rglob("*-manipulation-ref.csv") if _inside(p, root))
    if not refs:
        raise FileNotFoundError(f"{root}: no reference/manipulation/NC2016-manipulation-ref.csv; the nist16 "
                                "layout pairs probes and masks through that file")
    ref = refs[0]
    base = ref.parent.parent.parent  # <base>/reference/manipulation/<file>.csv
    seen: set[str] = set()
    with ref.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="|"):
            probe_rel = (row.get("ProbeFileName") or "").strip()
            if not probe_rel or probe_rel in seen:
                continue
            seen.add(probe_rel)
            probe = base / probe_rel
            if not _inside(probe, root):
                scan.problems.append((probe_rel, "path leads outside the root; skipped"))
                continue
            if not probe.is_file():
                scan.problems.append((probe_rel, "probe named in the reference CSV is missing"))
                continue
            group = "nist16:" + ((row.get("BaseFileName") or "").strip() or (row.get("ProbeFileID") or probe.stem))
            if (row.get("IsTarget") or "").strip().upper() != "Y":
                scan.pairs.append(Pair(probe, None, None, group))
                continue
            types = [m for col, m in _NIST_TYPES.items() if (row.get(col) or "").strip().upper() == "Y"]
            manip = types[0] if len(types) == 1 else None  # several kinds at once: left unnamed
            mask_rel = (row.get("ProbeMaskFileName") or "").strip()
            candidates = [mask_rel] + [mask_rel.replace("/manipulation/", f"/{k}/") for k in ("removal", "splice")]
            if mask_rel and not _inside(base / mask_rel, root):
                scan.problems.append((probe_rel, f"mask path {mask_rel} leads outside the root; skipped"))
                continue
            mask = next((base / c for c in candidates if c and _inside(base / c, root) and (base / c).is_file()), None)
            if mask is None:
                scan.problems.append((probe_rel, f"mask {mask_rel or '(none named)'} is missing"))
                continue
            scan.pairs.append(Pair(probe, mask, manip, group, invert=True))
    return scan


def scan_imd2020(root: Path) -> Scan:
    scan = Scan()
    files = _walk(root, scan)
    by_dir: dict[Path, list[Path]] = {}
    for f in files:
        by_dir.setdefault(f.parent, []).append(f)
    for d, fs in sorted(by_dir.items()):
        group = "imd2020:" + _rel(d, root)
        stems = _by_stem(fs, root, scan)
        masks = {s[:-len("_mask")]: p for s, p in stems.items() if s.endswith("_mask")}
        used = set()
        for stem, f in sorted(stems.items()):
            if stem.endswith("_mask"):
                continue
            if stem.endswith("_orig"):
                scan.pairs.append(Pair(f, None, None, group))
                continue
            mask = masks.get(stem)
            if mask is None:
                scan.problems.append((_rel(f, root), f"no mask (expected {stem}_mask.png)"))
                continue
            used.add(stem)
            scan.pairs.append(Pair(f, mask, None, group))
        for stem, m in sorted(masks.items()):
            if stem not in used:
                scan.problems.append((_rel(m, root), "mask without a matching image"))
    return scan


_FOLDER_MASK_NAMES: tuple[Callable[[str], str], ...] = (
    lambda s: s, lambda s: s + "_mask", lambda s: s + "_gt", lambda s: s + "-mask", lambda s: s + "_m",
    lambda s: "mask_" + s)


def scan_folder(root: Path, unmasked: str = "report", manipulation: str | None = None) -> Scan:
    """``images/`` + ``masks/``. Images without a mask are authentic with ``unmasked='authentic'``."""
    scan = Scan()
    img_dir, mask_dir = root / "images", root / "masks"
    if not img_dir.is_dir():
        raise FileNotFoundError(f"{root}: no images/ folder; the folder layout is images/ + masks/")
    masks = _by_stem(_walk(mask_dir, scan, root), root, scan) if mask_dir.is_dir() else {}
    used = set()
    for stem, f in sorted(_by_stem(_walk(img_dir, scan, root), root, scan).items()):
        names = [rule(stem) for rule in _FOLDER_MASK_NAMES]
        found = [n for n in names if n in masks]
        if len(found) > 1:
            scan.problems.append((_rel(f, root), f"several candidate masks {found}; keep one"))
            continue
        if not found:
            if unmasked == "authentic":
                scan.pairs.append(Pair(f, None, None, "folder:" + stem))
            else:
                scan.problems.append((_rel(f, root), "no mask (expected masks/<name>.png, <name>_mask.png or "
                                      "<name>_gt.png); pass --unmasked authentic if such images are authentic"))
            continue
        used.add(found[0])
        scan.pairs.append(Pair(f, masks[found[0]], manipulation, "folder:" + stem))
    for stem, m in sorted(masks.items()):
        if stem not in used:
            scan.problems.append((_rel(m, root), "mask without a matching image"))
    return scan


# ---- masks ---------------------------------------------------------------------------------------

def read_mask(path: Path) -> np.ndarray:
    """A mask file as it is stored (any depth, 1-4 channels)."""
    buf = np.fromfile(str(path), np.uint8)
    m = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if m is None:
        raise MaskProblem("unreadable mask file")
    return m


def normalise_mask(raw: np.ndarray, size: tuple[int, int], invert: bool | None = None,
                   style: str = "binary") -> tuple[np.ndarray, list[str]]:
    """A binary uint8 mask (255 = tampered) at ``size`` (height, width), and the fixes applied.

    ``invert``: True (known inverted, e.g. NIST), False (never) or None (flip when more than half of
    the mask and most of its border are white, the look of an inverted mask). ``style='columbia'``
    reads Columbia's colour edge masks (green = spliced). Raises ``MaskProblem`` when the mask cannot
    be made to fit.
    """
    notes: list[str] = []
    m = raw
    if m.dtype != np.uint8:
        if m.dtype == bool:
            m = m.astype(np.uint8)
        else:
            m = (m.astype(np.float64) * (255.0 / max(float(np.iinfo(m.dtype).max) if m.dtype.kind in "ui" else 1.0,
                                                      1e-9))).clip(0, 255).astype(np.uint8)
            notes.append(f"{raw.dtype} mask scaled to 8 bits")
    if m.ndim == 3:
        if m.shape[2] == 4:
            m = m[..., :3]
        if style == "columbia":  # OpenCV order is BGR: green high, red low marks the spliced region
            m = (((m[..., 1] > 127) & (m[..., 2] < 128)) * 255).astype(np.uint8)
            notes.append("Columbia edge mask: green region taken")
        else:
            same = bool(np.all(np.abs(m.astype(np.int16) - m[..., :1]) <= 8))
            m = m[..., 0] if same else m.max(axis=2)
            notes.append("colour (RGB) mask reduced to one channel"
                         + ("" if same else " (any channel marks the region)"))
    if m.max() == 1:
        m = m * 255
        notes.append("0/1 mask scaled to 0/255")
    grey = int(np.count_nonzero((m > 0) & (m < 255)))
    binary = (m >= 128).astype(np.uint8) * 255
    if grey:
        notes.append(f"{grey} anti-aliased/grey pixel(s) thresholded at 128")
    if invert is None:
        border = np.concatenate([binary[0], binary[-1], binary[:, 0], binary[:, -1]])
        if binary.mean() / 255 > 0.5 and border.mean() / 255 > 0.5:
            invert = True
            notes.append(f"looked inverted ({100 * binary.mean() / 255:.0f}% white, white border); inverted")
    elif invert:
        notes.append("inverted (layout stores black = tampered)")
    if invert:
        binary = 255 - binary
    h, w = size
    mh, mw = binary.shape
    if (mh, mw) != (h, w):
        if (mh, mw) == (w, h) and h != w:
            raise MaskProblem(f"mask is {mw}x{mh} but the image is {w}x{h} (rotated?); fix the mask")
        if abs(mw / mh - w / h) > 0.02 * (w / h):
            raise MaskProblem(f"mask is {mw}x{mh} but the image is {w}x{h} (different aspect); cannot pair")
        binary = cv2.resize(binary, (w, h), interpolation=cv2.INTER_NEAREST)
        notes.append(f"resized from {mw}x{mh} to {w}x{h}")
    return binary, notes


def split_regions(mask: np.ndarray, min_area: float = MIN_REGION, max_regions: int = MAX_REGIONS) -> list[np.ndarray]:
    """One mask per region: connected components above ``min_area`` (small ones join the largest).

    The union of the returned masks is exactly ``mask``. With more than ``max_regions`` components,
    the whole mask is one region.
    """
    n, labels, stats, _ = cv2.connectedComponentsWithStats((mask > 127).astype(np.uint8), connectivity=8)
    if n <= 1:
        return []
    areas = stats[1:, cv2.CC_STAT_AREA] / mask.size
    big = [i + 1 for i in np.argsort(-areas) if areas[i] >= min_area]
    if not big:
        big = [1 + int(np.argmax(areas))]
    if len(big) > max_regions:
        return [(mask > 127).astype(np.uint8) * 255]
    out = [(labels == i) for i in big]
    small = (labels > 0) & ~np.isin(labels, big)
    out[0] |= small
    # Order regions by position (top to bottom, left to right), as an answer reads them.
    order = sorted(range(len(out)), key=lambda k: tuple(np.argwhere(out[k]).mean(0).round(-1)))
    return [out[k].astype(np.uint8) * 255 for k in order]


# ---- import --------------------------------------------------------------------------------------

def scan(layout: str, root: Path, unmasked: str = "report", manipulation: str | None = None) -> Scan:
    """Pairs and problems of a dataset in ``layout`` under ``root``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; pass the dataset's root with --root")
    if layout == "folder":
        return scan_folder(root, unmasked, manipulation)
    return {"casia": scan_casia, "columbia": scan_columbia, "coverage": scan_coverage, "nist16": scan_nist16,
            "imd2020": scan_imd2020}[layout](root)


@dataclass
class ImportConfig:
    """Settings of one import (the CLI maps onto these fields)."""

    layout: str
    root: Path
    out: Path
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    unmasked: str = "report"
    manipulation: str | None = None
    invert: str = "auto"
    max_side: int = 0
    overwrite: bool = False


def _load_image(path: Path) -> np.ndarray:
    buf = np.fromfile(str(path), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise MaskProblem("unreadable image file")
    return np.ascontiguousarray(img[..., ::-1])


def import_dataset(cfg: ImportConfig) -> dict[str, Any]:
    """Convert the dataset; returns a summary (written, problems, fixes, card and report paths)."""
    from .sources import SourceImage, split_by_source
    from .writer import DatasetWriter

    root = cfg.root
    found = scan(cfg.layout, root, cfg.unmasked, cfg.manipulation)
    problems = list(found.problems)
    sources = [SourceImage(id=str(p.image), source=cfg.layout, group=p.group, origin=str(root),
                           licence="see the dataset's own licence", path=str(p.image)) for p in found.pairs]
    split_of = {s.id: split for split, ss in split_by_source(sources, cfg.fractions, cfg.seed).items() for s in ss}
    writer = DatasetWriter(cfg.out, builder=f"import-forgery:{cfg.layout}", seed=cfg.seed,
                           labeller=forgery_text.LABELLER_ID, overwrite=cfg.overwrite)
    done = writer.done_ids()
    fixes: Counter = Counter()
    kinds: Counter = Counter()
    written = 0
    force = {"auto": None, "yes": True, "no": False}[cfg.invert]
    roles = image_roles_for(TASK)
    for k, pair in enumerate(tqdm(found.pairs, desc=f"import {cfg.layout}", unit="image", disable=None)):
        sid = f"{cfg.layout}-{k:06d}"
        if sid in done:
            continue
        rel = _rel(pair.image, root)
        try:
            img = _load_image(pair.image)
            masks: list[np.ndarray] = []
            if pair.mask is not None:
                invert = pair.invert if force is None else force
                mask, notes = normalise_mask(read_mask(pair.mask), img.shape[:2], invert, pair.style)
                fixes.update(re.sub(r"\d+", "N", n) for n in notes)
                if cfg.max_side and max(img.shape[:2]) > cfg.max_side:
                    f = cfg.max_side / max(img.shape[:2])
                    size = (round(img.shape[1] * f), round(img.shape[0] * f))
                    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
                    mask = (cv2.resize(mask, size, interpolation=cv2.INTER_AREA) >= 128).astype(np.uint8) * 255
                masks = split_regions(mask)
                if not masks:
                    raise MaskProblem("mask is empty after normalisation (all black); check it")
            elif cfg.max_side and max(img.shape[:2]) > cfg.max_side:
                f = cfg.max_side / max(img.shape[:2])
                img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
        except (MaskProblem, OSError, cv2.error) as exc:
            problems.append((rel, str(exc)))
            continue
        tampered = bool(masks)
        meta: dict[str, Any] = {
            "tampered": tampered, "manipulation": pair.manipulation if tampered else None,
            "domain": MANIPULATION_DOMAIN[pair.manipulation] if tampered and pair.manipulation else None,
            "regions": [forgery_text.region_facts(m) for m in masks],
            "cues": [] if tampered else ["consistent"], "post": [],
            "source": f"{cfg.layout}:{rel}", "source_photo": pair.group, "labeller": forgery_text.LABELLER_ID,
            "mask_file": _rel(pair.mask, root) if pair.mask else None,
        }
        text_rng = random.Random(f"{cfg.seed}:{sid}")
        detail = text_rng.random() < 0.5
        meta["detail"] = "detailed" if detail else "brief"
        text = forgery_text.answer(meta, detail, text_rng, size=(img.shape[1], img.shape[0]))
        image_rel = f"images/{sid}.png"
        mask_rels = [f"masks/{sid}-{j}.png" for j in range(len(masks))]
        sample = Sample(id=sid, task=TASK, images=[image_rel], image_roles=roles,
                        messages=[{"role": "user",
                                   "content": user_content(roles, training_question(TASK, detail, False, text_rng))},
                                  {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                        masks=mask_rels, meta=meta)
        writer.write(split_of[str(pair.image)], sample, {image_rel: img}, dict(zip(mask_rels, masks)))
        kinds[(pair.manipulation or "unknown") if tampered else "authentic"] += 1
        written += 1
    report = cfg.out / "import_report.md"
    _write_report(report, cfg, found, problems, fixes)
    card = writer.finish({
        "Imported from": [f"layout: `{cfg.layout}`", f"root: `{root}`",
                          "images re-encoded as PNG from the decoded pixels (JPEG originals keep their "
                          "compression traces)", "answers: template wording of the mask facts; evidence cues "
                          "are not stated (the source datasets do not record them)"],
        "Samples per kind (this run)": dict(kinds),
        "Mask fixes applied": dict(fixes) or "none",
        "Not imported": f"{len(problems)} item(s); every one with its reason in `import_report.md`",
    }, title=f"Loupe forgery dataset imported from {cfg.layout}")
    return {"written": written, "pairs": len(found.pairs), "problems": problems, "fixes": dict(fixes),
            "card": str(card), "report": str(report)}


def _write_report(path: Path, cfg: ImportConfig, found: Scan, problems: list[tuple[str, str]],
                  fixes: Counter) -> None:
    lines = [f"# Import report: {cfg.layout}", "", f"- root: `{cfg.root}`", f"- pairs found: {len(found.pairs)}",
             f"- not imported: {len(problems)}", "", "## Mask fixes", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(fixes.items())] or ["- none"]
    lines += ["", "## Items that could not be imported", "", "| path | reason |", "|---|---|"]
    lines += [f"| `{p}` | {r} |" for p, r in problems] or ["| - | none |"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---- CLI -----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe build-data import-forgery",
        description="Convert a downloaded forgery dataset (CASIA v1/v2, Columbia, COVERAGE, NIST16, IMD2020, or "
                    "images/ + masks/) into a Loupe forgery.detect dataset. Images and masks are paired by name "
                    "rules, masks are normalised, and everything not imported is listed in import_report.md.",
        epilog="Example: loupe build-data import-forgery --layout casia --root ~/data/CASIA2 --out data/casia2")
    p.add_argument("--layout", required=True, choices=LAYOUTS, help="the dataset's layout")
    p.add_argument("--root", required=True, type=Path, help="the dataset's root folder (nothing outside it is read)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write or resume")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of the answer wording")
    p.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="split fractions by source photo; 0 0 1 puts everything in test (default 0.8 0.1 0.1)")
    p.add_argument("--unmasked", choices=("report", "authentic"), default="report",
                   help="folder layout: images without a mask are reported (default) or imported as authentic")
    p.add_argument("--manipulation", default=None, help="folder layout: the manipulation id of every tampered image")
    p.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                   help="mask polarity: auto (layout's known polarity, else detect), yes or no")
    p.add_argument("--max-side", type=int, default=0, help="downscale images (and masks) to this long side; 0: keep")
    p.add_argument("--overwrite", action="store_true", help="remove an existing dataset in --out first")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if args.manipulation is not None and args.manipulation not in MANIPULATION_DOMAIN:
        print(f"loupe build-data import-forgery: unknown --manipulation {args.manipulation!r}; choose from "
              f"{', '.join(MANIPULATION_DOMAIN)}", file=sys.stderr)
        return 2
    cfg = ImportConfig(layout=args.layout, root=args.root, out=args.out, seed=args.seed, fractions=tuple(args.split),
                       unmasked=args.unmasked, manipulation=args.manipulation, invert=args.invert,
                       max_side=args.max_side, overwrite=args.overwrite)
    try:
        summary = import_dataset(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loupe build-data import-forgery: {exc}", file=sys.stderr)
        return 2
    log.info("imported %d of %d pairs; %d item(s) not imported (see %s); card: %s", summary["written"],
             summary["pairs"], len(summary["problems"]), summary["report"], summary["card"])
    return 0 if summary["written"] else 1


if __name__ == "__main__":
    sys.exit(main())
