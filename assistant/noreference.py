"""No-reference readings: the judged image's own statistics, read together with the heads' logits.

Without a reference image, loupe-smol's auxiliary heads alone decide which distortion and severity words an
answer may use (``assistant/guidance.py``). They call half of the slight distortions clean, and their severity
ranks a pair of images the wrong way round one time in six. Classic no-reference measurements see several of
these distortions directly: pixelation leaves runs of equal pixels, quantisation leaves few colours and gaps in
the histogram, noise raises the fine detail of flat regions, blur lowers the fine detail against the coarse
one, and tonal and colour changes move the lightness, chroma and clipping statistics.

``image_features(rgb)`` measures CLASSIC_FEATURES (OpenCV and numpy) at most WORK_SIDE px; ``NoReferenceModel``
(the readings model of ``assistant/reference.py`` on FEATURES: these and the heads' logits) maps them to the
category or clean, the rating word, the worst severity and a 1..5 quality. ``loupe train noreference`` fits it
on a training split's labelled images with the checkpoint's own heads and saves it as
``noreference.safetensors`` (NOREFERENCE_FILE). The assistant then lets its readings guide quality answers
without a reference, as the full-reference readings guide those with one.

Hand-written for the same reason as ``assistant/reference.py``: no library maps such statistics to a
distortion taxonomy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .reference import CLASSES, WORK_SIDE, ReadingModel, ReferenceCue, ReferenceError, _fit_size, distinct_colours

NOREFERENCE_FILE = "noreference.safetensors"

CLASSIC_FEATURES = (
    "lightness_mean", "lightness_spread", "lightness_p1", "lightness_p5", "lightness_p50", "lightness_p95",
    "lightness_p99", "clipped_high", "clipped_low", "chroma_mean", "chroma_p95", "saturation_mean",
    "saturation_p95", "fine_detail", "middle_detail", "coarse_detail", "fine_to_middle", "middle_to_coarse",
    "fine_kurtosis", "gradient", "flat_detail", "noise_sigma", "flat_to_fine", "equal_right", "equal_below",
    "colours_coarse", "colours", "colours_per_pixel", "histogram_gaps", "grey_range")
"""What ``image_features`` measures, in order (see there). No feature is tied to one block size: edges on the
8-pixel grid (JPEG's) and on the grids of other block sizes (pixelation's) were measured at first, and on the
builders' data they helped a little (category at severity >= 2 on validation 0.804 -> 0.823), but the
builders pixelate with blocks of 1.5 to 5 px at 224 px and compress with JPEG's 8-px blocks, so the
regressions learned "8-pixel grid = compression" and called other code's 8-px pixelation compression: 0.06
right, against 0.89 without them, on `benchmarks/external_corruptions.py --split val` (validation photos)."""

HEADS_FEATURES = tuple(f"heads_{c}" for c in CLASSES[:-1]) + ("heads_severity", "heads_tampered")
"""The auxiliary heads' logits of the same image: one per distortion category, the severity and tampered."""

FEATURES = CLASSIC_FEATURES + HEADS_FEATURES


def image_features(rgb: np.ndarray) -> np.ndarray:
    """CLASSIC_FEATURES of one uint8 RGB image (H x W x 3), at most WORK_SIDE px on the longer side:

    * Lab lightness: mean, spread, 1st/5th/50th/95th/99th percentiles; the share of pixels clipped to white
      (any channel >= 250) and to black (all <= 5); chroma mean and 95th percentile; HSV saturation mean
      and 95th percentile (brighten/darken, contrast, saturation);
    * detail in three bands of the grey image (minus its blur at 1, between 1 and 2, between 2 and 4 px):
      log energies, their log ratios (blur lowers the fine band against the others, sharpening raises it),
      the fine band's kurtosis (halos), log mean gradient;
    * noise: the fine detail of the flattest fifth of the image, a Laplacian-type noise estimate
      (Immerkaer's), and their ratio to all fine detail;
    * the share of equal right and lower neighbours (pixelation), log distinct colours at 6 and 8 bits
      and per pixel, the share of empty grey levels between the 1st and 99th percentiles, and that range
      (quantisation, contrast)."""
    import cv2

    rgb = _fit_size(np.ascontiguousarray(rgb[..., :3], dtype=np.uint8), WORK_SIDE)
    h, w = rgb.shape[:2]
    if min(h, w) < 16:
        raise ReferenceError(f"the image is {w}x{h} px; at least 16x16 is needed")
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
    lightness, chroma = lab[..., 0], np.hypot(lab[..., 1], lab[..., 2])
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1].astype(np.float32) / 255
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    g = grey.astype(np.float32)
    b1, b2, b4 = (cv2.GaussianBlur(g, (0, 0), s) for s in (1.0, 2.0, 4.0))
    fine = g - b1
    e_fine, e_mid, e_coarse = fine.std() + 1e-2, (b1 - b2).std() + 1e-2, (b2 - b4).std() + 1e-2
    kurtosis = float(((fine - fine.mean()) ** 4).mean() / (fine.var() ** 2 + 1e-6)) + 1e-3
    grad = np.hypot(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
    flat_detail = float(np.abs(fine[grad <= np.percentile(grad, 20)]).mean()) + 1e-2
    kernel = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float32)
    sigma = float(np.abs(cv2.filter2D(g, -1, kernel)[1:-1, 1:-1]).mean() * np.sqrt(np.pi / 2) / 6) + 1e-2
    step = rgb.astype(np.int16)
    equal_right = float((np.abs(np.diff(step, axis=1)).max(-1) == 0).mean())
    equal_below = float((np.abs(np.diff(step, axis=0)).max(-1) == 0).mean())
    colours, colours_coarse = distinct_colours(rgb), distinct_colours(rgb // 4)
    lo, hi = np.percentile(grey, 1), np.percentile(grey, 99)
    inside = np.bincount(grey.ravel(), minlength=256)[int(lo):int(hi) + 1]
    gaps = float((inside == 0).mean()) if len(inside) > 2 else 0.0
    out = [lightness.mean(), lightness.std(), *np.percentile(lightness, [1, 5, 50, 95, 99]),
           float((rgb.max(-1) >= 250).mean()), float((rgb.min(-1) <= 5).mean()),
           chroma.mean(), np.percentile(chroma, 95), saturation.mean(), np.percentile(saturation, 95),
           np.log(e_fine), np.log(e_mid), np.log(e_coarse), np.log(e_fine / e_mid), np.log(e_mid / e_coarse),
           np.log(kurtosis), np.log(grad.mean() + 1e-2), np.log(flat_detail), np.log(sigma),
           np.log(flat_detail / e_fine), equal_right, equal_below, np.log(colours_coarse + 1), np.log(colours + 1),
           np.log(colours / (h * w)), gaps, hi - lo]
    return np.asarray(out, dtype=np.float64)


class NoReferenceModel(ReadingModel):
    """FEATURES of one image (its statistics and the heads' logits) -> the readings (``ReadingModel``)."""

    FEATURES = FEATURES
    FORMAT = "loupe-noreference-1"
    REFIT = "loupe train noreference"

    def judge(self, rgb: np.ndarray, heads_logits: Sequence[float] | np.ndarray) -> ReferenceCue:
        """The reading of one uint8 RGB image whose auxiliary heads gave ``heads_logits`` (len(HEADS_FEATURES))."""
        return self.predict(with_heads(image_features(rgb), heads_logits))[0]


def with_heads(classic: np.ndarray, heads_logits: Any) -> np.ndarray:
    """FEATURES: ``image_features``' vector followed by the heads' logits (checked for length)."""
    logits = np.asarray(heads_logits, dtype=np.float64).ravel()
    if len(logits) != len(HEADS_FEATURES):
        raise ReferenceError(f"{len(logits)} heads logits; the no-reference model reads {len(HEADS_FEATURES)} "
                             "(a model with other heads needs its own: loupe train noreference)")
    return np.concatenate([classic, logits])


def load_noreference_model(checkpoint: str | Path) -> NoReferenceModel | None:
    """The checkpoint's no-reference model, or None where it has none."""
    path = Path(checkpoint) / NOREFERENCE_FILE
    return NoReferenceModel.load(path) if path.is_file() else None


def heads_logits(model: Any, pixels: Sequence[Any]) -> np.ndarray:
    """The auxiliary heads' logits (N, len(HEADS_FEATURES)) of images as the assistant shows them to the heads:
    ``pixels`` are ``processing.to_lowlevel_tensor`` tensors at the model's ``lowlevel_max_side`` (an
    ``Encoded``'s ``lowlevel_pixels``)."""
    import torch

    with torch.no_grad():
        low = model.encode_lowlevel(list(pixels))
    if not low.aux or low.aux[0] is None:
        raise ReferenceError("the model has no auxiliary heads; the no-reference model reads their logits")
    return np.stack([a[0].float().cpu().numpy() for a in low.aux]).astype(np.float64)
