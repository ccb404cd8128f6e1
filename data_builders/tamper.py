"""Tamper synthesis: splice, copy-move, removal and AIGC-edit-like forgeries with exact masks.

Pure numpy/OpenCV/scikit-image functions on ``uint8 HxWx3`` RGB arrays. Every function takes a
``numpy.random.Generator`` and is deterministic given it. Each manipulation returns a
``TamperResult``: the forged image, one binary mask per region (``uint8``, 255 = changed, the
image's size), the ids of the visual cues the operation really left (``prompts.CUES``), and
JSON-ready parameters for the dataset's ``meta``.

Exactness contract (tested): before global post-processing, every pixel outside the union of the
region masks equals the input image. Soft borders are feathered *inward* so that holds.

What each operation imitates:

* ``splice``: a region of a donor photo (smooth blob, polygon, a region cut along strong edges or a
  colour segment of the donor) or a real object cut-out with its own alpha (Tux Paint stamps), at
  random scale, rotation and position; optional colour matching (Reinhard transfer in Lab) or a
  deliberate illumination change; hard, feathered or Poisson (``cv2.seamlessClone``) borders; the
  donor may carry its own blur, noise or JPEG history, which is what detectors pick up.
* ``copy_move``: a region of the same photo moved with translation, scale, rotation and flip.
* ``removal``: a region filled by OpenCV inpainting (Telea, Navier-Stokes) or by a patch-based fill
  (the best-matching patch from elsewhere in the image, chosen on the hole's surrounding band).
* ``aigc_edit``: a region re-synthesised with a different low-level profile: the content is
  regenerated through a lossy down/up-sampling "decoder" and denoising, then given new noise with a
  different spectrum (or replaced by inpainted content plus synthetic texture), blended softly as
  generative inpainting tools do. It imitates the *traces* (noise/texture and sharpness mismatch,
  soft seam), not the *semantics* of generative edits: no new objects are imagined and no real
  diffusion-decoder fingerprint is reproduced.
* ``post_process``: JPEG re-compression, resize, blur and noise of the whole image (masks follow).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import cv2
import numpy as np
from skimage import segmentation

log = logging.getLogger(__name__)

MANIPULATION_FUNCS = ("splice", "copy_move", "removal", "aigc_edit")
POST_OPS = ("jpeg", "resize", "blur", "noise")
SHAPES = ("blob", "polygon", "edges", "segment")

# Region sizes as fractions of the image area. Below MIN_AREA a region is too small to describe.
AREA_RANGE = (0.015, 0.2)
MIN_AREA = 0.004


class TamperError(RuntimeError):
    """A manipulation could not be made on this image (too small, no room for a region, ...)."""


@dataclass
class TamperResult:
    """A forged image, its region masks (uint8 0/255, image size), the cues it left and its parameters."""

    image: np.ndarray
    masks: list[np.ndarray]
    manipulation: str
    cues: list[str]
    params: dict[str, Any] = field(default_factory=dict)


# ---- shapes -------------------------------------------------------------------------------------

def _fit_area(field_: np.ndarray, area: float) -> np.ndarray:
    """Threshold a float field so that about ``area`` of it is foreground (bool)."""
    thr = np.quantile(field_, 1.0 - area)
    return field_ > thr


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


def blob_shape(rng: np.random.Generator, h: int, w: int, area: float) -> np.ndarray:
    """A random smooth blob covering about ``area`` of an HxW image (bool mask).

    A coarse random field, smoothly upsampled, is weighted by a Gaussian bump at a random centre and
    thresholded; the largest component is kept. Hand-written because no library draws such shapes.
    """
    g = 8
    coarse = rng.random((g, g)).astype(np.float32)
    small = cv2.resize(coarse, (64, 64), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32) / 63.0
    r = float(np.sqrt(area)) * 0.6 + 0.05
    cy, cx = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
    sy, sx = r * rng.uniform(0.6, 1.4), r * rng.uniform(0.6, 1.4)
    bump = np.exp(-(((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
    f = cv2.resize(bump * (0.5 + small), (w, h), interpolation=cv2.INTER_LINEAR)
    return _largest_component(_fit_area(f, area))


def polygon_shape(rng: np.random.Generator, h: int, w: int, area: float) -> np.ndarray:
    """A random star-shaped polygon (5-12 vertices) covering about ``area`` of the image."""
    n = int(rng.integers(5, 13))
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = rng.uniform(0.55, 1.0, n)
    # Mean polygon area of unit radii ~ 0.5 * sum(r_i r_{i+1} sin(dθ)); scale to the target area.
    d = np.diff(np.concatenate([angles, angles[:1] + 2 * np.pi]))
    unit = 0.5 * float(np.sum(radii * np.roll(radii, -1) * np.sin(d)))
    scale = np.sqrt(area * h * w / max(unit, 1e-3))
    aspect = rng.uniform(0.7, 1.4)
    sx, sy = scale * aspect ** 0.5, scale / aspect ** 0.5
    ext_x, ext_y = min(sx, w / 2 - 1), min(sy, h / 2 - 1)
    cx, cy = rng.uniform(ext_x, w - ext_x), rng.uniform(ext_y, h - ext_y)
    pts = np.stack([cx + sx * radii * np.cos(angles), cy + sy * radii * np.sin(angles)], 1)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _segments(img: np.ndarray, kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """A label map of ``img`` downscaled to ``size`` px: colour segments or watershed along strong edges."""
    h, w = img.shape[:2]
    s = size / max(h, w)
    small = cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)
    if kind == "segment":
        return segmentation.felzenszwalb(small, scale=float(rng.uniform(50, 200)), sigma=0.6, min_size=20)
    lab = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    grad = sum(np.hypot(cv2.Sobel(lab[..., c], cv2.CV_32F, 1, 0), cv2.Sobel(lab[..., c], cv2.CV_32F, 0, 1))
               for c in range(3))
    return segmentation.watershed(grad, markers=int(rng.integers(20, 50)), compactness=0)


def segment_shape(img: np.ndarray, rng: np.random.Generator, area: float, kind: str = "segment") -> np.ndarray:
    """A region of ``img`` cut along its own content: colour segments (``segment``) or strong edges (``edges``).

    Segmentation runs on a <=96 px copy for speed; one segment is grown by its neighbours until it
    covers about ``area``; the mask is upsampled smoothly and re-thresholded.
    """
    h, w = img.shape[:2]
    labels = _segments(img, kind, rng, 72 if kind == "segment" else 96)
    ids, counts = np.unique(labels, return_counts=True)
    frac = counts / labels.size
    target = area
    # Start from a segment not much bigger than the target, then grow by adjacency.
    ok = np.flatnonzero(frac < max(target * 1.5, frac.min() + 1e-9))
    start = int(ids[rng.choice(ok)]) if ok.size else int(ids[np.argmin(frac)])
    region = labels == start
    kernel = np.ones((3, 3), np.uint8)
    for _ in range(64):
        if region.mean() >= target * 0.8:
            break
        ring = cv2.dilate(region.astype(np.uint8), kernel).astype(bool) & ~region
        neighbours = np.unique(labels[ring])
        if neighbours.size == 0:
            break
        region |= labels == int(rng.choice(neighbours))
    up = cv2.resize(region.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    # Round off the staircase that upsampling a low-resolution label map leaves.
    up = cv2.GaussianBlur(up, (0, 0), 0.5 * max(h, w) / max(labels.shape))
    return up >= 0.5


def make_shape(kind: str, rng: np.random.Generator, h: int, w: int, area: float,
               img: np.ndarray | None = None) -> np.ndarray:
    """A bool region mask of the given shape kind (``blob``, ``polygon``, ``edges``, ``segment``)."""
    if kind == "blob":
        return blob_shape(rng, h, w, area)
    if kind == "polygon":
        return polygon_shape(rng, h, w, area)
    if kind in ("edges", "segment"):
        if img is None:
            raise ValueError(f"shape {kind!r} needs the image it is cut from")
        return segment_shape(img, rng, area, kind)
    raise ValueError(f"unknown shape {kind!r}; known: {', '.join(SHAPES)}")


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """[x0, y0, x1, y1) of a non-empty mask (x1, y1 exclusive)."""
    x, y, bw, bh = cv2.boundingRect(mask.view(np.uint8) if mask.dtype == bool else mask)
    if bw == 0:
        raise TamperError("empty region")
    return x, y, x + bw, y + bh


def _crop_to_bbox(mask: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    x0, y0, x1, y1 = _bbox(mask)
    return mask[y0:y1, x0:x1], (x0, y0, x1, y1)


# ---- pixel helpers ------------------------------------------------------------------------------

def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """JPEG round trip at ``quality`` (RGB in, RGB out)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise TamperError("JPEG encoding failed")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def add_noise(img: np.ndarray, rng: np.random.Generator, sigma: float, correlated: float = 0.0) -> np.ndarray:
    """Gaussian noise of std ``sigma``; ``correlated`` > 0 blurs it (a coarser grain)."""
    # OpenCV's normal RNG, seeded from ``rng`` right before use (so still deterministic), is ~4x
    # faster than numpy's for a full image.
    cv2.setRNGSeed(int(rng.integers(1 << 31)))
    n = np.empty(img.shape, np.float32)
    cv2.randn(n, 0.0, 1.0)
    if correlated > 0:
        n = cv2.GaussianBlur(n, (0, 0), correlated)
        n *= 1.0 / max(float(n.std()), 1e-6)
    return np.clip(img.astype(np.float32) + sigma * n, 0, 255).astype(np.uint8)


def colour_transfer(src: np.ndarray, src_mask: np.ndarray, ref: np.ndarray, ref_mask: np.ndarray) -> np.ndarray:
    """Match ``src``'s Lab mean/std inside ``src_mask`` to ``ref``'s inside ``ref_mask`` (Reinhard et al. 2001).

    ``ref`` statistics come from every 4th pixel: the mean and spread do not need all of them.
    """
    s = cv2.cvtColor(src, cv2.COLOR_RGB2LAB)
    r = cv2.cvtColor(np.ascontiguousarray(ref[::4, ::4]), cv2.COLOR_RGB2LAB)
    sm8 = src_mask.astype(np.uint8)
    rm8 = np.ascontiguousarray(ref_mask[::4, ::4]).astype(np.uint8)
    if cv2.countNonZero(sm8) < 4 or cv2.countNonZero(rm8) < 4:
        return src
    s_mean, s_std = (v.ravel() for v in cv2.meanStdDev(s, mask=sm8))
    r_mean, r_std = (v.ravel() for v in cv2.meanStdDev(r, mask=rm8))
    gain = (r_std + 1e-3) / (s_std + 1e-3)
    # Per-channel gain and offset in one saturating pass: a 3x4 diagonal colour transform.
    m = np.zeros((3, 4), np.float64)
    m[[0, 1, 2], [0, 1, 2]] = gain
    m[:, 3] = r_mean - s_mean * gain
    return cv2.cvtColor(cv2.transform(s, m), cv2.COLOR_LAB2RGB)


def _alpha_for(mask: np.ndarray, border: str, rng: np.random.Generator) -> np.ndarray:
    """Float alpha in [0, 1] that is exactly 0 outside ``mask``: hard, or feathered inward."""
    m = mask.astype(np.float32)
    if border == "hard":
        return m
    # Feather inward: blur, then keep only the inside, so no pixel outside the mask changes.
    radius = float(rng.uniform(1.0, 4.0))
    soft = cv2.GaussianBlur(m, (0, 0), radius)
    soft = np.clip((soft - 0.5) * 2.0, 0.0, 1.0) * m
    soft[m > 0] = np.maximum(soft[m > 0], 0.15)  # every masked pixel really changes
    return soft


def composite(base: np.ndarray, top: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``base`` with ``top`` blended in by ``alpha`` (HxW float32); pixels where alpha == 0 stay exact."""
    out = cv2.blendLinear(base, top, np.ascontiguousarray(1.0 - alpha), np.ascontiguousarray(alpha))
    return cv2.copyTo(base, (alpha <= 0).view(np.uint8), out)


def _window(mask: np.ndarray, margin: int = 8) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the mask's bounding box grown by ``margin``, clipped to the image."""
    x0, y0, x1, y1 = _bbox(mask)
    h, w = mask.shape
    return max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.any(a != b, axis=-1)


def _paste(target: np.ndarray, content: np.ndarray, mask: np.ndarray, border: str,
           rng: np.random.Generator, win: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Put ``content`` into ``target`` under the bool ``mask``; returns (image, exact mask of the region).

    ``content`` is either the target's size or the window ``win`` (y0, y1, x0, x1) around the mask;
    all work happens in that window. ``border`` is ``hard``, ``feather`` or ``poisson`` (OpenCV's
    seamless cloning, kept to the mask).
    """
    y0, y1, x0, x1 = win or _window(mask)
    if content.shape[:2] == target.shape[:2] and (y1 - y0, x1 - x0) != target.shape[:2]:
        content = content[y0:y1, x0:x1]
    if border == "poisson":
        h, w = mask.shape
        # The Poisson solve grows with the window (~40 ms at 250x250); larger regions get a feather.
        if y0 > 1 and x0 > 1 and y1 < h - 1 and x1 < w - 1 and (y1 - y0) * (x1 - x0) <= 200 * 200:
            wmask = mask[y0:y1, x0:x1]
            bx0, by0, bx1, by1 = _bbox(wmask)
            centre = ((bx0 + bx1) // 2, (by0 + by1) // 2)
            try:
                # Solved in the window only: the Poisson solve costs grow with the canvas.
                cloned = cv2.seamlessClone(np.ascontiguousarray(content), np.ascontiguousarray(target[y0:y1, x0:x1]),
                                           wmask.astype(np.uint8) * 255, centre, cv2.NORMAL_CLONE)
                # seamlessClone centres the mask's bounding box; odd sizes can shift it by a pixel,
                # so only the mask's own pixels are taken from its result.
                out = target.copy()
                out[y0:y1, x0:x1][wmask] = cloned[wmask]
                return out, mask
            except cv2.error:  # pragma: no cover - OpenCV refuses some thin masks
                log.debug("seamlessClone failed; falling back to a feathered border")
        border = "feather"
    alpha = _alpha_for(mask[y0:y1, x0:x1], border, rng)
    out = target.copy()
    out[y0:y1, x0:x1] = composite(target[y0:y1, x0:x1], content, alpha)
    return out, mask


def _place(shape: np.ndarray, h: int, w: int, rng: np.random.Generator,
           avoid: np.ndarray | None = None, tries: int = 12) -> tuple[np.ndarray, tuple[int, int]]:
    """Put a cropped bool shape at a random position in an HxW canvas, avoiding ``avoid`` where possible."""
    sh, sw = shape.shape
    if sh > h or sw > w:
        raise TamperError(f"shape {sw}x{sh} does not fit a {w}x{h} image")
    best: tuple[float, int, int] | None = None
    n = max(int(shape.sum()), 1)
    for _ in range(tries if avoid is not None else 1):
        y, x = int(rng.integers(0, h - sh + 1)), int(rng.integers(0, w - sw + 1))
        overlap = float((shape & avoid[y:y + sh, x:x + sw]).sum()) / n if avoid is not None else 0.0
        if best is None or overlap < best[0]:
            best = (overlap, y, x)
        if overlap == 0.0:
            break
    assert best is not None
    _, y, x = best
    canvas = np.zeros((h, w), bool)
    canvas[y:y + sh, x:x + sw] = shape
    return canvas, (x, y)


def _area(rng: np.random.Generator, lo: float = AREA_RANGE[0], hi: float = AREA_RANGE[1]) -> float:
    # Log-uniform: small regions are as common as large ones, as in real forgeries.
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _check_region(mask: np.ndarray) -> None:
    if mask.mean() < MIN_AREA:
        raise TamperError(f"region too small ({mask.mean():.4f} of the image)")


# ---- donor treatments (what a detector picks up in a splice) ------------------------------------

def _treat_donor(donor: np.ndarray, rng: np.random.Generator, target: np.ndarray, dmask: np.ndarray,
                 tmask: np.ndarray, params: dict, cues: list[str]) -> np.ndarray:
    """Give the pasted content its own history: colour/illumination, sharpness, grain, JPEG grid."""
    roll = rng.random(4)
    if roll[0] < 0.45:
        donor = colour_transfer(donor, dmask, target, ~tmask)
        params["colour_match"] = True
    else:
        params["colour_match"] = False
        if roll[0] > 0.7:
            gain = float(rng.choice([rng.uniform(0.6, 0.8), rng.uniform(1.2, 1.5)]))
            donor = np.clip(donor.astype(np.float32) * gain, 0, 255).astype(np.uint8)
            params["gain"] = round(gain, 3)
            cues.append("lighting")
    if roll[1] < 0.3:
        sigma = float(rng.uniform(1.0, 2.5))
        donor = cv2.GaussianBlur(donor, (0, 0), sigma)
        params["donor_blur"] = round(sigma, 2)
        cues.append("blur_mismatch")
    if roll[2] < 0.3:
        sigma = float(rng.uniform(4.0, 12.0))
        donor = add_noise(donor, rng, sigma)
        params["donor_noise"] = round(sigma, 2)
        cues.append("noise_texture")
    if roll[3] < 0.3:
        q = int(rng.integers(30, 65))
        # Shift the donor's 8x8 grid by a non-multiple of 8 so its blocks disagree with the target's.
        dy, dx = (int(v) for v in rng.integers(1, 8, 2))
        shifted = np.roll(donor, (dy, dx), (0, 1))
        donor = np.roll(jpeg(shifted, q), (-dy, -dx), (0, 1))
        params["donor_jpeg"] = q
        cues.append("jpeg_grid")
    return donor


# ---- manipulations ------------------------------------------------------------------------------

def splice(target: np.ndarray, donor: np.ndarray, rng: np.random.Generator, *, shape: str | None = None,
           border: str | None = None, regions: int = 1) -> TamperResult:
    """Paste ``regions`` region(s) of ``donor`` (any size) into ``target``.

    The shape is cut from the donor (for ``edges``/``segment`` along the donor's own content) and
    placed at a random position of the target.
    """
    h, w = target.shape[:2]
    if donor.shape[:2] != (h, w):
        donor = cv2.resize(donor, (w, h), interpolation=cv2.INTER_AREA)
    out = target.copy()
    masks: list[np.ndarray] = []
    cues: list[str] = []
    params: dict[str, Any] = {"regions": []}
    union = np.zeros((h, w), bool)
    for _ in range(regions):
        kind = shape or str(rng.choice(SHAPES, p=[0.3, 0.2, 0.25, 0.25]))
        bd = border or str(rng.choice(["hard", "feather", "poisson"], p=[0.4, 0.45, 0.15]))
        dshape = make_shape(kind, rng, h, w, _area(rng), donor)
        crop, (x0, y0, x1, y1) = _crop_to_bbox(dshape)
        tmask, (px, py) = _place(crop, h, w, rng, avoid=union)
        tmask &= ~union
        _check_region(tmask)
        # Donor content aligned to the placed region: the donor's bbox window moved to (px, py).
        # Donor content for the window around the placed region: the donor moved by (px-x0, py-y0).
        win = _window(tmask)
        wy0, wy1, wx0, wx1 = win
        shift = np.float32([[1, 0, px - x0 - wx0], [0, 1, py - y0 - wy0]])
        moved = cv2.warpAffine(donor, shift, (wx1 - wx0, wy1 - wy0), flags=cv2.INTER_NEAREST,
                               borderMode=cv2.BORDER_REFLECT)
        wmask = tmask[wy0:wy1, wx0:wx1]
        local_cues: list[str] = []
        rp: dict[str, Any] = {"shape": kind, "border": bd}
        moved = _treat_donor(moved, rng, out, wmask, tmask, rp, local_cues)
        out, m = _paste(out, moved, tmask, bd, rng, win)
        if bd == "hard":
            local_cues.insert(0, "edges")
        if not local_cues:
            # Seamless and colour-matched: the donor camera's grain is what remains.
            moved2 = add_noise(moved, rng, float(rng.uniform(3.0, 7.0)), correlated=float(rng.uniform(0, 1.2)))
            out, m = _paste(out, moved2, tmask, bd, rng, win)
            local_cues.append("noise_texture")
        union |= m
        masks.append(m)
        params["regions"].append(rp)
        cues.extend(c for c in local_cues if c not in cues)
    return _result(target, out, masks, "splice", cues, params)


def splice_object(target: np.ndarray, stamp_rgba: np.ndarray, rng: np.random.Generator, *,
                  border: str | None = None, colour_match: bool | None = None) -> TamperResult:
    """Paste a real object cut-out (RGBA, e.g. a Tux Paint stamp) at random scale, rotation and position.

    The mask is the object's own alpha after the same transform (alpha >= 50%), so it is exact.
    """
    h, w = target.shape[:2]
    if stamp_rgba.ndim != 3 or stamp_rgba.shape[2] != 4:
        raise TamperError("an object splice needs an RGBA cut-out")
    alpha = stamp_rgba[..., 3]
    ys, xs = np.nonzero(alpha > 127)
    if ys.size < 16:
        raise TamperError("the cut-out's alpha is empty")
    stamp = stamp_rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    sh, sw = stamp.shape[:2]
    area = _area(rng, 0.02, 0.2)
    fill = float((stamp[..., 3] > 127).mean())
    scale = np.sqrt(area * h * w / max(fill * sh * sw, 1))
    scale = min(scale, 0.9 * w / sw, 0.9 * h / sh)
    angle = float(rng.uniform(-30, 30)) if rng.random() < 0.6 else 0.0
    flip = bool(rng.random() < 0.5)
    if flip:
        stamp = stamp[:, ::-1]
    # One affine warp: scale + rotate about the stamp centre, output canvas sized to fit.
    m = cv2.getRotationMatrix2D((sw / 2, sh / 2), angle, scale)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    ow, oh = int(sh * sin + sw * cos) + 2, int(sh * cos + sw * sin) + 2
    if ow >= w or oh >= h or ow < 4 or oh < 4:
        raise TamperError("the cut-out does not fit the image at this scale")
    m[0, 2] += ow / 2 - sw / 2
    m[1, 2] += oh / 2 - sh / 2
    warped = cv2.warpAffine(np.ascontiguousarray(stamp), m, (ow, oh), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    obj = warped[..., 3] > 127
    x, y = int(rng.integers(0, w - ow + 1)), int(rng.integers(0, h - oh + 1))
    mask = np.zeros((h, w), bool)
    mask[y:y + oh, x:x + ow] = obj
    _check_region(mask)
    content = np.ascontiguousarray(warped[..., :3])  # the window (y, y+oh, x, x+ow) of the target
    win = (y, y + oh, x, x + ow)
    params: dict[str, Any] = {"shape": "object", "scale": round(float(scale), 3), "angle": round(angle, 1),
                              "flip": flip}
    cues = ["shadows"]  # a pasted cut-out casts no shadow into its new scene
    bd = border or str(rng.choice(["hard", "feather"], p=[0.5, 0.5]))
    params["border"] = bd
    if colour_match if colour_match is not None else rng.random() < 0.4:
        content = colour_transfer(content, obj, target, ~mask)
        params["colour_match"] = True
    else:
        params["colour_match"] = False
        cues.append("lighting")
    if bd == "hard":
        cues.insert(0, "edges")
    out, m_ = _paste(target, content, mask, bd, rng, win)
    return _result(target, out, [m_], "splice", cues, {"regions": [params]})


def _affine_move(img: np.ndarray, src: np.ndarray, rng: np.random.Generator, union: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, dict, tuple[int, int, int, int]]:
    """Warp ``img`` and the bool ``src`` region with a random similarity (+ flip) to a new place.

    Returns (moved content for the window, destination mask, params, window (y0, y1, x0, x1)):
    only the destination window is warped, not the whole image.
    """
    h, w = src.shape
    crop, (x0, y0, x1, y1) = _crop_to_bbox(src)
    cw, ch = x1 - x0, y1 - y0
    scale = float(rng.uniform(0.75, 1.3)) if rng.random() < 0.6 else 1.0
    angle = float(rng.uniform(-40, 40)) if rng.random() < 0.5 else 0.0
    flip = bool(rng.random() < 0.3)
    # Size of the transformed bbox, to choose a destination that keeps it inside the image.
    rad = np.deg2rad(angle)
    ext_w = abs(cw * np.cos(rad)) + abs(ch * np.sin(rad))
    ext_h = abs(cw * np.sin(rad)) + abs(ch * np.cos(rad))
    scale = min(scale, 0.8 * w / ext_w, 0.8 * h / ext_h)  # shrink a copy that would not fit
    tw, th = int(scale * ext_w) + 2, int(scale * ext_h) + 2
    if tw >= w or th >= h:
        raise TamperError("region too large to move")
    # Choose the destination box by its overlap with the source box (cheap), then warp once.
    best: tuple[int, int, int] | None = None
    for _ in range(12):
        dx, dy = int(rng.integers(0, w - tw + 1)), int(rng.integers(0, h - th + 1))
        ox = max(0, min(x1, dx + tw) - max(x0, dx))
        oy = max(0, min(y1, dy + th) - max(y0, dy))
        if best is None or ox * oy < best[0]:
            best = (ox * oy, dx, dy)
        if ox * oy == 0:
            break
    assert best is not None
    _, dx, dy = best
    m = cv2.getRotationMatrix2D(((x0 + x1) / 2, (y0 + y1) / 2), angle, scale)
    if flip:  # mirror about the region's vertical axis before rotating
        m = m @ np.array([[-1, 0, x0 + x1], [0, 1, 0], [0, 0, 1]], np.float64)
    m[0, 2] += dx + tw / 2 - (x0 + x1) / 2
    m[1, 2] += dy + th / 2 - (y0 + y1) / 2
    # Warp straight into the destination window (grown a little for the feather).
    wy0, wy1 = max(0, dy - 8), min(h, dy + th + 8)
    wx0, wx1 = max(0, dx - 8), min(w, dx + tw + 8)
    mw = m.copy()
    mw[:, 2] -= (wx0, wy0)
    size = (wx1 - wx0, wy1 - wy0)
    dst = np.zeros((h, w), bool)
    dst[wy0:wy1, wx0:wx1] = cv2.warpAffine(src.view(np.uint8), mw, size, flags=cv2.INTER_NEAREST) > 0
    dst &= ~src & ~union
    moved = cv2.warpAffine(img, mw, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    params = {"scale": round(scale, 3), "angle": round(angle, 1), "flip": flip,
              "source_bbox": list(_bbox(src))}
    return moved, dst, params, (wy0, wy1, wx0, wx1)


def copy_move(img: np.ndarray, rng: np.random.Generator, *, shape: str | None = None,
              border: str | None = None) -> TamperResult:
    """Copy one region of ``img`` elsewhere in it, with translation, scale, rotation and flip.

    The mask marks the pasted (target) region only; its source is recorded in ``params``.
    """
    h, w = img.shape[:2]
    kind = shape or str(rng.choice(SHAPES, p=[0.3, 0.2, 0.25, 0.25]))
    src = make_shape(kind, rng, h, w, _area(rng, 0.015, 0.12), img)
    moved, dst, params, win = _affine_move(img, src, rng, np.zeros((h, w), bool))
    _check_region(dst)
    bd = border or str(rng.choice(["hard", "feather"], p=[0.5, 0.5]))
    params.update(shape=kind, border=bd)
    out, m = _paste(img, moved, dst, bd, rng, win)
    cues = ["duplicated"]
    if bd == "hard":
        cues.append("edges")
    if params["scale"] != 1.0 or params["angle"] != 0.0:
        cues.append("blur_mismatch")  # resampling softens the copy
    return _result(img, out, [m], "copy_move", cues, {"regions": [params]})


def inpaint(img: np.ndarray, hole: np.ndarray, radius: float, flag: int) -> np.ndarray:
    """``cv2.inpaint`` of a bool ``hole``, run on a window around it and at reduced scale for big holes.

    Inpainting only reads a band of ``radius`` around the hole, so the window gives the same result
    for less work; holes over ~6000 px are filled at half or quarter scale (their fill is smooth
    anyway) and upsampled, which keeps a 512 px removal near 20 ms instead of 100+.
    """
    y0, y1, x0, x1 = _window(hole, margin=int(radius) * 2 + 4)
    crop, m = img[y0:y1, x0:x1], hole[y0:y1, x0:x1]
    f = 1
    while m.sum() / (f * f) > 6000 and f < 4:
        f *= 2
    if f > 1:
        ch, cw = crop.shape[:2]
        small = cv2.resize(crop, (max(4, cw // f), max(4, ch // f)), interpolation=cv2.INTER_AREA)
        sm = cv2.resize(m.astype(np.uint8), (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA) > 0
        fill = cv2.inpaint(small, sm.astype(np.uint8) * 255, max(2.0, radius / f), flag)
        fill = cv2.resize(fill, (cw, ch), interpolation=cv2.INTER_CUBIC)
    else:
        fill = cv2.inpaint(np.ascontiguousarray(crop), m.astype(np.uint8) * 255, radius, flag)
    out = img.copy()
    out[y0:y1, x0:x1][m] = fill[m]
    return out


def patch_fill(img: np.ndarray, hole: np.ndarray, rng: np.random.Generator, candidates: int = 48) -> np.ndarray:
    """Fill ``hole`` with the patch from elsewhere whose surrounding band best matches the hole's band.

    A small exemplar-based fill (in the spirit of Criminisi et al. / content-aware fill, one patch
    for the whole hole). Hand-written: OpenCV's patch-based inpainting (xphoto) is only in contrib.
    """
    h, w = hole.shape
    band_w = max(3, int(0.02 * max(h, w)))
    x0, y0, x1, y1 = _bbox(hole)
    x0, y0 = max(0, x0 - band_w), max(0, y0 - band_w)
    x1, y1 = min(w, x1 + band_w), min(h, y1 + band_w)
    ph, pw = y1 - y0, x1 - x0
    if ph >= h or pw >= w:
        raise TamperError("hole too large for a patch fill")
    win_hole = hole[y0:y1, x0:x1]
    ring = cv2.dilate(win_hole.astype(np.uint8), np.ones((2 * band_w + 1,) * 2, np.uint8)).astype(bool) & ~win_hole
    ref = img[y0:y1, x0:x1].astype(np.float32)[ring]
    best, best_cost = None, np.inf
    for _ in range(candidates):
        sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
        if hole[sy:sy + ph, sx:sx + pw].any():
            continue
        cand = img[sy:sy + ph, sx:sx + pw].astype(np.float32)[ring]
        cost = float(np.mean((cand - ref) ** 2))
        if cost < best_cost:
            best, best_cost = (sy, sx), cost
    if best is None:
        raise TamperError("no hole-free patch found for a patch fill")
    sy, sx = best
    out = img.copy()
    src = img[sy:sy + ph, sx:sx + pw]
    out[y0:y1, x0:x1][win_hole] = src[win_hole]
    return out


def removal(img: np.ndarray, rng: np.random.Generator, *, shape: str | None = None, method: str | None = None,
            regions: int = 1, object_alpha: np.ndarray | None = None) -> TamperResult:
    """Remove region(s) by filling them: ``telea``/``ns`` (OpenCV inpainting) or ``patch`` (patch fill).

    ``object_alpha`` (an object silhouette, e.g. a stamp's alpha) gives an object-shaped hole.
    """
    h, w = img.shape[:2]
    out = img.copy()
    masks: list[np.ndarray] = []
    cues: list[str] = []
    params: dict[str, Any] = {"regions": []}
    union = np.zeros((h, w), bool)
    for i in range(regions):
        kind = shape or str(rng.choice(SHAPES, p=[0.35, 0.15, 0.25, 0.25]))
        if i == 0 and object_alpha is not None:
            sil = _crop_to_bbox(object_alpha > 127)[0]
            area = _area(rng, 0.01, 0.08)
            s = np.sqrt(area * h * w / max(int(sil.sum()), 1))
            sil = cv2.resize(sil.astype(np.uint8), (max(2, int(sil.shape[1] * s)), max(2, int(sil.shape[0] * s))),
                             interpolation=cv2.INTER_NEAREST).astype(bool)
            if sil.shape[0] >= h or sil.shape[1] >= w:
                raise TamperError("object silhouette too large for the image")
            hole, _ = _place(sil, h, w, rng, avoid=union)
            kind = "object"
        else:
            hole = make_shape(kind, rng, h, w, _area(rng, 0.01, 0.08), img)
        hole &= ~union
        _check_region(hole)
        meth = method or str(rng.choice(["telea", "ns", "patch"], p=[0.35, 0.25, 0.4]))
        if meth == "patch":
            try:
                filled = patch_fill(out, hole, rng)
                local = ["duplicated", "edges"]
            except TamperError:
                meth = "telea"
        if meth in ("telea", "ns"):
            flag = cv2.INPAINT_TELEA if meth == "telea" else cv2.INPAINT_NS
            filled = inpaint(out, hole, float(rng.uniform(3, 6)), flag)
            local = ["smudged", "blur_mismatch"]
        # Inpainting may leave a pixel equal to the original; the mask is still the whole hole,
        # because the region's content was replaced.
        out[hole] = filled[hole]
        union |= hole
        masks.append(hole)
        params["regions"].append({"shape": kind, "method": meth})
        cues.extend(c for c in local if c not in cues)
    return _result(img, out, masks, "removal", cues, params)


def _fractal_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Zero-mean, unit-std 1/f-like texture (sum of upsampled random octaves), HxW float32."""
    tex = np.zeros((h, w), np.float32)
    amp = 1.0
    for g in (4, 8, 16, 32, 64):
        tex += amp * cv2.resize(rng.standard_normal((g, g)).astype(np.float32), (w, h),
                                interpolation=cv2.INTER_CUBIC)
        amp *= 0.6
    return (tex - tex.mean()) / (tex.std() + 1e-6)


def aigc_edit(img: np.ndarray, rng: np.random.Generator, *, shape: str | None = None,
              mode: str | None = None) -> TamperResult:
    """Re-synthesise a region with a different noise/texture profile (an imitation of generative inpainting).

    ``regenerate``: the region's content through a lossy "decoder" (downsample x2-4, cubic upsample,
    bilateral smoothing) plus fresh, spatially correlated noise. ``replace``: content inpainted away
    and replaced by smooth fill plus synthetic 1/f texture. Both are blended with a soft inner seam.
    """
    h, w = img.shape[:2]
    kind = shape or str(rng.choice(SHAPES, p=[0.35, 0.15, 0.25, 0.25]))
    region = make_shape(kind, rng, h, w, _area(rng, 0.02, 0.2), img)
    _check_region(region)
    mode = mode or str(rng.choice(["regenerate", "replace"], p=[0.6, 0.4]))
    f = int(rng.choice([2, 3, 4]))
    # Work in a window around the region (with room for the filters), not the whole image.
    win = _window(region, margin=16)
    y0, y1, x0, x1 = win
    crop, rmask = img[y0:y1, x0:x1], region[y0:y1, x0:x1]
    ch, cw = crop.shape[:2]
    if mode == "regenerate":
        small = cv2.resize(crop, (max(4, cw // f), max(4, ch // f)), interpolation=cv2.INTER_AREA)
        regen = cv2.resize(small, (cw, ch), interpolation=cv2.INTER_CUBIC)
        regen = cv2.bilateralFilter(regen, 5, 30, 5)
        cues = ["noise_texture", "blur_mismatch"]
    else:
        fill = inpaint(crop, rmask, 4, cv2.INPAINT_TELEA)
        tex = _fractal_texture(rng, ch, cw)
        regen = np.clip(fill.astype(np.float32) + float(rng.uniform(4, 10)) * tex[..., None], 0, 255).astype(np.uint8)
        cues = ["noise_texture", "smudged"]
    # New grain with a different spectrum from the camera's: correlated, a little chromatic.
    sigma = float(rng.uniform(2.0, 6.0))
    regen = add_noise(regen, rng, sigma, correlated=float(rng.uniform(0.6, 1.5)))
    shift = rng.uniform(-6, 6, 3).astype(np.float32)
    regen = np.clip(regen.astype(np.float32) + shift, 0, 255).astype(np.uint8)
    out, m = _paste(img, regen, region, "feather", rng, win)
    params = {"regions": [{"shape": kind, "mode": mode, "factor": f, "noise": round(sigma, 2)}]}
    return _result(img, out, [m], "aigc_edit", cues, params)


def _result(before: np.ndarray, out: np.ndarray, masks: list[np.ndarray], manipulation: str, cues: list[str],
            params: dict) -> TamperResult:
    """Check exactness (nothing changed outside the masks) and convert masks to uint8 0/255."""
    union = np.zeros(before.shape[:2], np.uint8)
    for m in masks:
        union |= m.view(np.uint8)
    # Put the originals back inside the masks: the result must then equal the input exactly.
    restored = cv2.copyTo(before, union, out.copy())
    if not np.array_equal(restored, before):  # a bug, not bad luck: never write an inexact mask
        leak = int(_changed(before, restored).sum())
        raise AssertionError(f"{manipulation}: {leak} pixels changed outside the mask")
    return TamperResult(out, [m.astype(np.uint8) * 255 for m in masks], manipulation, cues, params)


# ---- whole-image post-processing ----------------------------------------------------------------

def post_process(img: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator,
                 ops: tuple[str, ...] | list[str] = POST_OPS, max_ops: int = 2,
                 p_none: float = 0.35) -> tuple[np.ndarray, list[np.ndarray], list[dict]]:
    """Apply 0..``max_ops`` random operations of ``ops`` to the whole image; masks follow resizes.

    Returns (image, masks, records) with records like ``{"op": "jpeg", "quality": 75}`` in order.
    """
    ops = [o for o in ops if o in POST_OPS]
    if not ops or rng.random() < p_none:
        return img, masks, []
    k = int(rng.integers(1, min(max_ops, len(ops)) + 1))
    chosen = [str(o) for o in rng.choice(ops, size=k, replace=False)]
    # Resize first and JPEG last, as when a photo is resized and then saved for the web.
    chosen.sort(key=lambda o: {"resize": 0, "blur": 1, "noise": 2, "jpeg": 3}[o])
    records: list[dict] = []
    for op in chosen:
        if op == "resize":
            s = float(rng.uniform(0.6, 0.95))
            h, w = img.shape[:2]
            nw, nh = max(16, round(w * s)), max(16, round(h * s))
            img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
            masks = [(cv2.resize(m, (nw, nh), interpolation=cv2.INTER_AREA) >= 128).astype(np.uint8) * 255
                     for m in masks]
            records.append({"op": "resize", "scale": round(s, 3), "size": [nw, nh]})
        elif op == "blur":
            sigma = float(rng.uniform(0.4, 1.2))
            img = cv2.GaussianBlur(img, (0, 0), sigma)
            records.append({"op": "blur", "sigma": round(sigma, 2)})
        elif op == "noise":
            sigma = float(rng.uniform(1.0, 4.0))
            img = add_noise(img, rng, sigma)
            records.append({"op": "noise", "sigma": round(sigma, 2)})
        elif op == "jpeg":
            q = int(rng.integers(60, 96))
            img = jpeg(img, q)
            records.append({"op": "jpeg", "quality": q})
    return img, masks, records


MANIPULATORS: dict[str, Callable[..., TamperResult]] = {
    "splice": splice, "copy_move": copy_move, "removal": removal, "aigc_edit": aigc_edit,
}
