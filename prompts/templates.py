"""Task templates: the questions Loupe is asked, and the answer conventions its texts follow.

Each task of DESIGN.md has question variants keyed by ``detail`` (brief/detailed) and whether a
reference image is given. Every variant lists several paraphrases: the first is the canonical
prompt used at inference, the rest add variety to training data.

Answer conventions (data builders write them, the assistant reads probabilities at them):

* ``quality.assess``: the *last* rating word (excellent/good/fair/poor/bad) in the answer is the
  overall rating; rating words appear nowhere else in the answer.
* ``quality.identify``: names the distortion(s) with a severity word right before each.
* ``quality.rate`` / ``quality.compare``: the answer opens with the verdict; the first standalone
  ``A`` or ``B`` is the better image.
* ``forgery.detect``: the first verdict word (tampered/authentic) is the verdict; then where and
  why; then one mask token per tampered region.

``TEMPLATE_VERSION`` changes whenever a question or a convention changes.
"""

from __future__ import annotations

import random
from typing import Any

TEMPLATE_VERSION = "1"

TASKS = ("quality.identify", "quality.assess", "quality.rate", "quality.compare", "forgery.detect")

# Roles an image can play, in the order they are shown to the model.
IMAGE_ROLES = ("reference", "A", "B")

# task -> images it needs (without the optional reference)
TASK_IMAGES = {
    "quality.identify": ("A",),
    "quality.assess": ("A",),
    "quality.rate": ("A", "B"),
    "quality.compare": ("A", "B"),
    "forgery.detect": ("A",),
}
TASKS_WITH_REFERENCE = ("quality.identify", "quality.assess", "quality.rate", "quality.compare")

_ROLE_LABEL = {"reference": "Reference image:", "A": "Image A:", "B": "Image B:"}

# task -> (detail, reference) -> paraphrases; the first one is canonical.
QUESTIONS: dict[str, dict[tuple[str, bool], list[str]]] = {
    "quality.identify": {
        ("brief", False): [
            "What distortions does this image have?",
            "Which distortions can you see in this image?",
            "Name the distortions that degrade this image.",
            "Identify the types of degradation in this picture.",
        ],
        ("brief", True): [
            "Compared with the reference, what distortions does the image have?",
            "Using the reference image, name the distortions in the image.",
            "Which distortions separate the image from its reference?",
        ],
    },
    "quality.assess": {
        ("brief", False): [
            "How is the quality of this image?",
            "Briefly rate the quality of this image.",
            "What is the overall quality of this picture?",
            "Give a short quality assessment of this image.",
        ],
        ("detailed", False): [
            "Assess the quality of this image in detail: its content, its distortions and their effect, "
            "and an overall rating.",
            "Describe the quality of this image in detail and give an overall rating.",
            "Evaluate this picture's quality thoroughly, explaining each distortion.",
            "Please give a detailed quality report of this image.",
        ],
        ("brief", True): [
            "Compared with the reference, how is the quality of the image?",
            "Using the reference image, briefly rate the image's quality.",
            "Given the reference, what is the overall quality of the image?",
        ],
        ("detailed", True): [
            "Compared with the reference, assess the quality of the image in detail: its content, its "
            "distortions and their effect, and an overall rating.",
            "Using the reference image, describe the image's quality in detail and give a rating.",
            "With the reference as pristine, evaluate the image's quality thoroughly.",
        ],
    },
    "quality.rate": {
        ("brief", False): [
            "Which image has better quality, A or B?",
            "Between image A and image B, which one looks better?",
            "Pick the image with higher quality: A or B?",
        ],
        ("brief", True): [
            "Compared with the reference, which image has better quality, A or B?",
            "Which of A and B is closer in quality to the reference?",
            "Given the reference, pick the better image: A or B?",
        ],
    },
    "quality.compare": {
        ("detailed", False): [
            "Which image has better quality, A or B? Explain why in detail.",
            "Compare the quality of image A and image B in detail and say which is better.",
            "Explain the quality differences between A and B, then name the better image.",
        ],
        ("detailed", True): [
            "Compared with the reference, which image has better quality, A or B? Explain why in detail.",
            "Using the reference, compare images A and B in detail and say which is better.",
            "With the reference as pristine, explain how A and B differ in quality and pick the better.",
        ],
    },
    "forgery.detect": {
        ("brief", False): [
            "Has this image been tampered with? If so, where?",
            "Is this image authentic or manipulated? Mark any edited region.",
            "Check this picture for tampering and locate any edited region.",
        ],
        ("detailed", False): [
            "Has this image been tampered with? If so, where, and on what evidence? Explain in detail.",
            "Examine this image for manipulation: give a verdict, the edited regions and the evidence.",
            "Is this picture authentic? Explain your judgement and locate any tampered region.",
        ],
    },
}


def _variants(task: str) -> dict[tuple[str, bool], list[str]]:
    if task not in QUESTIONS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return QUESTIONS[task]


def variant_key(task: str, detail: bool, reference: bool) -> tuple[str, bool]:
    """The (detail, reference) key for a task, falling back to the variant the task has.

    ``quality.compare`` is detailed by nature and ``quality.rate`` brief; forgery has no reference.
    """
    variants = _variants(task)
    want = ("detailed" if detail else "brief", reference)
    if want in variants:
        return want
    for key in variants:
        if key[1] == reference:
            return key
    raise ValueError(f"task {task!r} does not take a reference image")


def canonical_question(task: str, detail: bool = False, reference: bool = False) -> str:
    """The one prompt used at inference for this task variant."""
    return _variants(task)[variant_key(task, detail, reference)][0]


def training_question(task: str, detail: bool, reference: bool, rng: random.Random) -> str:
    """A paraphrase chosen by ``rng``, for variety in training data."""
    return rng.choice(_variants(task)[variant_key(task, detail, reference)])


def image_roles_for(task: str, reference: bool = False) -> list[str]:
    """The ordered roles of a task's images (reference first when present)."""
    if task not in TASK_IMAGES:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if reference and task not in TASKS_WITH_REFERENCE:
        raise ValueError(f"task {task!r} does not take a reference image")
    return (["reference"] if reference else []) + list(TASK_IMAGES[task])


def user_content(image_roles: list[str], question: str) -> list[dict[str, Any]]:
    """The user turn's content parts: each image (labelled when there are several), then the question."""
    parts: list[dict[str, Any]] = []
    labelled = len(image_roles) > 1
    for role in image_roles:
        if role not in IMAGE_ROLES:
            raise ValueError(f"unknown image role {role!r}; known: {', '.join(IMAGE_ROLES)}")
        if labelled:
            parts.append({"type": "text", "text": _ROLE_LABEL[role]})
        parts.append({"type": "image"})
    parts.append({"type": "text", "text": question})
    return parts


def all_questions() -> list[tuple[str, tuple[str, bool], str]]:
    """Every (task, variant, question) triple, for tests and tokenizer corpora."""
    return [(task, key, q) for task, variants in QUESTIONS.items() for key, qs in variants.items() for q in qs]


def all_vocabulary_text() -> str:
    """Every question, role label and taxonomy phrasing, as one text (for tokenizer corpora)."""
    from .taxonomy import ALL_VOCABULARIES

    lines = [q for _, _, q in all_questions()] + list(_ROLE_LABEL.values())
    for vocab in ALL_VOCABULARIES:
        for term in vocab:
            lines += [p for p in term.phrasings] + [" ".join(term.phrasings)]
    lines += ["Image A is better. Image B is better. A B", "The quality is excellent good fair poor bad."]
    return "\n".join(lines)
