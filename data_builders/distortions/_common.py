"""Shared helpers of the distortion library: the registry, severity ladders, fast uint8 conversions.

A distortion function takes ``(img, level, rng)`` (uint8 HxWx3 RGB, level 1..5, a numpy Generator)
and returns a new uint8 HxWx3 RGB image of the same size. Spatial parameters (blur radii, block
sizes) are given for a 448 px short side and scaled with the image (not below half), so a severity
looks alike at any size from 224 px up.
"""

from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

DistortionFn = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]

REGISTRY: dict[str, DistortionFn] = {}
LADDERS: dict[str, tuple] = {}
REFERENCE_SIDE = 448.0


def register(name: str, ladder: Sequence) -> Callable[[DistortionFn], DistortionFn]:
    """Register ``fn`` under taxonomy id ``name`` with its 5-step parameter ladder."""
    if len(ladder) != 5:
        raise ValueError(f"{name}: a ladder needs 5 severities, got {len(ladder)}")

    def deco(fn: DistortionFn) -> DistortionFn:
        REGISTRY[name] = fn
        LADDERS[name] = tuple(ladder)
        return fn
    return deco


def param(name: str, level: int):
    """The parameter of ``name`` at severity ``level`` (1..5)."""
    if not 1 <= int(level) <= 5:
        raise ValueError(f"severity level must be 1..5, got {level}")
    return LADDERS[name][int(level) - 1]


def scale(img: np.ndarray) -> float:
    """Short side relative to the 448 px the ladders were calibrated at, floored at 0.5.

    Below 224 px the floor keeps slight blur, jitter or sharpening from shrinking to a no-op (an
    image labelled "slight Gaussian blur" must differ from its source); such small images get
    relatively stronger spatial distortions instead.
    """
    return max(min(img.shape[:2]), REFERENCE_SIDE / 2) / REFERENCE_SIDE


def to_u8(x: np.ndarray) -> np.ndarray:
    """Round and saturate a float image to uint8."""
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def curve_lut(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A 256-entry uint8 LUT of a tone curve ``fn`` on [0,1] -> [0,1]."""
    x = np.arange(256, dtype=np.float64) / 255.0
    return to_u8(np.clip(fn(x), 0.0, 1.0) * 255.0)


def lut(img: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a 256-entry LUT to every channel (OpenCV, ~0.2 ms at 448 px)."""
    return cv2.LUT(img, table)
