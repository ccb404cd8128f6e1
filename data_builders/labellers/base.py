"""The labeller interface: a ``LabelJob`` (task + ground truth) in, answer text out.

A labeller words what the generator knows; it never decides the truth. ``label`` returns the
answer text, or ``None`` when the labeller produced nothing acceptable (the builder counts and drops
that sample). ``check_text`` is the consistency check every text must pass: the distortions,
severities, rating and better image read back by ``prompts.parsing`` must equal the ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from loupe_vlm.prompts.parsing import parse_better, parse_distortions, parse_rating


@dataclass
class ImageTruth:
    """Ground truth of one image: its distortions (``name``, ``category``, ``severity`` 1..5) and rating."""

    distortions: list[dict[str, Any]]
    rating: str

    @property
    def clean(self) -> bool:
        return not self.distortions


@dataclass
class LabelJob:
    """Everything a labeller needs to word one sample.

    ``images`` holds each image by role (``reference``, ``A``, ``B``) as PNG bytes, for labellers
    that look at them; ``key`` makes template choices deterministic per sample.
    """

    task: str
    detail: bool
    reference: bool
    content: str
    a: ImageTruth
    b: ImageTruth | None = None
    better: str | None = None
    key: str = ""
    images: dict[str, bytes] = field(default_factory=dict, repr=False)


class Labeller(Protocol):
    """What the builder calls."""

    name: str

    def label(self, job: LabelJob) -> str | None:
        """Answer text for ``job``, or ``None`` when no acceptable text was produced."""
        ...


def _same_distortions(found: list[dict], truth: list[dict], check_severity: bool) -> str | None:
    want = {d["category"]: d for d in truth}
    got = {d["category"]: d for d in found}
    if set(got) != set(want):
        missing = sorted(set(want) - set(got))
        extra = sorted(set(got) - set(want))
        return f"distortion categories differ (missing {missing}, not present {extra})"
    for cat, g in got.items():
        if g["name"] is not None and g["name"] != want[cat]["name"]:
            return f"names {g['name']!r} but the image has {want[cat]['name']!r}"
        if check_severity and g["severity"] is not None:
            from loupe_vlm.prompts import severity_name
            if g["severity"] != severity_name(want[cat]["severity"]):
                return f"says {g['severity']} {cat} but the severity is {severity_name(want[cat]['severity'])}"
    return None


def check_text(job: LabelJob, text: str, require_severity: bool = True) -> str | None:
    """Why ``text`` disagrees with ``job``'s ground truth, or ``None`` when it is consistent.

    * identify / assess: every true distortion and no absent one (by category; by function when
      the text names a function), severities when given (required with ``require_severity``);
      assess: the last rating word is the rating.
    * rate / compare: the first standalone A/B is the better image; no distortion that neither
      image has; compare also names every distortion either image has.
    """
    if not text or not text.strip():
        return "empty text"
    if job.task in ("quality.identify", "quality.assess"):
        found = parse_distortions(text)
        why = _same_distortions(found, job.a.distortions, check_severity=True)
        if why:
            return why
        if require_severity and any(f["severity"] is None for f in found):
            return "a distortion is named without its severity word"
        if job.task == "quality.assess" and parse_rating(text) != job.a.rating:
            return f"overall rating read as {parse_rating(text)!r}, expected {job.a.rating!r}"
        return None
    if job.task in ("quality.rate", "quality.compare"):
        if parse_better(text) != job.better:
            return f"better image read as {parse_better(text)!r}, expected {job.better!r}"
        both = job.a.distortions + (job.b.distortions if job.b else [])
        named = {d["category"]: d["name"] for d in both}
        for f in parse_distortions(text):
            if f["category"] not in named:
                return f"mentions {f['category']}, which neither image has"
            if f["name"] is not None and f["name"] not in {d["name"] for d in both}:
                return f"names {f['name']!r}, which neither image has"
        if job.task == "quality.compare":
            missing = set(named) - {f["category"] for f in parse_distortions(text)}
            if missing:
                return f"the comparison leaves out {sorted(missing)}"
        return None
    return f"unknown task {job.task!r}"
