"""Tone and colour: brighten, darken, contrast up/down, saturation up/down.

Every function is a tone curve applied as a 256-entry LUT (``cv2.LUT``) to one colour space's
channels: RGB, HSV's value/saturation, or YCbCr's luma/chroma. The three variants of a category share
one curve family, so their severities agree; only where it acts differs, which is what tells
"HSV brightening" from "luminance brightening" (hue and saturation shifts differ).
"""

from __future__ import annotations

import cv2
import numpy as np

from ._common import curve_lut, lut, param, register

# Brighten/darken: gamma g and an exposure gain e, so highlights clip as well as mid-tones lifting.
_BRIGHT = ((1.2, 0.03), (1.4, 0.06), (1.7, 0.1), (2.1, 0.15), (2.7, 0.22))


def _brighten_curve(level: int, ladder=_BRIGHT):
    g, e = ladder[level - 1]
    return lambda x: x ** (1.0 / g) * (1.0 + e)


def _darken_curve(level: int, ladder=_BRIGHT):
    g, e = ladder[level - 1]
    return lambda x: x ** g * (1.0 - e)


def _on_channel(img: np.ndarray, to: int, back: int, channels: tuple[int, ...], tables) -> np.ndarray:
    x = cv2.cvtColor(img, to)
    parts = list(cv2.split(x))
    for c, t in zip(channels, tables):
        parts[c] = cv2.LUT(parts[c], t)
    return cv2.cvtColor(cv2.merge(parts), back)


# where each brighten/darken variant applies its curve: (to, back, channels), None meaning all of RGB
_SPACES = {
    "hsv": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, (2,)),  # value
    "rgb": None,
    "ycbcr": (cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, (0,)),  # luma
}


def _exposure_fn(curve, space):
    def fn(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
        table = curve_lut(curve(level))
        if _SPACES[space] is None:
            return lut(img, table)
        to, back, channels = _SPACES[space]
        return _on_channel(img, to, back, channels, (table,) * len(channels))
    return fn


for _space in _SPACES:
    register(f"brighten_{_space}", _BRIGHT)(_exposure_fn(_brighten_curve, _space))
    register(f"darken_{_space}", _BRIGHT)(_exposure_fn(_darken_curve, _space))


def _sigmoid_curve(k: float):
    """S-curve through (0,0), (0.5,0.5), (1,1) with mid-tone slope ~k/4."""
    lo, hi = 1 / (1 + np.exp(k / 2)), 1 / (1 + np.exp(-k / 2))
    return lambda x: (1 / (1 + np.exp(-k * (x - 0.5))) - lo) / (hi - lo)


@register("contrast_strengthen_scurve", (5.0, 7.5, 10.5, 15.0, 22.0))  # sigmoid steepness
def contrast_strengthen_scurve(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return lut(img, curve_lut(_sigmoid_curve(param("contrast_strengthen_scurve", level))))


@register("contrast_weaken_scurve", (5.0, 8.0, 12.0, 18.0, 28.0))  # steepness of the inverted S-curve
def contrast_weaken_scurve(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """The inverse of an S-curve: mid-tones flattened toward grey, shadows and highlights kept."""
    x = np.linspace(0, 1, 4097)
    y = _sigmoid_curve(param("contrast_weaken_scurve", level))(x)
    return lut(img, curve_lut(lambda t: np.interp(t, y, x)))


def _linear_about_mean(img: np.ndarray, gain: float) -> np.ndarray:
    m = float(cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))[0]) / 255.0
    return lut(img, curve_lut(lambda x: m + (x - m) * gain))


@register("contrast_strengthen_linear", (1.25, 1.45, 1.75, 2.15, 2.8))  # gain about the mean
def contrast_strengthen_linear(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return _linear_about_mean(img, param("contrast_strengthen_linear", level))


@register("contrast_weaken_linear", (0.72, 0.55, 0.4, 0.27, 0.16))  # gain about the mean
def contrast_weaken_linear(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return _linear_about_mean(img, param("contrast_weaken_linear", level))


def _gain_lut(gain: float, centre: float) -> np.ndarray:
    x = np.arange(256, dtype=np.float64)
    return np.clip(centre + (x - centre) * gain + 0.5, 0, 255).astype(np.uint8)


@register("saturate_strengthen_hsv", (1.4, 1.8, 2.4, 3.2, 4.5))  # saturation gain
def saturate_strengthen_hsv(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    t = _gain_lut(param("saturate_strengthen_hsv", level), 0.0)
    return _on_channel(img, cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, (1,), (t,))


@register("saturate_strengthen_ycbcr", (1.35, 1.7, 2.2, 2.9, 4.0))  # chroma gain
def saturate_strengthen_ycbcr(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    t = _gain_lut(param("saturate_strengthen_ycbcr", level), 128.0)
    return _on_channel(img, cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, (1, 2), (t, t))


@register("saturate_weaken_hsv", (0.7, 0.5, 0.32, 0.17, 0.05))  # saturation gain
def saturate_weaken_hsv(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    t = _gain_lut(param("saturate_weaken_hsv", level), 0.0)
    return _on_channel(img, cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB, (1,), (t,))


@register("saturate_weaken_ycbcr", (0.7, 0.5, 0.32, 0.17, 0.05))  # chroma gain
def saturate_weaken_ycbcr(img: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    t = _gain_lut(param("saturate_weaken_ycbcr", level), 128.0)
    return _on_channel(img, cv2.COLOR_RGB2YCrCb, cv2.COLOR_YCrCb2RGB, (1, 2), (t, t))
