"""The ``openai`` labeller of the quality builder: ground-truth-informed wording by a GPT-class model.

It sends the sample's image(s), the question and the ground truth (as private notes) to any
OpenAI-compatible endpoint through ``OpenAILabeller`` (cache, retries, bounded concurrency), with
the prompts of ``prompts/data/quality_labeller.yaml``. A reply is kept only if ``check_text`` reads
back exactly the true distortions (with their severities), the rating or the better image, and it
neither refuses nor reveals the notes; otherwise it is counted under its reason and dropped.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from loupe_vlm import prompts
from loupe_vlm.prompts import DISTORTIONS, SEVERITIES, canonical_question

from .base import LabelJob, check_text
from .openai_client import LabellerError, OpenAILabeller, image_part

log = logging.getLogger(__name__)

PROMPT_FILE = Path(prompts.__file__).parent / "data" / "quality_labeller.yaml"
_REFUSAL = re.compile(r"\b(sorry|as an ai|i cannot|i can't)\b", re.I)  # DepictQA-Wild dropped "sorry" replies
_LEAK = re.compile(r"\b(ground[ -]truth|private notes?|the notes|i was (told|given)|provided (information|facts)|"
                   r"according to the (facts|information|notes))\b", re.I)


def load_prompts(path: Path = PROMPT_FILE) -> dict[str, Any]:
    """The labeller's prompt data (YAML)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the labeller prompts ({exc}); reinstall Loupe") from None
    for key in ("version", "system", "user", "conventions", "instructions"):
        if key not in data:
            raise ValueError(f"{path}: missing key {key!r}")
    return data


def _describe(truth, role: str) -> str:
    if truth.clean:
        return f"{role}: no visible distortion."
    items = [f'"{SEVERITIES.terms[d["severity"] - 1].text} {DISTORTIONS[d["name"]].text}"' for d in truth.distortions]
    return f"{role}: " + ", ".join(items) + "."


class OpenAIQualityLabeller:
    """``label(job) -> (text | None, reason | None)``; ``label_many`` runs jobs concurrently."""

    def __init__(self, client: OpenAILabeller, prompt_data: dict[str, Any] | None = None):
        self.client = client
        self.prompts = prompt_data or load_prompts()
        self.name = f"openai:{client.model}@prompts{self.prompts['version']}"
        self.accepted = 0
        self.rejected: Counter = Counter()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: Any) -> "OpenAIQualityLabeller":
        """Built from a ``BuildConfig``: cache in ``<out>/.labeller-cache``."""
        client = OpenAILabeller(cfg.base_url, cfg.model, cache_dir=Path(cfg.out) / ".labeller-cache",
                                max_workers=cfg.max_concurrency, seed=cfg.seed)
        return cls(client)

    # ---- request ---------------------------------------------------------------------------------
    def messages(self, job: LabelJob) -> list[dict[str, Any]]:
        """The chat request for one job: system prompt, then the images and the instructions."""
        p = self.prompts
        roles = [r for r in ("reference", "A", "B") if r in job.images]
        key = job.task if job.task not in ("quality.assess",) else f"{job.task}.{'detailed' if job.detail else 'brief'}"
        instruction = p["instructions"][key].format(rating=job.a.rating, better=job.better or "")
        facts = []
        if job.task in ("quality.rate", "quality.compare"):
            facts += [_describe(job.a, "Image A"), _describe(job.b, "Image B"), f"The better image is {job.better}."]
        else:
            facts.append(_describe(job.a, "The image"))
            if job.task == "quality.assess":
                facts.append(f"Overall quality: {job.a.rating}.")
        if job.content:
            facts.append(f"Content: {job.content}.")
        names = {"reference": "a pristine reference image", "A": "image A", "B": "image B"}
        images_note = "Images, in order: " + ", ".join(names[r] for r in roles) + "." if len(roles) > 1 else ""
        user_text = p["user"].format(images_note=images_note,
                                     question=canonical_question(job.task, job.detail, job.reference),
                                     facts="\n".join(facts), instruction=instruction.strip(),
                                     conventions=p["conventions"].strip()).strip()
        content: list[dict[str, Any]] = []
        for r in roles:
            content.append({"type": "text", "text": f"{names[r].capitalize()}:"})
            content.append(image_part(job.images[r]))
        content.append({"type": "text", "text": user_text})
        return [{"role": "system", "content": p["system"].strip()}, {"role": "user", "content": content}]

    def accept(self, job: LabelJob, text: str) -> str | None:
        """Why ``text`` is rejected, or None when it is kept."""
        if _REFUSAL.search(text):
            return "refusal"
        if _LEAK.search(text):
            return "reveals it was told"
        return check_text(job, text)

    def label(self, job: LabelJob) -> tuple[str | None, str | None]:
        try:
            text = self.client.complete(self.messages(job)).strip()
        except LabellerError as exc:
            why = f"request failed ({exc})"
            text = None
        else:
            why = self.accept(job, text)
        with self._lock:
            if why is None:
                self.accepted += 1
            else:
                self.rejected[why.split(" (")[0].split(":")[0]] += 1
        return (text, None) if why is None else (None, why)

    def label_many(self, jobs: list[LabelJob]) -> list[tuple[str | None, str | None]]:
        out = self.client.map(jobs, self.label)
        return [r if isinstance(r, tuple) else (None, f"error ({r})") for r in out]

    def stats(self) -> dict[str, Any]:
        """Counters for the card."""
        s = {"accepted (this run)": self.accepted}
        s.update({f"rejected (this run): {k}": v for k, v in sorted(self.rejected.items())})
        s.update({f"requests: {k}": v for k, v in self.client.stats.as_dict().items()})
        return s

