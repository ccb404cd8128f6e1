"""Compression: JPEG, JPEG 2000 and WebP artifacts, made by encoding and decoding in memory.

Nothing here touches the disk, and these are the only functions that create compression artifacts
(the dataset itself is PNG).

* JPEG: OpenCV's libjpeg at a quality ladder (images are passed in BGR order, as libjpeg's YCbCr
  conversion expects).
* WebP: Pillow's libwebp with ``method=0`` (its fastest encoder: ~8 ms at 448 px, against ~23 ms
  for OpenCV's fixed method 4; the artifacts are the same kind: smeared blocks, lost texture).
* JPEG 2000: OpenJPEG takes 65-110 ms at 448 px, so we run JPEG 2000's *lossy* stages ourselves:
  the irreversible colour transform (YCbCr), a 4-level CDF 9/7 wavelet transform (lifting scheme,
  filter bank as in the standard, run as OpenCV separable filters) and dead-zone scalar quantization with mid-point reconstruction. The stage
  we skip, EBCOT entropy coding, is lossless and adds no artifact; quantization step sizes stand in
  for its rate control. The result shows JPEG 2000's ringing and blurred texture in ~10 ms.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

from ._common import param, register


@register("compression_jpeg", (40, 26, 16, 9, 4))  # libjpeg quality
def compression_jpeg(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    q = param("compression_jpeg", level)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(img[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:
        raise RuntimeError("OpenCV could not JPEG-encode the image")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])


@register("compression_webp", (30, 16, 8, 3, 0))  # libwebp quality
def compression_webp(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    q = param("compression_webp", level)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "WEBP", quality=q, method=0)
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB")).copy()


# CDF 9/7 filter bank (JPEG 2000 Part 1 irreversible transform): analysis low/high, synthesis low/high.
_LO_A = np.array([0.026748757411, -0.016864118443, -0.078223266529, 0.266864118443, 0.602949018236,
                  0.266864118443, -0.078223266529, -0.016864118443, 0.026748757411], np.float32)
_HI_A = np.array([0.091271763114, -0.057543526229, -0.591271763114, 1.11508705, -0.591271763114,
                  -0.057543526229, 0.091271763114], np.float32)
_LO_S = np.array([-0.091271763114, -0.057543526229, 0.591271763114, 1.11508705, 0.591271763114,
                  -0.057543526229, -0.091271763114], np.float32)
_HI_S = np.array([0.026748757411, 0.016864118443, -0.078223266529, -0.266864118443, 0.602949018236,
                  -0.266864118443, -0.078223266529, 0.016864118443, 0.026748757411], np.float32)
_ONE = np.ones((1, 1), np.float32)


def _filt(x: np.ndarray, k: np.ndarray, axis: int) -> np.ndarray:
    # whole-sample symmetric extension (BORDER_REFLECT_101), as JPEG 2000 specifies
    kx, ky = (_ONE, k.reshape(-1, 1)) if axis == 0 else (k.reshape(1, -1), _ONE)
    return cv2.sepFilter2D(x, -1, kx, ky, borderType=cv2.BORDER_REFLECT_101)


def _analysis(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = _filt(x, _LO_A, axis), _filt(x, _HI_A, axis)
    if axis == 0:
        return np.ascontiguousarray(lo[0::2]), np.ascontiguousarray(hi[1::2])
    return np.ascontiguousarray(lo[:, 0::2]), np.ascontiguousarray(hi[:, 1::2])


def _synthesis(lo: np.ndarray, hi: np.ndarray, axis: int) -> np.ndarray:
    shape = list(lo.shape)
    shape[axis] *= 2
    ul = np.zeros(shape, np.float32)
    uh = np.zeros(shape, np.float32)
    if axis == 0:
        ul[0::2], uh[1::2] = lo, hi
    else:
        ul[:, 0::2], uh[:, 1::2] = lo, hi
    return _filt(ul, _LO_S, axis) + _filt(uh, _HI_S, axis)


def _quantize(c: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Dead-zone quantizer with mid-point reconstruction (coefficients below one step become 0)."""
    q = np.trunc(c / step)
    return (q + np.sign(q) * 0.5) * step


def _wavelet_roundtrip(x: np.ndarray, steps: np.ndarray, levels: int) -> np.ndarray:
    """Forward DWT, quantize every sub-band, inverse DWT, on a float32 (H, W[, C]) plane set."""
    bands = []  # per level, finest first: (low-high, high-low, high-high), already quantized
    ll = x
    for lev in range(levels):
        st = steps * (2.0 ** (lev * 0.5))  # coarser levels carry more gain in this normalisation
        lo, hi = _analysis(ll, 0)
        lolo, lohi = _analysis(lo, 1)
        hilo, hihi = _analysis(hi, 1)
        bands.append((_quantize(lohi, st), _quantize(hilo, st), _quantize(hihi, st * 1.4)))
        ll = lolo
    q = steps / 4  # the DC band is kept finer, as rate control would
    ll = np.round(ll / q) * q
    for lohi, hilo, hihi in reversed(bands):
        ll = _synthesis(_synthesis(ll, lohi, 1), _synthesis(hilo, hihi, 1), 0)
    return ll


def wavelet_codec(img: np.ndarray, step: float, levels: int = 4) -> np.ndarray:
    """JPEG 2000's lossy path (see module docstring) with base quantizer ``step`` (0..255 units).

    Chroma is coded at half resolution (JPEG 2000 allows sub-sampled components), with a coarser
    step, which halves the cost and is what consumer encoders do.
    """
    h, w = img.shape[:2]
    m = 1 << (levels + 1)
    ph, pw = (-h) % m, (-w) % m
    x = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_REFLECT_101) if (ph or pw) else img
    H, W = x.shape[:2]
    ycc = cv2.cvtColor(x, cv2.COLOR_RGB2YCrCb)
    y8, cr8, cb8 = cv2.split(ycc)
    y = _wavelet_roundtrip(cv2.subtract(y8, 128.0, dtype=cv2.CV_32F), np.float32(step), levels)
    c8 = cv2.resize(cv2.merge([cr8, cb8]), (W // 2, H // 2), interpolation=cv2.INTER_AREA)
    c = _wavelet_roundtrip(cv2.subtract(c8, (128.0, 128.0, 0.0, 0.0), dtype=cv2.CV_32F), np.float32(step * 1.5),
                           levels - 1)
    c = cv2.resize(c, (W, H), interpolation=cv2.INTER_LINEAR)
    merged = cv2.merge([y, c[..., 0], c[..., 1]])
    out = cv2.cvtColor(cv2.add(merged, (128.0, 128.0, 128.0, 0.0), dtype=cv2.CV_8U), cv2.COLOR_YCrCb2RGB)
    return np.ascontiguousarray(out[:h, :w])


@register("compression_jpeg2000", (3.5, 6.0, 10.0, 16.0, 26.0))  # base quantizer step (0..255)
def compression_jpeg2000(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return wavelet_codec(img, param("compression_jpeg2000", level), levels=4 if min(img.shape[:2]) >= 256 else 3)
