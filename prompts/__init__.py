"""Loupe's prompts: taxonomy, task templates, the Sample record and special-token names.

Pure Python (no torch). Everything that words or reads Loupe's texts starts here, and a checkpoint
records ``TEMPLATE_VERSION`` and ``TAXONOMY_VERSION`` so prompts travel with the weights.
"""

from .sample import Sample, SampleError, iter_jsonl, load_jsonl, save_jsonl
from .taxonomy import (
    CATEGORIES,
    CUES,
    DISTORTIONS,
    DOMAINS,
    LOCATIONS,
    MANIPULATION_DOMAIN,
    MANIPULATIONS,
    RATINGS,
    SEVERITIES,
    TAXONOMY_VERSION,
    VERDICTS,
    category_of,
    distortions_in,
    rating_value,
    severity_name,
)
from .templates import (
    TASK_IMAGES,
    TASKS,
    TEMPLATE_VERSION,
    all_vocabulary_text,
    canonical_question,
    image_roles_for,
    training_question,
    user_content,
)
from .tokens import LOWLEVEL_TOKEN, LOWLEVEL_TOKENS_PER_IMAGE, MASK_TOKEN, SPECIAL_TOKENS

__all__ = [
    "Sample", "SampleError", "iter_jsonl", "load_jsonl", "save_jsonl",
    "CATEGORIES", "CUES", "DISTORTIONS", "DOMAINS", "LOCATIONS", "MANIPULATION_DOMAIN", "MANIPULATIONS",
    "RATINGS", "SEVERITIES", "TAXONOMY_VERSION", "VERDICTS", "category_of", "distortions_in",
    "rating_value", "severity_name",
    "TASK_IMAGES", "TASKS", "TEMPLATE_VERSION", "all_vocabulary_text", "canonical_question", "image_roles_for",
    "training_question", "user_content",
    "LOWLEVEL_TOKEN", "LOWLEVEL_TOKENS_PER_IMAGE", "MASK_TOKEN", "SPECIAL_TOKENS",
]
