"""Pristine image sources: folders, globs, manifests, and a built-in pool that needs no download.

The built-in pool (``builtin_pool``) has three parts, each measured in the dataset card:

* ``photos``: real colour photographs that install with the package registries: scikit-image's
  bundled samples, matplotlib's sample data and the example data of Debian's ``opencv-doc``
  (``/usr/share/doc/opencv-doc/examples/data``, plain or ``.gz``). Grey, flat or synthetic art
  (logos, charts, chessboards, text) is filtered by colour statistics (``_looks_like_photo``), a
  short deny list removes photos that are not pristine (a forged ELA example, a motion-blurred
  plate, a painting), and near-duplicates (stereo pairs, video frames) share one ``group`` so they
  always land in the same split. Plus ``package_photos``: ~327 checked photos from five Debian data
  packages (gcompris-qt-data, lomiri-wallpapers-16.04, kphotoalbum, jigzo-data, palapeli-data; see
  ``photo_pool``), only the listed files, each with its package's licence.
* ``procedural``: natural-statistics scenes made from a seed: the dead-leaves model (occluding discs
  with power-law radii, whose statistics match natural images), 1/f fractal textures and smooth
  gradient scenes (which show banding and quantization well).
* ``stamps``: Tux Paint's photographic cut-outs (Debian ``tuxpaint-stamps-default``), composited with
  their alpha onto procedural backgrounds. Each scene uses its own disjoint set of stamps, so a
  stamp never appears in two splits.

Every ``SourceImage`` has a ``group``: the split key. ``split_by_source`` assigns whole groups to
train/val/test. Everything is deterministic given a seed.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np

from . import photo_pool

log = logging.getLogger(__name__)

OPENCV_DOC_DATA = Path("/usr/share/doc/opencv-doc/examples/data")
TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Photos that pass the colour filter but are not pristine photographs.
_DENY = {
    "opencv-doc:ela_modified",  # a forged image (ELA example)
    "opencv-doc:licenseplate_motion",  # motion-blurred on purpose
    "opencv-doc:starry_night",  # a painting
    "opencv-doc:WindowsLogo",  # a logo
    "opencv-doc:text_defocus", "opencv-doc:text_motion",  # deblurring examples
}

PROCEDURAL_KINDS = ("dead_leaves", "fractal", "gradient")
# How many seeds of each procedural kind the built-in pool holds (each is one "photo" group).
PROCEDURAL_COUNT = {"dead_leaves": 200, "fractal": 200, "gradient": 100}
PROCEDURAL_SIZE = 640
STAMPS_PER_SCENE = 3


@dataclass(frozen=True)
class SourceImage:
    """One pristine image: a file, or a procedural recipe (``generator`` + ``seed``).

    ``group`` is the split key (near-duplicates share it); ``source`` names the pool it came from;
    ``origin`` and ``licence`` go into the dataset card.
    """

    id: str
    source: str
    group: str
    origin: str
    licence: str
    path: str | None = None
    generator: str | None = None
    seed: int = 0
    stamps: tuple[str, ...] = field(default=(), compare=False)
    member: str | None = None
    """An image inside ``path`` (a Qt .rcc resource path, a .pzl entry name)."""
    crop: tuple[int, int] | None = None
    """Keep only ``(0, 0, W, H)`` of the decoded image (a texture atlas)."""
    rotate: int = 0
    """Degrees clockwise to turn the decoded image upright."""
    long_side: int | None = None
    """Shrink (INTER_AREA) on load so the long side is at most this."""

    def load(self) -> np.ndarray:
        """The image as uint8 HxWx3 RGB."""
        if self.path is not None and (self.member or self.crop or self.rotate or self.long_side):
            return photo_pool.decode(self.path, self.member, self.crop, self.rotate, self.long_side)
        if self.path is not None:
            return load_rgb(self.path)
        if self.generator == "stamp_scene":
            return stamp_scene(self.stamps, self.seed)
        if self.generator in PROCEDURAL_KINDS:
            return procedural(self.generator, self.seed)
        raise ValueError(f"source {self.id!r} has neither a path nor a known generator ({self.generator!r})")


# ---- file io -------------------------------------------------------------------------------------

def _read_bytes(path: str | os.PathLike) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such image file; check the path or the --images argument")
    data = p.read_bytes()
    if p.suffix == ".gz":
        data = gzip.decompress(data)
    return data


def load_rgba(path: str | os.PathLike) -> np.ndarray:
    """Read an image as uint8 HxWx4 RGBA (opaque alpha when the file has none)."""
    buf = np.frombuffer(_read_bytes(path), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f"{path}: not a readable image (OpenCV could not decode it); remove or convert it")
    if img.dtype != np.uint8:  # 16-bit PNG/TIFF: scale to 8 bits
        img = (img.astype(np.float32) * (255.0 / np.iinfo(img.dtype).max)).round().astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGBA)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGBA)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGBA)
    return np.ascontiguousarray(img)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file (optionally ``.gz``) as uint8 HxWx3 RGB; errors name the file."""
    buf = np.frombuffer(_read_bytes(path), np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: not a readable image (OpenCV could not decode it); remove or convert it")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_png(img: np.ndarray, compression: int = 1) -> bytes:
    """PNG bytes of an RGB, RGBA or gray uint8 array (level 1: fast, still lossless)."""
    if img.dtype != np.uint8:
        raise ValueError(f"PNG images must be uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim == 3 and img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_RGBA2BGRA)
    # SUB filter + Huffman-only deflate: measured 2.5x faster than OpenCV's default at 448 px on photos,
    # and no larger; PNG stays lossless whatever the settings.
    params = [cv2.IMWRITE_PNG_COMPRESSION, compression, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
              cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img), params)
    if not ok:
        raise ValueError("OpenCV could not encode the image as PNG")
    return buf.tobytes()


def save_png(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write an RGB/RGBA/gray uint8 array as PNG."""
    Path(path).write_bytes(encode_png(img))


# ---- photo filtering -----------------------------------------------------------------------------

def photo_stats(img: np.ndarray) -> dict[str, float]:
    """Colour statistics that tell photos from flat or synthetic art."""
    small = cv2.resize(img, (128, 128), interpolation=cv2.INTER_AREA)
    ycc = cv2.cvtColor(small, cv2.COLOR_RGB2YCrCb).astype(np.float32)
    chroma = float(np.abs(ycc[..., 1:] - 128).mean())
    q = (img[..., 0] >> 3).astype(np.int32) * 1024 + (img[..., 1] >> 3) * 32 + (img[..., 2] >> 3)
    _, counts = np.unique(q, return_counts=True)
    top8 = float(np.sort(counts)[::-1][:8].sum() / q.size)
    lap = cv2.Laplacian(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY), cv2.CV_32F)
    flat = float((np.abs(lap) < 1).mean())
    return {"chroma": chroma, "colours": float(len(counts)), "top8": top8, "flat": flat,
            "min_side": float(min(img.shape[:2]))}


def _looks_like_photo(stats: dict[str, float], min_side: int = 256) -> bool:
    # Thresholds read off the ~120 registry images: grey scans have chroma ~0 and <=32 5-bit colours;
    # logos/charts put >60% of pixels in 8 colours or are >30% perfectly flat.
    return (stats["chroma"] >= 3.0 and stats["colours"] >= 500 and stats["top8"] <= 0.6
            and stats["flat"] <= 0.3 and stats["min_side"] >= min_side)


def _thumb(img: np.ndarray) -> np.ndarray:
    g = cv2.resize(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), (24, 24), interpolation=cv2.INTER_AREA)
    g = g.astype(np.float32).ravel()
    g -= g.mean()
    return g / (np.linalg.norm(g) + 1e-6)


def _name_key(sid: str) -> str:
    """Stem with pair/sequence suffixes removed: aloeL/aloeR, graf1/graf3, motorcycle_left/right -> one key."""
    prefix, stem = sid.split(":", 1)
    stem = re.sub(r"(_?(left|right|[LRAB])|_?\d+)$", "", stem)
    return f"{prefix}:{stem}"


def _group_near_duplicates(ids: list[str], thumbs: list[np.ndarray], threshold: float = 0.85) -> dict[str, str]:
    """Map each id to a group id. Stereo pairs and sequences (same stem up to a L/R/A/B/number
    suffix) and images whose thumbnails correlate above ``threshold`` share one group."""
    group: dict[str, str] = {}
    for i, a in enumerate(ids):
        if a in group:
            continue
        group[a] = a
        for j in range(i + 1, len(ids)):
            if ids[j] not in group and (_name_key(a) == _name_key(ids[j])
                                        or float(thumbs[i] @ thumbs[j]) >= threshold):
                group[ids[j]] = a
    return group


_PYTHON_SAMPLE_DIRS = (
    ("skimage", "skimage", "scikit-image bundled sample data",
     "see skimage/data/README.txt (public domain / CC0 / CC-BY per image)"),
    ("matplotlib", "matplotlib", "matplotlib sample_data", "matplotlib sample data (see its README.txt)"),
)


def _sample_dir(module: str) -> Path:
    # find_spec locates the package without importing it (importing matplotlib alone costs ~1 s)
    import importlib.util
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(module)
    root = Path(list(spec.submodule_search_locations)[0])
    return root / "data" if module == "skimage" else root / "mpl-data" / "sample_data"


def _cache_file() -> Path:
    return photo_pool.cache_base() / "pool-index.json"


def _file_key(path: str) -> str:
    st = os.stat(path)
    return f"{path}|{st.st_size}|{int(st.st_mtime)}"


_INDEX: dict[str, Any] | None = None


def _index() -> dict[str, Any]:
    """Per-file filter results (photo or not, thumbnail), cached on disk: scanning ~900 files takes
    seconds, and the answer only changes when a file does."""
    global _INDEX
    if _INDEX is None:
        try:
            _INDEX = json.loads(_cache_file().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            _INDEX = {}
    return _INDEX


def _save_index() -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_index()), encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home is fine: we just rescan next time
        log.debug("could not write the pool index cache %s: %s", path, exc)


def _registry_photo_files() -> list[tuple[str, str, str, str]]:
    """(id, path, origin, licence) of candidate photos from the installed registries."""
    out: list[tuple[str, str, str, str]] = []
    for module, prefix, origin, licence in _PYTHON_SAMPLE_DIRS:
        try:
            d = _sample_dir(module)
        except ImportError:
            log.warning("%s is not installed: its sample photos are left out of the pool", module)
            continue
        for p in sorted(d.glob("*")):
            if p.suffix.lower() in (".png", ".jpg"):
                out.append((f"{prefix}:{p.stem}", str(p), origin, licence))
    if OPENCV_DOC_DATA.is_dir():
        for p in sorted(OPENCV_DOC_DATA.iterdir()):
            name = p.name[:-3] if p.name.endswith(".gz") else p.name
            stem, ext = os.path.splitext(name)
            if ext.lower() in (".png", ".jpg", ".jpeg"):
                out.append((f"opencv-doc:{stem}", str(p), "Debian opencv-doc examples/data",
                            "OpenCV sample data (Apache-2.0 / BSD, per the Debian copyright file)"))
    else:
        log.warning("%s is missing: install Debian's opencv-doc (make system-deps) for more photos",
                    OPENCV_DOC_DATA)
    return out


_PHOTO_CACHE: list[SourceImage] | None = None


def builtin_photos() -> list[SourceImage]:
    """The registry photos, filtered and grouped (cached after the first call)."""
    global _PHOTO_CACHE
    if _PHOTO_CACHE is not None:
        return list(_PHOTO_CACHE)
    kept: list[tuple[str, str, str, str]] = []
    thumbs: list[np.ndarray] = []
    seen_hashes: set[str] = set()
    index = _index()
    changed = False
    for sid, path, origin, licence in _registry_photo_files():
        if sid in _DENY:
            continue
        key = "photo:" + _file_key(path)
        entry = index.get(key)
        if entry is None:
            try:
                raw = _read_bytes(path)
                img = load_rgb(path)
            except (OSError, ValueError) as exc:
                log.warning("skipping %s: %s", path, exc)
                continue
            entry = {"sha1": hashlib.sha1(raw).hexdigest(), "photo": _looks_like_photo(photo_stats(img)),
                     "thumb": _thumb(img).round(5).tolist()}
            index[key] = entry
            changed = True
        if entry["sha1"] in seen_hashes or not entry["photo"]:
            continue
        seen_hashes.add(entry["sha1"])
        kept.append((sid, path, origin, licence))
        thumbs.append(np.asarray(entry["thumb"], np.float32))
    if changed:
        _save_index()
    groups = _group_near_duplicates([k[0] for k in kept], thumbs)
    _PHOTO_CACHE = [SourceImage(id=sid, source=sid.split(":")[0], group=groups[sid], origin=origin,
                                licence=licence, path=path) for sid, path, origin, licence in kept]
    return list(_PHOTO_CACHE)


# ---- photos from Debian data packages (photo_pool) -------------------------------------------------

# Every ``source`` of the pool's "photos" part (the quality builder draws them with --mix photos=...).
PHOTO_SOURCES = frozenset({"skimage", "matplotlib", "opencv-doc", *photo_pool.PACKAGE_NAMES})


# Thumbnail correlation that marks two package photos as one: measured on the 327 photos, the copies
# under other names (colosseum, greatPyramid) score 1.0, while unrelated landscapes (sky over dark
# ground) reach 0.92; 0.85, the registry photos' threshold, chained 10 unrelated landscapes into one.
PACKAGE_DUPLICATE_CORR = 0.95


def _union_groups(ids: list[str], keys: list[str], thumbs: list[np.ndarray],
                  threshold: float = PACKAGE_DUPLICATE_CORR) -> dict[str, str]:
    """Map each id to its group: ids sharing a name key, or whose thumbnails correlate at least
    ``threshold``, are one group, transitively (union-find); a group is named by its first id."""
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> None:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)

    first_of: dict[str, int] = {}
    for i, k in enumerate(keys):
        union(i, first_of.setdefault(k, i))
    if thumbs:
        t = np.stack(thumbs)
        close = np.argwhere(np.triu(t @ t.T >= threshold, 1))
        for i, j in close:
            union(int(i), int(j))
    return {sid: ids[find(i)] for i, sid in enumerate(ids)}


_PACKAGE_CACHE: dict[tuple[str, ...], list[SourceImage]] = {}


def package_photos() -> list[SourceImage]:
    """The checked photos of the Debian data packages (``photo_pool``) found on this machine.

    The first call decodes each one for its thumbnail (a few seconds; cached on disk with the pool
    index, keyed by file, size and mtime), then groups near-duplicates (same subject name, or
    thumbnails correlating >= ``PACKAGE_DUPLICATE_CORR``) so each group lands in one split.
    ``LOUPE_PHOTO_PACKAGES`` restricts the packages (see ``photo_pool``).
    """
    packages = photo_pool.selected_packages()
    ck = tuple(p.name for p in packages)
    if ck in _PACKAGE_CACHE:
        return list(_PACKAGE_CACHE[ck])
    index = _index()
    changed = False
    kept: list[photo_pool.Candidate] = []
    thumbs: list[np.ndarray] = []
    for c in photo_pool.candidates(packages):
        key = f"pkg:{_file_key(c.path)}#{c.member or ''}|{c.crop}|{c.rotate}|{c.long_side}"
        entry = index.get(key)
        if entry is None:
            try:
                img = photo_pool.decode(c.path, c.member, c.crop, c.rotate, c.long_side)
            except (OSError, KeyError, ValueError) as exc:
                log.warning("skipping %s: %s", c.id, exc)
                continue
            entry = index[key] = {"thumb": _thumb(img).round(5).tolist(), "shape": list(img.shape[:2])}
            changed = True
        kept.append(c)
        thumbs.append(np.asarray(entry["thumb"], np.float32))
    if changed:
        _save_index()
    groups = _union_groups([c.id for c in kept], [c.name_key for c in kept], thumbs)
    _PACKAGE_CACHE[ck] = [SourceImage(id=c.id, source=c.package, group=groups[c.id], origin=c.origin,
                                      licence=c.licence, path=c.path, member=c.member, crop=c.crop,
                                      rotate=c.rotate, long_side=c.long_side) for c in kept]
    return list(_PACKAGE_CACHE[ck])


# ---- Tux Paint stamps ----------------------------------------------------------------------------

def _stamp_is_photo(rgba: np.ndarray) -> bool:
    # Clip-art stamps fill their shape with few flat colours; photographic cut-outs have hundreds.
    a = rgba[..., 3] > 128
    if a.sum() < 400 or min(rgba.shape[:2]) < 48:
        return False
    px = rgba[..., :3][a]
    q = (px[:, 0] >> 3).astype(np.int32) * 1024 + (px[:, 1] >> 3) * 32 + (px[:, 2] >> 3)
    _, counts = np.unique(q, return_counts=True)
    return len(counts) >= 400 and np.sort(counts)[::-1][:8].sum() / len(q) < 0.5


_STAMP_CACHE: list[str] | None = None


def tuxpaint_stamps(root: str | os.PathLike = TUXPAINT_STAMPS) -> list[str]:
    """Paths of Tux Paint's photographic RGBA stamps (cartoon/clip-art ones left out), sorted."""
    global _STAMP_CACHE
    if _STAMP_CACHE is not None and Path(root) == TUXPAINT_STAMPS:
        return list(_STAMP_CACHE)
    root = Path(root)
    if not root.is_dir():
        log.warning("%s is missing: install Debian's tuxpaint-stamps-default (make system-deps)", root)
        return []
    out = []
    index = _index()
    changed = False
    for p in sorted(root.rglob("*.png")):
        if "cartoon" in p.parts:
            continue
        key = "stamp:" + _file_key(str(p))
        if key not in index:
            try:
                index[key] = bool(_stamp_is_photo(load_rgba(p)))
            except (OSError, ValueError):
                index[key] = False
            changed = True
        if index[key]:
            out.append(str(p))
    if changed:
        _save_index()
    if root == TUXPAINT_STAMPS:
        _STAMP_CACHE = out
    return list(out)


# ---- procedural scenes ---------------------------------------------------------------------------

def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n natural-looking RGB colours: mostly muted, some saturated, luminance spread wide."""
    hsv = np.stack([rng.uniform(0, 180, n), rng.beta(1.5, 2.5, n) * 255, rng.uniform(30, 250, n)], -1)
    return cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]


def _fractal_field(rng: np.random.Generator, size: int, beta: float, channels: int = 1) -> np.ndarray:
    """1/f^beta noise in [0,1], shape (size, size, channels): FFT filtering of white noise."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    amp = f ** (-beta / 2.0)
    amp[0, 0] = 0.0
    out = np.empty((size, size, channels), np.float32)
    for c in range(channels):
        spec = np.fft.rfft2(rng.standard_normal((size, size))) * amp
        x = np.fft.irfft2(spec, s=(size, size))
        x = (x - x.mean()) / (x.std() + 1e-8)
        out[..., c] = x
    return (1.0 / (1.0 + np.exp(-1.3 * out))).astype(np.float32)


def dead_leaves(seed: int, size: int = PROCEDURAL_SIZE) -> np.ndarray:
    """Dead-leaves scene: discs with power-law radii (density ~ r^-3) occluding one another."""
    rng = np.random.default_rng([seed, 1])
    img = np.empty((size, size, 3), np.uint8)
    img[:] = _random_colours(rng, 1)[0]
    rmin, rmax = 3.0, size / 3.0
    n = 8000  # about 3x area coverage, so the first background shows through in ~5% of pixels
    # inverse-CDF sampling of p(r) ~ r^-3 on [rmin, rmax]
    u = rng.uniform(size=n)
    r = 1.0 / np.sqrt((1 - u) / rmin**2 + u / rmax**2)
    xs = rng.uniform(-rmax, size + rmax, n)
    ys = rng.uniform(-rmax, size + rmax, n)
    cols = _random_colours(rng, n)
    for i in range(n):  # later discs occlude earlier ones: random depth order, as in the model
        cv2.circle(img, (int(xs[i]), int(ys[i])), int(r[i]), tuple(int(c) for c in cols[i]), -1, cv2.LINE_AA)
    # subtle texture and shading so discs are not perfectly flat
    shade = _fractal_field(rng, size, 2.5)[..., 0]
    img = np.clip(img.astype(np.float32) * (0.8 + 0.4 * shade[..., None]), 0, 255)
    return img.astype(np.uint8)


def fractal_texture(seed: int, size: int = PROCEDURAL_SIZE) -> np.ndarray:
    """1/f fractal texture mapped through a random colour ramp."""
    rng = np.random.default_rng([seed, 2])
    beta = rng.uniform(1.8, 3.0)
    field_ = _fractal_field(rng, size, beta, 2)
    ramp = _random_colours(rng, 4).astype(np.float32)
    t = field_[..., 0:1] * 3.0
    i = np.clip(t.astype(np.int32), 0, 2)
    frac = t - i
    img = ramp[i[..., 0]] * (1 - frac) + ramp[i[..., 0] + 1] * frac
    img *= (0.7 + 0.6 * field_[..., 1:2])
    return np.clip(img, 0, 255).astype(np.uint8)


def gradient_scene(seed: int, size: int = PROCEDURAL_SIZE) -> np.ndarray:
    """Smooth linear/radial gradients with a few soft shapes and fine grain."""
    rng = np.random.default_rng([seed, 3])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1, c2 = _random_colours(rng, 3).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi)
    t = np.clip((np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) + 0.5, 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    cx, cy = rng.uniform(0.2, 0.8, 2)
    rad = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)[..., None]
    w = np.exp(-(rad / rng.uniform(0.15, 0.4)) ** 2)
    img = img * (1 - w) + c2 * w
    for col in _random_colours(rng, int(rng.integers(2, 6))):
        mask = np.zeros((size, size), np.float32)
        centre = (int(rng.uniform(0, size)), int(rng.uniform(0, size)))
        axes = (int(rng.uniform(0.03, 0.2) * size), int(rng.uniform(0.03, 0.2) * size))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1.0, -1, cv2.LINE_AA)
        mask = cv2.GaussianBlur(mask, (0, 0), rng.uniform(1, 8))[..., None]
        img = img * (1 - mask) + col.astype(np.float32) * mask
    img += rng.normal(0, 1.5, img.shape).astype(np.float32)  # film-like grain so it is not synthetic-flat
    return np.clip(img, 0, 255).astype(np.uint8)


def procedural(kind: str, seed: int, size: int = PROCEDURAL_SIZE) -> np.ndarray:
    """A procedural scene of ``kind`` (dead_leaves, fractal, gradient) from ``seed``."""
    fn = {"dead_leaves": dead_leaves, "fractal": fractal_texture, "gradient": gradient_scene}.get(kind)
    if fn is None:
        raise ValueError(f"unknown procedural kind {kind!r}; known: {', '.join(PROCEDURAL_KINDS)}")
    return fn(seed, size)


def composite(background: np.ndarray, rgba: np.ndarray, x: int, y: int) -> np.ndarray:
    """Alpha-composite an RGBA cut-out onto an RGB background at top-left (x, y), clipped to bounds."""
    out = background.copy()
    h, w = rgba.shape[:2]
    H, W = out.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, W), min(y + h, H)
    if x1 <= x0 or y1 <= y0:
        return out
    patch = rgba[y0 - y:y1 - y, x0 - x:x1 - x].astype(np.float32)
    a = patch[..., 3:4] / 255.0
    region = out[y0:y1, x0:x1].astype(np.float32)
    out[y0:y1, x0:x1] = np.clip(region * (1 - a) + patch[..., :3] * a + 0.5, 0, 255).astype(np.uint8)
    return out


def stamp_scene(stamps: Sequence[str], seed: int, size: int = PROCEDURAL_SIZE) -> np.ndarray:
    """Tux Paint cut-outs composited onto a procedural background (fractal or gradient)."""
    rng = np.random.default_rng([seed, 4])
    bg_kind = "fractal" if rng.uniform() < 0.5 else "gradient"
    img = procedural(bg_kind, int(rng.integers(1 << 30)), size)
    img = cv2.GaussianBlur(img, (0, 0), 2.0)  # shallow depth of field: background softer than objects
    for path in stamps:
        rgba = load_rgba(path)
        scale = rng.uniform(0.3, 0.7) * size / max(rgba.shape[:2])
        scale = min(scale, 1.5)  # avoid heavy upscaling, which would blur the object
        rgba = cv2.resize(rgba, None, fx=scale, fy=scale,
                          interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        x = int(rng.uniform(-0.1, 0.9) * size - rgba.shape[1] / 4)
        y = int(rng.uniform(-0.1, 0.9) * size - rgba.shape[0] / 4)
        img = composite(img, rgba, x, y)
    return img


# ---- pools ---------------------------------------------------------------------------------------

def procedural_pool(counts: dict[str, int] | None = None) -> list[SourceImage]:
    """Procedural sources: one group per seed."""
    out = []
    for kind, n in (counts or PROCEDURAL_COUNT).items():
        for i in range(n):
            sid = f"procedural:{kind}:{i:04d}"
            out.append(SourceImage(id=sid, source=f"procedural:{kind}", group=sid,
                                   origin=f"generated by data_builders.sources ({kind})",
                                   licence="generated; no rights reserved", generator=kind, seed=i))
    return out


def stamp_pool(per_scene: int = STAMPS_PER_SCENE) -> list[SourceImage]:
    """Stamp scenes: the photographic stamps, shuffled by a fixed seed and cut into disjoint sets."""
    stamps = tuxpaint_stamps()
    order = np.random.default_rng(12345).permutation(len(stamps))
    out = []
    for k in range(len(stamps) // per_scene):
        chosen = tuple(stamps[i] for i in order[k * per_scene:(k + 1) * per_scene])
        sid = f"stamps:scene:{k:04d}"
        out.append(SourceImage(id=sid, source="stamps", group=sid,
                               origin="Tux Paint stamps (Debian tuxpaint-stamps-default) on a procedural "
                                      "background", licence="GPL-2+ / CC (Tux Paint stamps copyright file)",
                               generator="stamp_scene", seed=k, stamps=chosen))
    return out


def builtin_pool(include: Iterable[str] = ("photos", "procedural", "stamps")) -> list[SourceImage]:
    """The no-download pool: registry and Debian-package photos, procedural scenes, Tux Paint stamp scenes."""
    include = tuple(include)
    unknown = set(include) - {"photos", "procedural", "stamps"}
    if unknown:
        raise ValueError(f"unknown pool part(s) {sorted(unknown)}; choose from photos, procedural, stamps")
    out: list[SourceImage] = []
    if "photos" in include:
        out += builtin_photos() + package_photos()
    if "procedural" in include:
        out += procedural_pool()
    if "stamps" in include:
        out += stamp_pool()
    return out


def from_folders(paths_or_globs: Sequence[str | os.PathLike], licence: str = "unknown (user-supplied)"
                 ) -> list[SourceImage]:
    """Image files under folders (recursive) or matching globs; each file is its own group."""
    files: list[Path] = []
    for item in paths_or_globs:
        p = Path(item)
        if p.is_dir():
            files += [f for f in sorted(p.rglob("*")) if f.suffix.lower() in IMAGE_EXTS
                      or f.name.lower().endswith(tuple(e + ".gz" for e in IMAGE_EXTS))]
        elif p.is_file():
            files.append(p)
        else:
            matched = sorted(glob.glob(str(item), recursive=True))
            if not matched:
                raise FileNotFoundError(f"{item}: no such folder, file or glob match; check --images")
            files += [Path(m) for m in matched if Path(m).is_file()]
    out = []
    seen = set()
    for f in files:
        sid = f"file:{f}"
        if sid in seen:
            continue
        seen.add(sid)
        out.append(SourceImage(id=sid, source=f"folder:{f.parent}", group=sid, origin=str(f.parent),
                               licence=licence, path=str(f)))
    return out


def from_manifest(path: str | os.PathLike) -> list[SourceImage]:
    """Sources from a JSONL/JSON manifest: ``{"path", "group"?, "origin"?, "licence"?, "source"?}`` each.

    Relative paths are resolved against the manifest's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such manifest file")
    text = path.read_text(encoding="utf-8")
    try:
        entries = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed manifest ({exc.msg} at line {exc.lineno}); expected JSON lines "
                         f"with a 'path' each") from None
    out = []
    for i, e in enumerate(entries, 1):
        if not isinstance(e, dict) or "path" not in e:
            raise ValueError(f"{path}: entry {i} has no 'path'")
        p = Path(e["path"])
        if not p.is_absolute():
            p = path.parent / p
        sid = f"manifest:{e.get('id', p)}"
        out.append(SourceImage(id=sid, source=e.get("source", f"manifest:{path.name}"),
                               group=str(e.get("group", sid)), origin=e.get("origin", str(path)),
                               licence=e.get("licence", e.get("license", "unknown")), path=str(p)))
    return out


# ---- splits and views ----------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


def split_by_source(sources: Sequence[SourceImage], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                    seed: int = 0) -> dict[str, list[SourceImage]]:
    """Assign whole groups to train/val/test, stratified by ``source`` so each split sees each pool.

    A group never spans two splits. With few groups in a source, val and test get one each first
    (when fractions ask for them), so small pools still yield held-out photos.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    total = sum(fractions)
    fr = [f / total for f in fractions]
    by_source: dict[str, list[str]] = {}
    for s in sources:
        groups = by_source.setdefault(s.source, [])
        if s.group not in groups:
            groups.append(s.group)
    assign: dict[str, str] = {}
    for src in sorted(by_source):
        groups = sorted(by_source[src])
        rng = np.random.default_rng([seed, int(hashlib.sha1(src.encode()).hexdigest()[:8], 16)])
        groups = [groups[i] for i in rng.permutation(len(groups))]
        n = len(groups)
        n_val = int(round(fr[1] * n))
        n_test = int(round(fr[2] * n))
        if n >= 3:
            n_val = max(n_val, 1 if fr[1] > 0 else 0)
            n_test = max(n_test, 1 if fr[2] > 0 else 0)
        n_train = n - n_val - n_test
        if fr[0] > 0 and n_train < 1 and n >= 1:
            n_train, n_val, n_test = 1, max(0, min(n_val, n - 1)), max(0, n - 1 - min(n_val, n - 1))
        for i, g in enumerate(groups):
            assign[g] = "train" if i < n_train else ("val" if i < n_train + n_val else "test")
    out: dict[str, list[SourceImage]] = {k: [] for k in SPLITS}
    for s in sources:
        out[assign[s.group]].append(s)
    return out


def random_view(img: np.ndarray, rng: np.random.Generator, size: int | tuple[int, int]) -> np.ndarray:
    """A random crop (scale 45-100% of the short side), maybe mirrored, resized to ``size``.

    Crops are kept at least as large as the output where the image allows, so views are
    downscaled (INTER_AREA, no blur added) rather than upscaled.
    """
    oh, ow = (size, size) if isinstance(size, int) else size
    H, W = img.shape[:2]
    aspect = ow / oh
    max_h = min(H, int(W / aspect))
    min_h = min(max_h, max(int(0.45 * max_h), oh))
    ch = int(rng.integers(min_h, max_h + 1))
    cw = min(W, max(1, int(round(ch * aspect))))
    y = int(rng.integers(0, H - ch + 1))
    x = int(rng.integers(0, W - cw + 1))
    crop = img[y:y + ch, x:x + cw]
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if ch >= oh else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(crop), (ow, oh), interpolation=interp))


def describe_pool(sources: Sequence[SourceImage]) -> dict[str, dict[str, int]]:
    """Counts per source: images and groups (for the card and the report)."""
    out: dict[str, dict[str, int]] = {}
    for s in sources:
        d = out.setdefault(s.source, {"images": 0, "groups": set()})  # type: ignore[dict-item]
        d["images"] += 1
        d["groups"].add(s.group)  # type: ignore[union-attr]
    return {k: {"images": v["images"], "groups": len(v["groups"])} for k, v in out.items()}  # type: ignore
