"""The distortion library: every distortion id of ``prompts.DISTORTIONS`` at 5 severities.

``apply(img, name, level, rng)`` distorts a uint8 RGB image; ``apply_many`` chains several in a
fixed pipeline order; ``sample_pair`` picks two compatible distortions; ``rating_for`` is the
written rule from severities to a rating. All functions are deterministic given the ``rng``,
vectorised (numpy/OpenCV), and create no compression artifacts except the compression ones.

Calibration (see ``benchmarks/distortions.py --calibrate`` and benchmarks/README.md): each
function's 5-step ladder was set so that severity k lands in the same band of a perceptual
difference for every function, measured on views of the built-in pool at 448 px. The difference is
``max(1 - SSIM(luma), mean CIEDE76 / 40)``: SSIM sees structural damage (blur, noise, blocks) and
the colour difference sees tone and colour shifts, which SSIM under-rates.
"""

from __future__ import annotations

import numpy as np

from loupe_vlm.prompts import CATEGORIES, DISTORTIONS, category_of

from . import blur, compression, noise, spatial, tone  # noqa: F401  (registers the functions)
from ._common import LADDERS, REGISTRY, param

_missing = set(DISTORTIONS.ids) - set(REGISTRY)
_extra = set(REGISTRY) - set(DISTORTIONS.ids)
if _missing or _extra:  # pragma: no cover - a programming error caught at import
    raise ImportError(f"distortion library out of step with prompts.DISTORTIONS: missing {sorted(_missing)}, "
                      f"unknown {sorted(_extra)}")

# Pipeline order of a multi-distortion image: capture (optics), tone, enhancement, sensor noise,
# then palette and codec, as an image goes from camera to file.
STAGE = {"blur": 0, "pixelate": 0, "brighten": 1, "darken": 1, "contrast_strengthen": 1,
         "contrast_weaken": 1, "saturate_strengthen": 1, "saturate_weaken": 1, "oversharpen": 2,
         "noise": 3, "quantization": 4, "compression": 5}

# Category pairs that cancel or mask each other, so neither could be named from the result.
INCOMPATIBLE = {frozenset(p) for p in (
    ("brighten", "darken"), ("contrast_strengthen", "contrast_weaken"),
    ("saturate_strengthen", "saturate_weaken"), ("blur", "oversharpen"), ("blur", "pixelate"),
    ("pixelate", "quantization"), ("noise", "quantization"),
)}


def apply(img: np.ndarray, name: str, level: int, rng: np.random.Generator | int) -> np.ndarray:
    """``img`` (uint8 HxWx3 RGB) distorted by ``name`` at severity ``level`` (1..5)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown distortion {name!r}; known: {', '.join(DISTORTIONS.ids)}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"distortions take uint8 HxWx3 RGB images, got {img.dtype} {img.shape}")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    out = REGISTRY[name](np.ascontiguousarray(img), int(level), rng)
    assert out.shape == img.shape and out.dtype == np.uint8, name
    return out


def ordered(dists: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """Distortions sorted into pipeline order (stable for equal stages)."""
    return sorted(dists, key=lambda d: STAGE[category_of(d[0])])


def apply_many(img: np.ndarray, dists: list[tuple[str, int]], rng: np.random.Generator | int) -> np.ndarray:
    """Apply several ``(name, level)`` distortions in pipeline order."""
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    for name, level in ordered(dists):
        img = apply(img, name, level, rng)
    return img


def compatible(a: str, b: str) -> bool:
    """Whether distortions ``a`` and ``b`` may share an image (different, non-cancelling categories)."""
    ca, cb = category_of(a), category_of(b)
    return ca != cb and frozenset((ca, cb)) not in INCOMPATIBLE


def sample_distortion(rng: np.random.Generator, categories: list[str] | None = None) -> str:
    """A distortion id: category uniform first, then function uniform, so each category is equally likely."""
    cats = categories or CATEGORIES.ids
    cat = cats[int(rng.integers(len(cats)))]
    names = [d.id for d in DISTORTIONS if d.category == cat]
    return names[int(rng.integers(len(names)))]


def sample_pair(rng: np.random.Generator) -> tuple[str, str]:
    """Two compatible distortion ids."""
    first = sample_distortion(rng)
    cats = [c for c in CATEGORIES.ids if c != category_of(first)
            and frozenset((c, category_of(first))) not in INCOMPATIBLE]
    return first, sample_distortion(rng, cats)


def effective_severity(levels: list[int]) -> int:
    """The rating rule's severity of an image: the worst level, plus one if a second one is obvious or worse.

    Clean images have 0.
    """
    if not levels:
        return 0
    s = sorted(levels, reverse=True)
    return min(5, s[0] + (1 if len(s) > 1 and s[1] >= 3 else 0))


# effective severity -> rating: clean excellent, slight good, moderate fair, obvious or serious poor,
# catastrophic bad. (With uniform severities and 30% two-distortion images this gives roughly
# 5/15/15/35/30% excellent/good/fair/poor/bad; mapping serious to bad too made almost half "bad".)
RATING_OF_SEVERITY = {0: "excellent", 1: "good", 2: "fair", 3: "poor", 4: "poor", 5: "bad"}


def rating_for(levels: list[int]) -> str:
    """The written rule from distortion severities to a rating id (see ``RATING_OF_SEVERITY``)."""
    return RATING_OF_SEVERITY[effective_severity(levels)]


__all__ = ["REGISTRY", "LADDERS", "STAGE", "INCOMPATIBLE", "RATING_OF_SEVERITY", "apply", "apply_many",
           "compatible", "effective_severity", "ordered", "param", "rating_for", "sample_distortion",
           "sample_pair"]
