"""Noise: Gaussian (RGB and YCbCr), speckle, spatially correlated, Poisson, impulse and uniform.

Noise is drawn by OpenCV's ``randn``/``randu`` (4x faster than numpy's Generator at 448 px), seeded
from the numpy ``Generator`` passed in just before each draw, so results stay deterministic per
seed (OpenCV's RNG state is per thread). Adding noise and saturating to uint8 is one ``cv2.add``.
Poisson noise uses its Gaussian approximation (variance equal to the photon count): numpy's exact
Poisson sampler costs ~50 ms at 448 px, and at the counts used here (>= 23 photons at full white)
the two are hard to tell apart by eye.

Ladders were recalibrated on the pool (benchmarks/distortions.py --calibrate); see benchmarks/README.md.
"""

from __future__ import annotations

import cv2
import numpy as np

from ._common import param, register, scale

# RGB <- YCbCr (JPEG / BT.601 full range) for noise drawn in YCbCr.
_YCC_TO_RGB = np.array([[1.0, 0.0, 1.402], [1.0, -0.344136, -0.714136], [1.0, 1.772, 0.0]], np.float32)


def _normal(rng: np.random.Generator, shape: tuple[int, ...], sigma=1.0) -> np.ndarray:
    """float32 N(0, sigma^2) noise of ``shape`` (H, W, 3); ``sigma`` may be per channel."""
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    out = np.empty(shape, np.float32)
    sig = tuple(float(v) for v in np.broadcast_to(np.asarray(sigma, np.float64), (3,)))
    cv2.randn(out, (0.0, 0.0, 0.0), sig)
    return out


def _add(img: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """img + noise, rounded and saturated to uint8 in one OpenCV call."""
    return cv2.add(img, noise, dtype=cv2.CV_8U)


@register("noise_gaussian_rgb", (5.0, 9.0, 15.0, 24.0, 38.0))  # sigma (0..255)
def noise_gaussian_rgb(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return _add(img, _normal(rng, img.shape, param("noise_gaussian_rgb", level)))


@register("noise_gaussian_ycbcr", ((3.0, 4.0), (5.0, 7.0), (8.5, 12.0), (14.0, 19.0), (22.0, 30.0)))
def noise_gaussian_ycbcr(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Independent noise on luma (first sigma) and both chroma channels (second sigma)."""
    sy, sc = param("noise_gaussian_ycbcr", level)
    n = _normal(rng, img.shape, (sy, sc, sc))
    rgb_noise = cv2.transform(n, _YCC_TO_RGB)  # per pixel 3x3 matrix: YCbCr noise expressed in RGB
    return _add(img, rgb_noise)


@register("noise_speckle", (0.04, 0.075, 0.12, 0.19, 0.3))  # std of the multiplicative factor
def noise_speckle(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    n = _normal(rng, img.shape, param("noise_speckle", level))
    return _add(img, cv2.multiply(n, img, dtype=cv2.CV_32F))  # img * (1 + n)


@register("noise_spatially_correlated", (5.0, 9.0, 15.0, 24.0, 36.0))  # std after correlation (0..255)
def noise_spatially_correlated(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise low-passed over ~2 px (blotchy, like denoised sensor noise), rescaled to its std."""
    sigma = 1.0 * scale(img) + 0.3
    # a Gaussian filter of std s divides white-noise std by 2*sqrt(pi)*s; undo it so the ladder is the std
    gain = param("noise_spatially_correlated", level) * 2.0 * np.sqrt(np.pi) * sigma
    return _add(img, cv2.GaussianBlur(_normal(rng, img.shape, gain), (0, 0), sigma))


@register("noise_poisson", (1300.0, 400.0, 145.0, 57.0, 23.0))  # photons at full white (std at mid-grey = gaussian ladder)
def noise_poisson(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    peak = param("noise_poisson", level)
    std = cv2.sqrt(img.astype(np.float32) * (255.0 / peak) + 1e-3)
    return _add(img, cv2.multiply(_normal(rng, img.shape), std))


@register("noise_impulse", (0.004, 0.01, 0.022, 0.045, 0.09))  # fraction of pixels hit
def noise_impulse(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    d = param("noise_impulse", level)
    u = rng.random(img.shape[:2], dtype=np.float32)
    out = img.copy()
    out[u < d / 2] = 0
    out[(u >= d / 2) & (u < d)] = 255
    return out


@register("noise_uniform", (9.0, 16.0, 26.0, 42.0, 66.0))  # half-width a of U(-a, a) (0..255)
def noise_uniform(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    a = param("noise_uniform", level)
    cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
    n = np.empty(img.shape, np.float32)
    cv2.randu(n, (-a, -a, -a), (a, a, a))
    return _add(img, n)
