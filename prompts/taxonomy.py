"""The Loupe taxonomy: quality distortions, severities, ratings and forgery vocabulary.

Every entry has one canonical id (used in data and results) and a few plain-English phrasings
(used to word answers and to read them back). The first phrasing is the canonical wording used
in generated text. ``TAXONOMY_VERSION`` changes whenever an id is added, removed or renamed; a
checkpoint records the version it was trained on.

This module imports nothing from torch; data builders and the model share it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

TAXONOMY_VERSION = "1"


@dataclass(frozen=True)
class Term:
    """One vocabulary entry: a canonical id and its plain-English phrasings (first is canonical)."""

    id: str
    phrasings: tuple[str, ...]
    category: str | None = None  # for distortions: the category id they belong to
    value: int | None = None  # for severities and ratings: their numeric level

    @property
    def text(self) -> str:
        """The canonical wording."""
        return self.phrasings[0]


@dataclass(frozen=True)
class Vocabulary:
    """An ordered set of terms, looked up by id."""

    name: str
    terms: tuple[Term, ...]
    _by_id: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for term in self.terms:
            if term.id in self._by_id:
                raise ValueError(f"duplicate id {term.id!r} in vocabulary {self.name!r}")
            self._by_id[term.id] = term

    def __getitem__(self, term_id: str) -> Term:
        try:
            return self._by_id[term_id]
        except KeyError:
            raise KeyError(f"unknown {self.name} id {term_id!r}; known: {', '.join(self.ids)}") from None

    def __contains__(self, term_id: object) -> bool:
        return term_id in self._by_id

    def __iter__(self):
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self.terms)

    @property
    def ids(self) -> list[str]:
        return [t.id for t in self.terms]


def _t(term_id: str, *phrasings: str, category: str | None = None, value: int | None = None) -> Term:
    return Term(term_id, tuple(phrasings), category, value)


# --- Quality -------------------------------------------------------------------------------------

CATEGORIES = Vocabulary(
    "category",
    (
        _t("blur", "blur", "blurriness", "lack of sharpness"),
        _t("noise", "noise", "graininess", "noisy speckles"),
        _t("compression", "compression artifacts", "compression", "coding artifacts"),
        _t("brighten", "overexposure", "excessive brightness", "brightening"),
        _t("darken", "underexposure", "excessive darkness", "darkening"),
        _t("contrast_strengthen", "excessive contrast", "contrast strengthening", "harsh contrast"),
        _t("contrast_weaken", "low contrast", "contrast weakening", "washed-out contrast"),
        _t("saturate_strengthen", "oversaturation", "excessive saturation", "saturation strengthening"),
        _t("saturate_weaken", "desaturation", "faded colours", "saturation weakening"),
        _t("oversharpen", "oversharpening", "excessive sharpening", "sharpening halos"),
        _t("pixelate", "pixelation", "blocky pixels", "mosaic-like pixelation"),
        _t("quantization", "colour quantization", "colour banding", "posterization"),
    ),
)

# About 35 distortion functions, grouped by category. Ids are what datasets store.
DISTORTIONS = Vocabulary(
    "distortion",
    (
        _t("blur_gaussian", "Gaussian blur", "soft Gaussian blur", category="blur"),
        _t("blur_motion", "motion blur", "camera-shake motion blur", category="blur"),
        _t("blur_glass", "glass blur", "frosted-glass blur", category="blur"),
        _t("blur_lens", "lens blur", "defocus blur", "out-of-focus blur", category="blur"),
        _t("blur_zoom", "zoom blur", "radial zoom blur", category="blur"),
        _t("blur_jitter", "jitter blur", "pixel jitter", category="blur"),
        _t("noise_gaussian_rgb", "Gaussian noise", "colour Gaussian noise", category="noise"),
        _t("noise_gaussian_ycbcr", "luminance-chroma noise", "YCbCr Gaussian noise", category="noise"),
        _t("noise_speckle", "speckle noise", "multiplicative speckle", category="noise"),
        _t("noise_spatially_correlated", "spatially correlated noise", "blotchy correlated noise",
           category="noise"),
        _t("noise_poisson", "Poisson noise", "shot noise", category="noise"),
        _t("noise_impulse", "impulse noise", "salt-and-pepper noise", category="noise"),
        _t("noise_uniform", "uniform noise", "flat-distribution noise", category="noise"),
        _t("compression_jpeg", "JPEG compression artifacts", "JPEG blocking", category="compression"),
        _t("compression_jpeg2000", "JPEG 2000 compression artifacts", "wavelet ringing",
           category="compression"),
        _t("compression_webp", "WebP compression artifacts", "WebP smearing", category="compression"),
        _t("brighten_hsv", "brightening in value", "HSV brightening", category="brighten"),
        _t("brighten_rgb", "RGB brightening", "raised RGB levels", category="brighten"),
        _t("brighten_ycbcr", "luminance brightening", "YCbCr brightening", category="brighten"),
        _t("darken_hsv", "darkening in value", "HSV darkening", category="darken"),
        _t("darken_rgb", "RGB darkening", "lowered RGB levels", category="darken"),
        _t("darken_ycbcr", "luminance darkening", "YCbCr darkening", category="darken"),
        _t("contrast_strengthen_scurve", "S-curve contrast boost", "steep tone curve",
           category="contrast_strengthen"),
        _t("contrast_strengthen_linear", "linear contrast stretch", "clipped linear contrast",
           category="contrast_strengthen"),
        _t("contrast_weaken_scurve", "flattened tone curve", "inverse S-curve contrast loss",
           category="contrast_weaken"),
        _t("contrast_weaken_linear", "linear contrast reduction", "compressed tonal range",
           category="contrast_weaken"),
        _t("saturate_strengthen_hsv", "HSV saturation boost", "boosted colour saturation",
           category="saturate_strengthen"),
        _t("saturate_strengthen_ycbcr", "chroma boost", "YCbCr saturation boost",
           category="saturate_strengthen"),
        _t("saturate_weaken_hsv", "HSV saturation loss", "drained colour saturation",
           category="saturate_weaken"),
        _t("saturate_weaken_ycbcr", "chroma loss", "YCbCr saturation loss", category="saturate_weaken"),
        _t("oversharpen", "unsharp-mask oversharpening", "halo oversharpening", category="oversharpen"),
        _t("pixelate", "pixelation blocks", "nearest-neighbour pixelation", category="pixelate"),
        _t("quantization_otsu", "threshold quantization", "multi-level threshold quantization",
           category="quantization"),
        _t("quantization_median", "median-cut quantization", "reduced palette", category="quantization"),
        _t("quantization_uniform", "uniform quantization", "uniform colour banding", category="quantization"),
    ),
)

SEVERITIES = Vocabulary(
    "severity",
    (
        _t("slight", "slight", "minor", "mild", value=1),
        _t("moderate", "moderate", "noticeable", value=2),
        _t("obvious", "obvious", "evident", "pronounced", value=3),
        _t("serious", "serious", "severe", "heavy", value=4),
        _t("catastrophic", "catastrophic", "extreme", "overwhelming", value=5),
    ),
)

# Ratings, best first. The rating *word* is what the model writes; its probability gives the score.
RATINGS = Vocabulary(
    "rating",
    (
        _t("excellent", "excellent", value=5),
        _t("good", "good", value=4),
        _t("fair", "fair", value=3),
        _t("poor", "poor", value=2),
        _t("bad", "bad", value=1),
    ),
)

# --- Forgery -------------------------------------------------------------------------------------

VERDICTS = Vocabulary(
    "verdict",
    (
        _t("tampered", "tampered", "manipulated", "edited"),
        _t("authentic", "authentic", "unedited", "original"),
    ),
)

MANIPULATIONS = Vocabulary(
    "manipulation",
    (
        _t("splice", "splicing", "a pasted region from another image", "spliced content"),
        _t("copy_move", "copy-move", "a region copied within the same image", "cloned content"),
        _t("removal", "object removal", "inpainting", "removed content"),
        _t("aigc_edit", "generative editing", "an AI-regenerated region", "synthetic re-rendering"),
        _t("face_swap", "face swap", "a replaced face", "face replacement"),
    ),
)

DOMAINS = Vocabulary(
    "domain",
    (
        _t("photoshop", "photo editing software", "manual photo editing"),
        _t("deepfake", "deepfake face manipulation", "face forgery"),
        _t("aigc", "AI-generated content editing", "generative model editing"),
    ),
)

# Where a region lies, on a 3x3 grid of the image (row-major).
LOCATIONS = Vocabulary(
    "location",
    (
        _t("top_left", "top-left", "upper left"),
        _t("top", "top centre", "upper middle"),
        _t("top_right", "top-right", "upper right"),
        _t("left", "middle left", "left side"),
        _t("center", "centre", "middle"),
        _t("right", "middle right", "right side"),
        _t("bottom_left", "bottom-left", "lower left"),
        _t("bottom", "bottom centre", "lower middle"),
        _t("bottom_right", "bottom-right", "lower right"),
    ),
)

# Visual evidence an expert cites.
CUES = Vocabulary(
    "cue",
    (
        _t("edges", "unnatural edges around the region", "a sharp seam at the region's boundary"),
        _t("lighting", "lighting that disagrees with the rest of the scene", "inconsistent illumination"),
        _t("shadows", "missing or inconsistent shadows", "shadows that do not match"),
        _t("noise_texture", "a noise or texture pattern unlike its surroundings", "mismatched grain"),
        _t("blur_mismatch", "sharpness that differs from its surroundings", "a blur mismatch"),
        _t("duplicated", "content duplicated from elsewhere in the image", "repeated patterns"),
        _t("jpeg_grid", "compression traces misaligned with the rest", "a JPEG-grid mismatch"),
        _t("smudged", "smudged, overly smooth texture", "smeared fill texture"),
        _t("consistent", "consistent noise, lighting and edges throughout",
           "uniform sensor noise and coherent lighting"),
    ),
)

MANIPULATION_DOMAIN = {
    "splice": "photoshop",
    "copy_move": "photoshop",
    "removal": "photoshop",
    "aigc_edit": "aigc",
    "face_swap": "deepfake",
}

ALL_VOCABULARIES = (CATEGORIES, DISTORTIONS, SEVERITIES, RATINGS, VERDICTS, MANIPULATIONS, DOMAINS,
                    LOCATIONS, CUES)


def distortions_in(category: str) -> list[str]:
    """Distortion ids of one category, in taxonomy order."""
    CATEGORIES[category]  # raises on an unknown category
    return [d.id for d in DISTORTIONS if d.category == category]


def category_of(distortion: str) -> str:
    """The category id a distortion id belongs to."""
    return DISTORTIONS[distortion].category  # type: ignore[return-value]


def severity_name(level: int) -> str:
    """Severity id for a level 1..5."""
    for s in SEVERITIES:
        if s.value == level:
            return s.id
    raise ValueError(f"severity level must be 1..5, got {level}")


def rating_value(rating: str) -> int:
    """Numeric value 5 (excellent) .. 1 (bad) of a rating id."""
    return RATINGS[rating].value  # type: ignore[return-value]


def severity_mos(distortions: Sequence[dict]) -> float:
    """MOS-like quality 1..5 from true distortions: 5 - 0.8*max - 0.2*sum(others), clipped; clean = 5.
    ``loupe eval`` scores quality answers against it where a record gives distortions but no MOS."""
    levels = sorted((int(d["severity"]) for d in distortions if d.get("severity") is not None), reverse=True)
    if not levels:
        return 5.0
    return round(min(5.0, max(1.0, 5.0 - 0.8 * levels[0] - 0.2 * sum(levels[1:]))), 4)
