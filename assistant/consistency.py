"""Verdict-consistent decoding: the verdict word an answer writes is the verdict its result reports.

The Assistant reads P(tampered) at the answer's first verdict word as a softmax over every phrasing of
both verdicts, summed per verdict ("tampered", "manipulated", "edited" against "authentic", "unedited",
"original"; ``inference._KeyWords``). Greedy decoding picks the single most likely token. The two can
disagree: "authentic" alone at 0.45 beats "tampered" at 0.30 and "edited" at 0.25, so the text says
authentic while P(tampered) = 0.55 and the result says tampered (seen on ``demo/examples/jpeg.png``).

``VerdictProcessor`` removes that disagreement where it arises. At the first step of a marked row where
the greedy pick is a verdict token, it computes the same per-verdict sums from the same scores, and if
the pick belongs to the losing verdict it moves the pick to the winning verdict's most likely phrasing.
It runs after every other processor (fusion, evidence guidance), so it sees the scores the Assistant
reads; it does not record its change, so P(tampered) is read from the scores it decided on. Every other
step and row is untouched. Where the verdict is decided elsewhere (``forced``: the tampering map's
verdict, ``LoupeConfig.verdict_map``), the pick moves to that verdict's most likely phrasing instead.

Hand-written: transformers' logits processors bias or ban fixed tokens; none re-decides between groups
of tokens by their summed probability.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


class VerdictProcessor:
    """A generation logits processor for the rows in ``rows`` (B,) bool. ``groups`` are the verdicts' first
    token ids, in the Assistant's order (the first wins a tie, as ``P(tampered) >= 0.5`` does). ``forced``
    (per row, or None): the index of the group a row's verdict word must come from, None for the scores'
    choice."""

    def __init__(self, groups: Sequence[Sequence[int]], rows: torch.Tensor,
                 forced: Sequence[int | None] | None = None):
        self.groups = [list(g) for g in groups]
        if len(self.groups) < 2 or any(not g for g in self.groups):
            raise ValueError("VerdictProcessor needs at least two non-empty groups of token ids")
        self.ids = torch.tensor([i for g in self.groups for i in g], dtype=torch.long)
        self.owner = torch.tensor([k for k, g in enumerate(self.groups) for _ in g], dtype=torch.long)
        self.id_set = set(self.ids.tolist())
        self.rows = rows.bool()
        self.forced = list(forced) if forced is not None else [None] * len(rows)
        if len(self.forced) != len(rows) or any(f is not None and not 0 <= f < len(self.groups) for f in self.forced):
            raise ValueError(f"forced: one group index (0-{len(self.groups) - 1}) or None per row, got {forced!r}")
        self.done = [False] * len(rows)  # a row whose verdict word is written: the rest of its answer is free
        self.moved: list[tuple[int, int, int]] = []  # (row, token picked, token written), for tests and logs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = scores
        for b in range(scores.shape[0]):
            if not bool(self.rows[b]) or self.done[b]:
                continue
            top = int(scores[b].argmax())
            if top not in self.id_set:
                continue
            self.done[b] = True  # greedy: this step writes a verdict word, this one or the one moved to
            ids = self.ids.to(scores.device)
            if self.forced[b] is not None:
                win = self.forced[b]
            else:
                p = torch.softmax(scores[b, ids].float(), dim=0)
                sums = torch.zeros(len(self.groups), device=scores.device).index_add_(0, self.owner.to(scores.device), p)
                win = int(sums.argmax())
            if int(self.owner[(self.ids == top).nonzero()[0, 0]]) == win:
                continue
            members = ids[self.owner.to(scores.device) == win]
            best = int(members[scores[b, members].argmax()])
            if out is scores:
                out = scores.clone()
            out[b, best] = scores[b, top] + 1.0  # now the greedy pick, by a margin that survives rounding
            self.moved.append((b, top, best))
        return out


class RatingProcessor:
    """An assessment ends with its rating: for the rows in ``rows`` (B,) bool, the end tokens (``end_ids``)
    are ruled out until the answer has written one of ``rating_ids`` (the rating words' first tokens).

    The builders' assessments always close on the rating ("Overall, the image quality is excellent."), and
    the score is read at that word. Without this, a model that has seen few answers of some kind (loupe-smol
    and clean photos: 3% of its training answers) could stop after "No visible distortion can be found."
    with no rating, so no score. The answer may still run to the length cap without one: then it has none.

    Hand-written: transformers' ``MinNewTokensLengthLogitsProcessor`` holds the end back for a fixed number
    of tokens, not until a word is written.
    """

    def __init__(self, rating_ids: Sequence[int], end_ids: Sequence[int], rows: torch.Tensor):
        self.rating_ids = set(int(i) for i in rating_ids)
        self.end_ids = torch.tensor(sorted(set(int(i) for i in end_ids)), dtype=torch.long)
        if not self.rating_ids or not len(self.end_ids):
            raise ValueError("RatingProcessor needs rating token ids and end token ids")
        self.rows = rows.bool()
        self.prompt_len: int | None = None  # set at the first step: what comes after it was generated
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        out = scores
        for b in range(scores.shape[0]):
            if not bool(self.rows[b]) or self.done[b]:
                continue
            if self.prompt_len < input_ids.shape[1] and int(input_ids[b, -1]) in self.rating_ids:
                self.done[b] = True
                continue
            if out is scores:
                out = scores.clone()
            keep = self.end_ids[self.end_ids < scores.shape[-1]].to(scores.device)
            out[b, keep] = float("-inf")
        return out


class RepeatBan:
    """No run of ``n`` words twice in the answer of a row in ``rows`` (B,) bool, counted on those rows'
    generated tokens only (not the prompt, not the other rows) and never banning ``keep`` (token ids whose
    choice the result reads: rating words, A and B), so that no banned word makes the text disagree with the
    result read from the same scores.

    ``word_class`` (V,) long gives each token id a class: the ids of one word written with or without a
    leading space or capital ("The" and " the") share one, and punctuation and whitespace tokens are -1 and
    left out of the runs. So "still readable, but" and, later, "still readable but" are the same run, as
    ``loupe eval`` counts them (``prompts.parsing.repeated_ngram``). Without it each token id is its own class,
    which is transformers' ``NoRepeatNGramLogitsProcessor``'s rule. Hand-written for that reason: the library
    processor compares exact token ids.

    Used on quality answers, and on forgery answers with ``keep`` holding what those repeat by design: the
    digits, "%" and joining words of their coordinates ("from 10% to 49% across and 11% to 49% down"),
    where a ban would change a location, and the mask token, one per region."""

    def __init__(self, n: int, rows: torch.Tensor, keep: Sequence[int] = (), word_class: torch.Tensor | None = None):
        self.n = n
        self.rows = rows.bool()
        self.keep = torch.tensor(sorted(set(int(k) for k in keep)), dtype=torch.long)
        self.word_class = word_class
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        rows = self.rows.nonzero().flatten().tolist()
        if not rows or input_ids.shape[1] - self.prompt_len < self.n - 1:
            return scores
        vocab = scores.shape[-1]
        classes = (torch.arange(vocab) if self.word_class is None else self.word_class[:vocab]).to(scores.device)
        free = torch.zeros(vocab, dtype=torch.bool, device=scores.device)  # never banned
        free[self.keep[self.keep < vocab].to(scores.device)] = True
        out = scores
        for r in rows:
            gen = input_ids[r, self.prompt_len:].to(scores.device)
            seq = torch.where(gen < len(classes), classes[gen.clamp_max(len(classes) - 1)],
                              gen.new_full(gen.shape, -3))  # ids beyond the scores' width: a class of their own
            seq = seq[seq != -1]  # punctuation and spaces do not break or make a run
            if len(seq) < self.n:
                continue
            windows = seq.unfold(0, self.n - 1, 1)  # every run of n-1 words, the last one is the current
            hits = (windows[:-1] == windows[-1]).all(1).nonzero().flatten()
            banned = seq[hits + self.n - 1]
            banned = banned[banned >= 0]
            if banned.numel():
                if out is scores:
                    out = scores.clone()
                out[r, torch.isin(classes, banned) & ~free] = float("-inf")
        return out


PUNCTUATION = ".,;:!?()\"'-"
"""What ``word_classes`` reads as punctuation, that of ``prompts.parsing.repeated_ngram`` (and "-")."""


def word_classes(tokenizer: Any) -> torch.Tensor:
    """``RepeatBan``'s ``word_class`` for a tokenizer: one class per word, lower-cased and stripped of the
    spaces around it; -1 for tokens of only punctuation or whitespace. About 0.3 s for a 49k vocabulary."""
    found: dict[str, int] = {}
    out = torch.empty(len(tokenizer), dtype=torch.long)
    for i in range(len(tokenizer)):
        word = tokenizer.decode([i]).strip().lower()
        out[i] = -1 if not word.strip(PUNCTUATION) else found.setdefault(word, len(found))
    return out

