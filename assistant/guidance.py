"""Evidence-guided decoding: the auxiliary heads' verdicts steer which taxonomy words the LM writes.

The late-fusion bias (``ExplainableVLM.fusion_bias``) is learnt, and on the SmolLM2 builds it stays near
one logit, so the language model's prior picks the distortion name ("HSV saturation loss" in half the
answers) while the heads, read alone, name the right category three to four times as often. This
module makes the heads' verdicts a product of experts at decode time:

    score(token) += strength * log( q(token's classes) / q(most likely reading) )

applied only to tokens that start or continue a taxonomy phrasing (categories and distortion names
with the category they belong to; severity words), where ``q`` is the heads' probability of the class
the phrasing names. The words of the best-supported class are left as they are; the others are pushed
down by how much less the heads believe them; every other token is untouched, so the language model
still writes the whole answer. "Nothing visible" is a class too (``NO_DISTORTION``), with probability
1 - the largest category's: for a clean image the distortion names and the severity words are pushed
down, and for a distorted one the words that would call it clean.

Comparisons (``COMPARE_TASKS``) are guided at one word only, the verdict: until the answer has written
" A" or " B", those two tokens get ``strength * log(q / q_best)``, where q is the heads' P(A better), a
logistic of the gap between the two images' predicted worst severities (``COMPARE_SLOPE`` per level).
The heads judge each image alone, so this reading does not depend on the order the pair is shown in.

Where a question gives a reference image, the full-reference readings (``assistant/reference.py``) take the
heads' place: the category probabilities, the severity, a comparison's P(A better), and, for these rows
only, the rating words, pushed down by ``strength * log(q / q_best)`` with q the reading's probability of
each rating.

Hand-written: transformers' ``SequenceBiasLogitsProcessor`` biases token sequences the same way in
every batch row, and here the bias depends on each row's image.
"""

from __future__ import annotations

from typing import Any

import torch

from ..prompts.taxonomy import CATEGORIES, DISTORTIONS, RATINGS, SEVERITIES

DESCRIBE_TASKS = ("quality.identify", "quality.assess")
"""The tasks whose answers describe one judged image's distortions, which is what the heads see."""

COMPARE_TASKS = ("quality.compare", "quality.rate")
"""The A/B tasks: only their verdict word is guided, by the two images' predicted severities."""

GUIDED_TASKS = DESCRIBE_TASKS + COMPARE_TASKS

AB_VERDICTS = ("heads", "both_orders")
"""Where a guided comparison's verdict comes from (``LoupeConfig.ab_verdict``): the heads' two severities,
or the language model's own P(A better) averaged over the pair shown in both orders."""

COMPARE_SLOPE = 2.0
"""P(A better) = sigmoid(COMPARE_SLOPE * (severity of B - severity of A)), severities in levels 0-5: one
level of difference reads as 0.88 against 0.12."""

NO_DISTORTION = ("no visible distortion", "free of visible distortion")
"""How the builders' answers say an image is clean (data_builders/labellers/template.py): the
"nothing visible" reading, pushed down like a distortion name when the heads see a distortion."""

NO_DISTORTION_OPENINGS = ("no visible distortion", "no distortion", "free of visible distortion")
"""The clean statements whose first token is pulled up, for an image the heads call clean, until the
answer has said whether it sees a distortion: the builders' answers open their clean statements this
way ("the image shows no visible distortion", "no distortion can be seen", "is free of visible
distortion"), also at the start of a sentence ("No visible distortion can be found.")."""

CLEAN_BELOW = 0.25
"""The heads call an image clean, for the severity words and the clean statements, when no category's
probability reaches this. The category heads are separate sigmoids and cautious: on loupe-smol's
validation split 56% of the distorted images have no category above 0.5, so 1 - the largest is a poor
P(clean). Below 0.25 are 86% of the clean reference views and 21% of the images distorted at severity
>= 2 (0.20: 74% and 13%; 0.30: 92% and 28%)."""

FLOOR = -10.0
"""The most a token is pushed down, in logits (a class the heads rule out is unlikely, not impossible)."""

MAX_STRENGTH = 10.0


def guidance_problem(strength: Any) -> str | None:
    """What is wrong with a guidance strength (a number from 0, off, to ``MAX_STRENGTH``), or None."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= MAX_STRENGTH:
        return f"{strength!r} is not a number from 0 (off) to {MAX_STRENGTH:g}"
    return None


def _variants(phrase: str, sentence_start: bool = False) -> set[str]:
    """How a phrase is met inside an answer: after a space, lower or capitalised; with ``sentence_start`` also
    capitalised with no space before it, as the answer's first word is written."""
    out = {" " + phrase, " " + phrase[:1].upper() + phrase[1:]}
    return out | {phrase[:1].upper() + phrase[1:]} if sentence_start else out


class _Table:
    """Token-sequence prefixes of one group's phrasings: for each prefix (a tuple of token ids, the
    empty one included) the tokens that continue some phrasing, and which classes each may name."""

    def __init__(self, tokenizer: Any, phrasings: list[tuple[str, int]], n_classes: int,
                 sentence_start: bool = False):
        grow: dict[tuple[int, ...], dict[int, set[int]]] = {}
        for phrase, cls in phrasings:
            for text in _variants(phrase, sentence_start):
                seq = tokenizer.encode(text, add_special_tokens=False)
                for k, tok in enumerate(seq):
                    grow.setdefault(tuple(seq[:k]), {}).setdefault(tok, set()).add(cls)
        self.entries: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for prefix, nxt in grow.items():
            toks = torch.tensor(sorted(nxt))
            member = torch.zeros(len(toks), n_classes, dtype=torch.bool)
            for row, tok in enumerate(toks.tolist()):
                member[row, sorted(nxt[tok])] = True
            self.entries[prefix] = (toks, member)
        self.longest = max((len(p) for p in self.entries), default=0)

    def _values(self, prefix: tuple[int, ...], log_q: torch.Tensor, out: dict[int, float]) -> None:
        entry = self.entries.get(prefix)
        if entry is None:
            return
        toks, member = entry
        vals = log_q.unsqueeze(0).masked_fill(~member, float("-inf")).amax(1)
        for tok, v in zip(toks.tolist(), vals.tolist()):
            if v > out.get(tok, float("-inf")):
                out[tok] = v

    def opening(self, log_q: torch.Tensor) -> dict[int, float]:
        """Token -> log q for the tokens that open a phrasing (the empty prefix): the same at every step."""
        out: dict[int, float] = {}
        self._values((), log_q, out)
        return out

    def bias(self, tail: list[int], log_q: torch.Tensor, opening: dict[int, float]) -> dict[int, float]:
        """Token -> log q of the best-supported class it may name, for every prefix that ``tail`` (the
        row's last tokens) ends with, the empty one included (``opening``, this ``log_q``'s). A token
        reachable from several prefixes keeps its highest value."""
        out = dict(opening)
        for k in range(1, min(self.longest, len(tail)) + 1):
            self._values(tuple(tail[len(tail) - k:]), log_q, out)
        return out


class EvidenceGuide:
    """Built once per tokenizer; ``processor`` makes the logits processor of one ``generate`` call."""

    def __init__(self, tokenizer: Any, categories: tuple[str, ...]):
        # the verdict tokens of a comparison, as the Assistant reads them (the first token of " A" / " B")
        self.ab_ids = tuple(tokenizer.encode(" " + k, add_special_tokens=False)[0] for k in ("A", "B"))
        index = {c: i for i, c in enumerate(categories)}
        cat_phrases = [(p, index[t.id]) for t in CATEGORIES for p in t.phrasings]
        cat_phrases += [(p, index[t.category]) for t in DISTORTIONS for p in t.phrasings]
        cat_phrases += [(p, len(categories)) for p in NO_DISTORTION]  # the last class: nothing visible
        self.categories = _Table(tokenizer, cat_phrases, len(categories) + 1)
        self.severities = _Table(tokenizer, [(p, t.value - 1) for t in SEVERITIES for p in t.phrasings],
                                 len(SEVERITIES))
        self.ratings = _Table(tokenizer, [(p, k) for k, t in enumerate(RATINGS) for p in t.phrasings], len(RATINGS))
        # the first token of each way of saying "clean", and of each severity word (which opens a claim of
        # a distortion): the pull towards a clean statement lasts until the answer has written one of them
        self.clean_openers = sorted({tokenizer.encode(v, add_special_tokens=False)[0]
                                     for p in NO_DISTORTION_OPENINGS for v in _variants(p)} |
                                    {tokenizer.encode(p[:1].upper() + p[1:], add_special_tokens=False)[0]
                                     for p in NO_DISTORTION_OPENINGS})
        # the rest of each clean statement, pulled up while the answer is inside one ("no" -> "visible" ->
        # "distortion"), so that a pulled-up "no" goes on to say what it is about
        # (the clean openers include the answer's first word, "No", so its continuation is pulled up too: without
        # it a strongly pulled "No" at the start went on as "No detail is visible" or "No.")
        self.clean_phrases = _Table(tokenizer, [(p, 0) for p in NO_DISTORTION_OPENINGS], 1, sentence_start=True)
        self.claim_openers = set(self.clean_openers) | {
            tokenizer.encode(v, add_special_tokens=False)[0] for t in SEVERITIES for p in t.phrasings
            for v in _variants(p)}

    def processor(self, p_category: torch.Tensor, p_severity: torch.Tensor, strength: torch.Tensor,
                  p_a: torch.Tensor | None = None, p_rating: torch.Tensor | None = None) -> "GuideProcessor":
        """``p_category`` (B, C): each category's probability from the heads; ``p_severity`` (B, 5): a
        distribution over the severity levels; ``strength`` (B,): 0 leaves a row unguided; ``p_a`` (B,):
        for a comparison row the heads' P(A better), which guides its verdict instead (NaN elsewhere);
        ``p_rating`` (B, len(RATINGS)): the rating words' probabilities where a row's rating is guided (NaN
        elsewhere)."""
        p_category = p_category.float().clamp(1e-6, 1.0)
        top = p_category.amax(1)
        none = (1 - top).clamp_min(1e-6)
        ref = torch.maximum(top, none)  # the heads' most likely reading, "nothing visible" included
        cat = torch.cat([p_category, none.unsqueeze(1)], 1).log() - ref.log().unsqueeze(1)
        sev = p_severity.float().clamp_min(1e-6)
        # a severity word opens a claim of some distortion (the builders write "<severity> <name>"), so its
        # reading is "distorted, at this level": where the heads call the image clean (no category reaches
        # CLEAN_BELOW; above it 1 - top overstates P(clean)), every severity word is pushed down by the clean
        # margin log(none / top), and the clean statements are pulled up by as much (GuideProcessor). Without
        # this the LM escaped the pushed-down names by writing a severity word and then a made-up one
        # ("moderate tonal range") on clean photos.
        clean_margin = torch.where(top < CLEAN_BELOW, (none.log() - top.log()).clamp_min(0), torch.zeros_like(top))
        sev = sev.log() - sev.amax(1, keepdim=True).log() - clean_margin.unsqueeze(1)
        if p_a is None:
            p_a = torch.full((len(strength),), float("nan"))
        pa = p_a.float().clamp(1e-6, 1 - 1e-6)
        ab = torch.stack([pa, 1 - pa], 1).log()
        ab = ab - ab.amax(1, keepdim=True)  # NaN rows stay NaN: not comparisons
        rating = None
        if p_rating is not None and not bool(torch.isnan(p_rating).all()):
            q = p_rating.float().clamp_min(1e-6)
            rating = q.log() - q.amax(1, keepdim=True).log()  # NaN rows stay NaN: ratings not guided
        return GuideProcessor(self, cat, sev, strength.float(), ab, clean_margin, rating)


class GuideProcessor:
    """A generation logits processor (see ``EvidenceGuide``). It remembers what it added at each step,
    so that ``ExplainableVLM.generate`` returns the logits that decided (``added``)."""

    def __init__(self, guide: EvidenceGuide, log_cat: torch.Tensor, log_sev: torch.Tensor, strength: torch.Tensor,
                 log_ab: torch.Tensor, clean_margin: torch.Tensor | None = None, log_rating: torch.Tensor | None = None):
        self.guide, self.log_cat, self.log_sev, self.strength = guide, log_cat, log_sev, strength
        # (B, len(RATINGS)): log q(rating) minus the largest, for rows whose rating words are guided; NaN elsewhere
        self.log_rating = log_rating
        # (B,): log(P(nothing visible) / P(most likely category)) where that is > 0, else 0
        self.clean_margin = torch.zeros(len(strength)) if clean_margin is None else clean_margin.float()
        self.log_ab = log_ab  # (B, 2): log q(A better), log q(B better) minus the larger; NaN: not a comparison
        self.compare = ~torch.isnan(log_ab[:, 0])
        self.prompt_len: int | None = None  # set at the first step: what comes after it was generated
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, tokens, values) per step
        # the phrase openers' values do not change from step to step: one per described row and group
        self.openings = [(guide.categories.opening(log_cat[b]), guide.severities.opening(log_sev[b]),
                          guide.ratings.opening(log_rating[b]) if self._rates(b) else None)
                         if float(strength[b]) != 0.0 and not bool(self.compare[b]) else None
                         for b in range(len(strength))]
        self.width = max(guide.categories.longest, guide.severities.longest, guide.ratings.longest)

    def _rates(self, b: int) -> bool:
        """Whether row ``b``'s rating words are guided."""
        return self.log_rating is not None and not bool(torch.isnan(self.log_rating[b, 0]))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        rows, toks, vals = [], [], []
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        for b in range(input_ids.shape[0]):
            s = float(self.strength[b])
            if s == 0.0:
                continue
            if bool(self.compare[b]):
                written = input_ids[b, self.prompt_len:].tolist()
                if not any(t in self.guide.ab_ids for t in written):  # the verdict is not written yet
                    for tok, v in zip(self.guide.ab_ids, self.log_ab[b].tolist()):
                        if v < 0:
                            rows.append(b)
                            toks.append(tok)
                            vals.append(max(s * v, FLOOR))
                continue
            tail = input_ids[b, -self.width:].tolist() if self.width else []
            cat_open, sev_open, rating_open = self.openings[b]
            found = self.guide.severities.bias(tail, self.log_sev[b], sev_open)
            for tok, v in self.guide.categories.bias(tail, self.log_cat[b], cat_open).items():
                found[tok] = max(v, found.get(tok, float("-inf")))
            if rating_open is not None:
                for tok, v in self.guide.ratings.bias(tail, self.log_rating[b], rating_open).items():
                    found[tok] = max(v, found.get(tok, float("-inf")))
            for tok, v in found.items():
                if v < 0:  # the best reading's words get 0: nothing to add
                    rows.append(b)
                    toks.append(tok)
                    vals.append(max(s * v, FLOOR))
            margin = float(self.clean_margin[b])
            if margin > 0:
                pull = min(s * margin, -FLOOR)
                phrases = self.guide.clean_phrases
                for k in range(1, min(phrases.longest, len(tail)) + 1):
                    entry = phrases.entries.get(tuple(tail[len(tail) - k:]))
                    if entry is not None:
                        for tok in entry[0].tolist():
                            rows.append(b)
                            toks.append(tok)
                            vals.append(pull)
                written = input_ids[b, self.prompt_len:].tolist()
                if not any(t in self.guide.claim_openers for t in written):
                    # the heads call the image clean and the answer has not yet said whether it is: pushing
                    # the distortion words down alone let the LM, which saw few clean answers (3% of the
                    # training set), escape into made-up names; the clean statement's opening is pulled up
                    # by as much as the severity words are pushed down
                    for tok in self.guide.clean_openers:
                        rows.append(b)
                        toks.append(tok)
                        vals.append(pull)
        step = (torch.tensor(rows, dtype=torch.long), torch.tensor(toks, dtype=torch.long),
                torch.tensor(vals, dtype=torch.float32))
        self.steps.append(step)
        return self.apply(scores, step)

    @staticmethod
    def apply(scores: torch.Tensor, step: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        rows, toks, vals = step
        if rows.numel() == 0:
            return scores
        scores = scores.clone()
        keep = toks < scores.shape[-1]
        # accumulate: a token may be both pushed (a class it names) and pulled (a clean statement's)
        scores.index_put_((rows[keep].to(scores.device), toks[keep].to(scores.device)),
                          vals[keep].to(scores.device, scores.dtype), accumulate=True)
        return scores

    def added(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, T, V) from ``generate`` with each step's guidance added, as it was when deciding."""
        out = logits.clone()
        for t, step in enumerate(self.steps[:logits.shape[1]]):
            out[:, t] = self.apply(out[:, t], step)
        return out
