"""Template wording of forgery answers from ground truth (the offline ``template`` labeller).

``region_facts`` turns a binary mask into the facts an answer states (3x3 grid location, relative
area, bounding box); ``answer`` words a sample's ``meta`` as a ``forgery.detect`` answer that follows
the convention of ``prompts.templates``:

* the first verdict word is the verdict (the other verdict word never appears before it);
* then the manipulation, then each region (location, area, box) followed by its own ``MASK_TOKEN``,
  in the order of ``Sample.masks``;
* then the evidence: the cue ids the synthesis really produced, in ``prompts.CUES`` wording;
* authentic answers hold no mask token and give reasons for authenticity.

Every variant is read back by ``prompts.parsing`` (``parse_verdict``, ``parse_locations``,
``parse_manipulation``, ``count_mask_tokens``) to the ground truth; the tests check that.
"""

from __future__ import annotations

import random
from typing import Any

import cv2
import numpy as np

from loupe_vlm.prompts import CUES, DOMAINS, LOCATIONS, MANIPULATIONS, MASK_TOKEN

# Bump when any wording below changes; recorded as meta["labeller"] = "template@<version>".
FORGERY_TEXT_VERSION = "3"
LABELLER_ID = f"template@{FORGERY_TEXT_VERSION}"

_GRID_IDS = [t.id for t in LOCATIONS]  # row-major 3x3
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}

# Both verdicts share the openers' first words, so an answer commits to its verdict at the verdict word
# itself: that word's probability (what Loupe reports as P(tampered)) then carries the model's whole
# belief. With openers that committed earlier ("Yes, ..." / "This image appears ...") it was always ~0 or
# ~1, and the model's confidence said nothing (template@2).
_TAMPERED_OPENERS = (
    "This image is tampered.",
    "This image is manipulated.",
    "The image is edited.",
    "The image is tampered.",
)
_AUTHENTIC_OPENERS = (
    "This image is authentic.",
    "This image is original.",
    "The image is unedited.",
    "The image is authentic.",
)
# Manipulation sentence; {m} is a MANIPULATIONS phrasing, {d} a DOMAINS phrasing.
_MANIP_SENTENCES = (
    "The change is {m}, typical of {d}.",
    "It shows {m}, the kind of change made with {d}.",
    "The manipulation is {m} ({d}).",
)
_UNKNOWN_MANIP = "The kind of change is not certain, but where it was made is clear."
_EVIDENCE_SENTENCES = (
    "The evidence: {c}.",
    "It gives itself away through {c}.",
    "Signs of this: {c}.",
)
_AUTHENTIC_REASONS = (
    "It shows {c}; shadows and perspective agree across the scene, and no seam, repeated patch or "
    "smeared fill stands out.",
    "There is {c}, and nothing looks pasted, moved or filled in.",
    "Everything points to a single, untouched capture: {c}.",
)
_POST_WORDS = {
    "jpeg": lambda r: f"re-saved as JPEG at quality {r.get('quality')}",
    "resize": lambda r: "resized",
    "blur": lambda r: "slightly blurred",
    "noise": lambda r: "given fine noise",
}


def location_of(mask: np.ndarray) -> str:
    """The 3x3 grid location id (``prompts.LOCATIONS``) of a mask's centroid."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("an empty mask has no location")
    h, w = mask.shape[:2]
    col = min(2, int(3 * (xs.mean() + 0.5) / w))
    row = min(2, int(3 * (ys.mean() + 0.5) / h))
    return _GRID_IDS[row * 3 + col]


def region_facts(mask: np.ndarray) -> dict[str, Any]:
    """``{"location", "area", "bbox"}`` of a binary mask: grid cell, fraction of the image, [x0, y0, x1, y1).

    ``bbox`` is in pixels with x1, y1 exclusive (Python slice convention).
    """
    m8 = (mask > 127 if mask.dtype == np.uint8 else mask.astype(bool)).view(np.uint8)
    mom = cv2.moments(m8, binaryImage=True)
    if mom["m00"] == 0:
        raise ValueError("an empty mask has no facts")
    x, y, bw, bh = cv2.boundingRect(m8)
    h, w = m8.shape
    col = min(2, int(3 * (mom["m10"] / mom["m00"] + 0.5) / w))
    row = min(2, int(3 * (mom["m01"] / mom["m00"] + 0.5) / h))
    return {"location": _GRID_IDS[row * 3 + col], "area": round(mom["m00"] / m8.size, 5),
            "bbox": [x, y, x + bw, y + bh]}


def _pct(x: float) -> str:
    p = 100.0 * x
    return "under 1%" if p < 1 else f"about {p:.0f}%"


# How the k-th region of a detailed answer states its area and box: each region its own wording, so an
# answer with several regions (the builders make up to 2; these cover 4) does not repeat a run of words
# (issue 15's no-repeated-4-gram target).
_REGION_DETAILS = (
    ", covering {a} of the image (from {x0}% to {x1}% across and {y0}% to {y1}% down)",
    ", spanning {x0}-{x1}% horizontally and {y0}-{y1}% vertically, {a} in all",
    ", taking up {a}, between {x0} and {x1}% of the width and {y0} and {y1}% of the height",
    ", {x0}-{x1}% along the width and {y0}-{y1}% along the height ({a} of it)",
)
_ORDINALS = ("one", "another", "a third", "a fourth", "a fifth", "a sixth")


def _box_numbers(bbox: list[int], size: tuple[int, int]) -> dict[str, str]:
    w, h = size
    x0, y0, x1, y1 = bbox
    return {"x0": f"{100 * x0 / w:.0f}", "x1": f"{100 * x1 / w:.0f}", "y0": f"{100 * y0 / h:.0f}",
            "y1": f"{100 * y1 / h:.0f}"}


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _where(region: dict[str, Any], rng: random.Random, prep: bool, used: set[str] | None = None) -> str:
    """'the top-left', or with ``prep`` 'in the top-left' / 'on the right side'. With ``used`` (the
    phrasings an answer has said), a second region at the same place gets the other phrasing, and a
    third one "near the ..."."""
    options = LOCATIONS[region["location"]].phrasings
    left = [p for p in options if used is None or p not in used]
    phrase = rng.choice(left or options)
    if used is not None:
        used.add(phrase)
    if not left:
        return "near the " + phrase
    if not prep:
        return "the " + phrase
    return ("on the " if phrase.endswith("side") else "in the ") + phrase


def _region_clause(region: dict[str, Any], size: tuple[int, int] | None, detail: bool, rng: random.Random,
                   prep: bool = True, k: int = 0, used: set[str] | None = None) -> str:
    """'in the top-left, covering about 7% of the image (from ... ) <|mask|>'; ``k`` numbers the regions of
    one answer and picks each one's wording of area and box; ``used`` as in ``_where``."""
    text = _where(region, rng, prep, used)
    if detail:
        if size is not None:
            text += _REGION_DETAILS[k % len(_REGION_DETAILS)].format(a=_pct(region["area"]),
                                                                     **_box_numbers(region["bbox"], size))
        else:
            text += (", covering {a} of the image", ", {a} in area")[k % 2].format(a=_pct(region["area"]))
    return f"{text} {MASK_TOKEN}"


def _post_clause(post: list[dict[str, Any]]) -> str:
    words = [_POST_WORDS[p["op"]](p) for p in post if p.get("op") in _POST_WORDS]
    if not words:
        return ""
    return f" The whole picture was later {_join(words)}, which weakens these traces."


def answer(meta: dict[str, Any], detail: bool, rng: random.Random, size: tuple[int, int] | None = None) -> str:
    """A ``forgery.detect`` answer worded from ``meta`` (see the module docstring).

    ``size`` (width, height) lets detailed answers state each region's box as fractions of the image.
    """
    if not meta.get("tampered"):
        return _authentic(meta, detail, rng)
    regions = meta.get("regions") or []
    if not regions:
        raise ValueError("a tampered sample needs at least one region")
    manip = meta.get("manipulation")
    opener = rng.choice(_TAMPERED_OPENERS)
    m_text = rng.choice(MANIPULATIONS[manip].phrasings) if manip else None
    if not detail:
        what = m_text[0].upper() + m_text[1:] if m_text else "An altered region"
        if len(regions) == 1:
            return f"{opener} {what} is visible {_region_clause(regions[0], None, False, rng)}."
        said: set[str] = set()
        places = _join([_region_clause(r, None, False, rng, prep=False, used=said) for r in regions])
        return f"{opener} {what} is visible in {_NUMBER_WORDS.get(len(regions), str(len(regions)))} places: {places}."
    parts = [opener]
    if manip:
        domain = meta.get("domain")
        d_text = rng.choice(DOMAINS[domain].phrasings) if domain else "photo editing"
        parts.append(rng.choice(_MANIP_SENTENCES).format(m=m_text, d=d_text))
    else:
        parts.append(_UNKNOWN_MANIP)
    if len(regions) == 1:
        parts.append(f"The altered area is {_region_clause(regions[0], size, True, rng)}.")
    else:
        n = _NUMBER_WORDS.get(len(regions), str(len(regions)))
        said = set()
        clauses = [f"{_ORDINALS[min(k, len(_ORDINALS) - 1)]} {_region_clause(r, size, True, rng, k=k, used=said)}"
                   for k, r in enumerate(regions)]
        parts.append(f"There are {n} altered areas: " + "; ".join(clauses[:-1]) + "; and " + clauses[-1] + ".")
    cues = [c for c in meta.get("cues") or [] if c in CUES and c != "consistent"]
    if cues:
        parts.append(rng.choice(_EVIDENCE_SENTENCES).format(c=_join([rng.choice(CUES[c].phrasings) for c in cues])))
    return " ".join(parts) + _post_clause(meta.get("post") or [])


def _authentic(meta: dict[str, Any], detail: bool, rng: random.Random) -> str:
    opener = rng.choice(_AUTHENTIC_OPENERS)
    consistent = rng.choice(CUES["consistent"].phrasings)
    if not detail:
        return f"{opener} It shows {consistent}."
    text = f"{opener} " + rng.choice(_AUTHENTIC_REASONS).format(c=consistent)
    if any(p.get("op") == "jpeg" for p in meta.get("post") or []):
        text += " Its compression traces are uniform across the frame."
    post = [p for p in meta.get("post") or [] if p.get("op") != "jpeg"]
    if post:
        text += f" It was {_join([_POST_WORDS[p['op']](p) for p in post if p.get('op') in _POST_WORDS])} as a whole."
    return text
