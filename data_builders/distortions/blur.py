"""Blur: Gaussian, motion, glass, lens (defocus), zoom and jitter blur.

All are OpenCV filters or a single ``remap``: the Python-loop pixel swaps of the reference
implementations (glass blur, jitter) are replaced by one random displacement field, which gives the
same look in about 2 ms instead of seconds.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from ._common import param, register, scale


@register("blur_gaussian", (0.9, 1.6, 2.6, 4.0, 6.0))  # sigma in px at 448
def blur_gaussian(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sigma = param("blur_gaussian", level) * scale(img)
    return cv2.GaussianBlur(img, (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def _line_kernel(length: float, angle_deg: float) -> np.ndarray:
    size = int(np.ceil(length)) | 1
    k = np.zeros((size, size), np.float32)
    c = size / 2.0 - 0.5
    dx, dy = np.cos(np.deg2rad(angle_deg)) * (length - 1) / 2, np.sin(np.deg2rad(angle_deg)) * (length - 1) / 2
    shift = 4  # sub-pixel line end points (cv2.line's fixed-point 'shift')
    p0 = (int(round((c - dx) * 16)), int(round((c - dy) * 16)))
    p1 = (int(round((c + dx) * 16)), int(round((c + dy) * 16)))
    cv2.line(k, p0, p1, 1.0, 1, cv2.LINE_AA, shift)
    return k / max(k.sum(), 1e-6)


@register("blur_motion", (4, 7, 11, 17, 26))  # streak length in px at 448
def blur_motion(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    length = max(3.0, param("blur_motion", level) * scale(img))  # a 2-px streak can round to one pixel
    kernel = _line_kernel(length, float(rng.uniform(0, 180)))
    return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT)


def _disk_kernel(radius: float) -> np.ndarray:
    size = 2 * int(np.ceil(radius)) + 1
    k = np.zeros((size, size), np.float32)
    c = size // 2
    cv2.circle(k, (c * 16, c * 16), int(round(radius * 16)), 1.0, -1, cv2.LINE_AA, 4)
    return k / max(k.sum(), 1e-6)


@register("blur_lens", (1.3, 2.2, 3.4, 5.0, 7.5))  # defocus disk radius in px at 448
def blur_lens(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    radius = max(0.8, param("blur_lens", level) * scale(img))
    return cv2.filter2D(img, -1, _disk_kernel(radius), borderType=cv2.BORDER_REFLECT)


@functools.lru_cache(maxsize=8)
def _grid(h: int, w: int) -> np.ndarray:
    """(H, W, 2) float32 pixel coordinates (x, y), cached per size."""
    gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    g = np.dstack([gx, gy])
    g.setflags(write=False)
    return g


@register("blur_glass", ((0.6, 1.0), (0.8, 1.7), (1.0, 2.6), (1.3, 3.8), (1.7, 5.5)))  # (sigma, shift px)
def blur_glass(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Frosted glass: a soft blur, then every pixel fetched from a random nearby spot."""
    sigma, shift = param("blur_glass", level)
    s = scale(img)
    soft = cv2.GaussianBlur(img, (0, 0), sigma * s)
    h, w = img.shape[:2]
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))  # OpenCV's RNG: 4x faster than numpy's normal
    d = np.empty((h, w, 2), np.float32)
    cv2.randn(d, (0.0, 0.0), (shift * s * 1.6, shift * s * 1.6))
    # a slightly smoothed field gives the granular refraction of frosted glass, not single-pixel noise
    d = cv2.GaussianBlur(d, (0, 0), 0.8)
    return cv2.remap(soft, d + _grid(h, w), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@register("blur_jitter", (0.6, 1.0, 1.6, 2.4, 3.6))  # maximum shift in px at 448
def blur_jitter(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Pixel jitter: each pixel fetched from an independent random offset in [-a, a]^2 (bilinear)."""
    a = param("blur_jitter", level) * scale(img)
    h, w = img.shape[:2]
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    d = np.empty((h, w, 2), np.float32)
    cv2.randu(d, (-a, -a), (a, a))
    return cv2.remap(img, d + _grid(h, w), None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@register("blur_zoom", (0.012, 0.025, 0.045, 0.075, 0.12))  # zoom range (fraction of size)
def blur_zoom(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Radial zoom: the mean of 2^n copies scaled by f^0..f^(2^n - 1) about a point near the centre.

    Built by doubling (average the image with a copy zoomed by f, then the result with a copy
    zoomed by f^2, ...), so 2^n taps cost n warps instead of 2^n.
    """
    z = param("blur_zoom", level)
    h, w = img.shape[:2]
    cx = w * float(rng.uniform(0.4, 0.6))
    cy = h * float(rng.uniform(0.4, 0.6))
    n = 3 if level <= 2 else 4
    f = (1.0 + z) ** (1.0 / (2 ** n - 1))
    out = img
    for k in range(n):
        g = f ** (2 ** k)
        m = np.float32([[g, 0, cx * (1 - g)], [0, g, cy * (1 - g)]])
        zoomed = cv2.warpAffine(out, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        out = cv2.addWeighted(out, 0.5, zoomed, 0.5, 0)
    return out
