"""Read taxonomy terms back out of answer text.

These parsers serve *checks* (evaluation of explanation consistency, filtering of labeller
replies) and the text fields of results. They never produce numbers: scores and probabilities come
from the model's token probabilities (see ``assistant.inference``).

Matching is on whole words, case-insensitive, longest phrasing first, so "motion blur" is read as
the distortion ``blur_motion`` and not also as the bare category ``blur``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .taxonomy import CATEGORIES, DISTORTIONS, LOCATIONS, MANIPULATIONS, RATINGS, SEVERITIES, VERDICTS, Vocabulary
from .tokens import MASK_TOKEN


@dataclass
class Mention:
    """A taxonomy term found in text, with its character span."""

    vocabulary: str
    id: str
    start: int
    end: int


def _pattern(phrase: str) -> str:
    return r"(?<![\w-])" + re.escape(phrase.lower()) + r"(?![\w-])"


_COMPILED: dict[int, tuple[Vocabulary, list[tuple[str, str, re.Pattern]]]] = {}


def _phrases(vocab: Vocabulary) -> list[tuple[str, str, re.Pattern]]:
    """(lower-case phrase, term id, compiled pattern), longest phrase first; compiled once per vocabulary
    (data builders parse every generated text, so this runs hundreds of thousands of times)."""
    hit = _COMPILED.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        phrases = sorted(((p, t.id) for t in vocab for p in t.phrasings), key=lambda x: -len(x[0]))
        hit = _COMPILED[id(vocab)] = (vocab, [(p.lower(), i, re.compile(_pattern(p))) for p, i in phrases])
    return hit[1]


def find_terms(text: str, vocab: Vocabulary, taken: list[tuple[int, int]] | None = None) -> list[Mention]:
    """All non-overlapping mentions of a vocabulary's phrasings, longest phrasing first, in text order."""
    low = text.lower()
    taken = list(taken or [])
    found: list[Mention] = []
    for phrase, term_id, pattern in _phrases(vocab):
        if phrase not in low:  # cheap test first: most phrasings are absent from any one text
            continue
        for m in pattern.finditer(low):
            span = (m.start(), m.end())
            if any(span[0] < e and s < span[1] for s, e in taken):
                continue
            taken.append(span)
            found.append(Mention(vocab.name, term_id, *span))
    return sorted(found, key=lambda m: m.start)


def parse_distortions(text: str) -> list[dict]:
    """Distortions named in text: ``[{"name", "category", "severity"}]`` in order of mention.

    ``name`` is the function id when the text names one, else None. ``severity`` is the severity
    word within the three words before the mention, else None. A category is reported once.
    """
    funcs = find_terms(text, DISTORTIONS)
    cats = find_terms(text, CATEGORIES, taken=[(m.start, m.end) for m in funcs])
    severities = find_terms(text, SEVERITIES)
    out: list[dict] = []
    seen: set[str] = set()
    for m in sorted(funcs + cats, key=lambda m: m.start):
        if m.vocabulary == "distortion":
            name, category = m.id, DISTORTIONS[m.id].category
        else:
            name, category = None, m.id
        if category in seen:
            continue
        seen.add(category)
        sev = None
        for s in severities:
            gap = text[s.end:m.start]
            if s.end <= m.start and len(gap.split()) <= 3 and not re.search(r"[.;,]", gap):
                sev = s.id
        out.append({"name": name, "category": category, "severity": sev})
    return out


CLEAN_STATEMENT = re.compile(r"(?<![\w-])(no (visible )?distortions?|free of (any )?(visible )?distortions?)(?![\w-])",
                             re.IGNORECASE)
"""How an answer says that an image is clean: the builders' wordings ("shows no visible distortion", "no
distortion can be seen", "is free of visible distortion") and their near variants."""


def states_clean(text: str) -> bool:
    """Whether the text says the image shows no distortion. Naming no taxonomy distortion is not enough:
    "the image shows moderate tonal range" names none that the parser knows, yet claims one."""
    return CLEAN_STATEMENT.search(text) is not None


def parse_rating(text: str) -> str | None:
    """The overall rating: the last rating word in the text (the assess convention)."""
    mentions = find_terms(text, RATINGS)
    return mentions[-1].id if mentions else None


def parse_verdict(text: str) -> str | None:
    """The forgery verdict: the first verdict word in the text."""
    mentions = find_terms(text, VERDICTS)
    return mentions[0].id if mentions else None


def parse_better(text: str) -> str | None:
    """The better image of a comparison: the first standalone 'A' or 'B'."""
    m = re.search(r"(?<![\w-])(A|B)(?![\w-])", text)
    return m.group(1) if m else None


def parse_manipulation(text: str) -> str | None:
    mentions = find_terms(text, MANIPULATIONS)
    return mentions[0].id if mentions else None


def parse_locations(text: str) -> list[str]:
    """Grid locations named in the text, in order (duplicates kept: one per region mention)."""
    return [m.id for m in find_terms(text, LOCATIONS)]


def count_mask_tokens(text: str) -> int:
    return text.count(MASK_TOKEN)


def strip_mask_tokens(text: str) -> str:
    """Text for display: mask tokens removed and the spacing they leave tidied."""
    text = text.replace(MASK_TOKEN, "")
    text = re.sub(r"[ \t]+([.,;:])", r"\1", text)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def repeated_ngram(text: str, n: int = 4) -> tuple[str, ...] | None:
    """The first run of ``n`` words that occurs twice in ``text``, or None. Words are compared lower-cased,
    without the punctuation around them and without mask tokens ("Image A is better ... so image A is
    better." repeats one)."""
    words = [w.strip(".,;:!?()\"'").lower() for w in text.replace(MASK_TOKEN, " ").split()]
    words = [w for w in words if w]
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(words[i:i + n])
        if gram in seen:
            return gram
        seen.add(gram)
    return None

