"""Verdict-consistent decoding: the verdict word written is the one P(tampered) reports."""

from __future__ import annotations

import math

import torch

from loupe_vlm.assistant import inference
from loupe_vlm.assistant.consistency import VerdictProcessor
from loupe_vlm.assistant.inference import Request
from loupe_vlm.prompts.parsing import parse_verdict
from tests.helpers import ASSETS

TAMPERED, AUTHENTIC = [10, 11, 12], [20, 21]


def _scores(values: dict[int, float], vocab: int = 32) -> torch.Tensor:
    s = torch.full((vocab,), -20.0)
    for tok, p in values.items():
        s[tok] = math.log(p)
    return s


def test_the_pick_moves_to_the_verdict_with_the_larger_sum_and_only_there():
    # "authentic" alone (0.36) beats each tampered phrasing (0.22, 0.20, 0.18), but together they are 0.60
    split = _scores({20: 0.36, 21: 0.04, 10: 0.22, 11: 0.20, 12: 0.18})
    clear = _scores({20: 0.70, 10: 0.30})  # the pick is in the winning group already
    other = _scores({5: 0.9, 20: 0.1})  # the pick is not a verdict word
    scores = torch.stack([split, split, clear, other])
    proc = VerdictProcessor([TAMPERED, AUTHENTIC], torch.tensor([True, False, True, True]))
    ids = torch.ones(4, 3, dtype=torch.long)
    out = proc(ids, scores)
    assert out.argmax(-1).tolist() == [10, 20, 20, 5]  # row 1 is not a verdict row: left alone
    assert torch.equal(out[1:], scores[1:]) and (out[0] != scores[0]).nonzero().flatten().tolist() == [10]
    assert proc.moved == [(0, 20, 10)]
    # once a verdict word is in the answer, later steps are free, even with the same split scores
    later = proc(torch.tensor([[1, 1, 1, 10], [1, 1, 1, 1], [1, 1, 1, 20], [1, 1, 1, 5]]), scores)
    assert later.argmax(-1).tolist() == [20, 20, 20, 5]
    # the verdict the Assistant reads from the same scores agrees with the moved pick
    p = torch.softmax(split[TAMPERED + AUTHENTIC], 0)
    assert float(p[:3].sum()) > 0.5


def test_a_tie_goes_to_the_first_group_as_p_tampered_at_one_half_does():
    tie = _scores({20: 0.5, 10: 0.25, 11: 0.25})
    out = VerdictProcessor([TAMPERED, AUTHENTIC], torch.tensor([True]))(torch.ones(1, 2, dtype=torch.long),
                                                                       tie.unsqueeze(0))
    assert int(out.argmax()) in TAMPERED


def test_the_assistant_marks_forgery_rows_and_its_text_agrees_with_its_result(tiny_assistant, monkeypatch):
    made = []

    class Recording(VerdictProcessor):
        def __init__(self, groups, rows):
            super().__init__(groups, rows)
            made.append(self)

    monkeypatch.setattr(inference, "VerdictProcessor", Recording)
    out = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"]),
                              Request("quality.assess", [ASSETS / "noisy.png"], ["A"]),
                              Request("forgery.detect", [ASSETS / "clean.png"], ["A"])])
    assert len(made) == 1 and made[0].rows.tolist() == [True, False, True]
    assert made[0].groups[0] == tiny_assistant.verdicts.groups["tampered"]
    for r in (out[0], out[2]):
        assert parse_verdict(r.text) == ("tampered" if r.forgery.tampered else "authentic"), r.text
    # a batch without verdict rows gets no processor
    tiny_assistant.run([Request("quality.assess", [ASSETS / "noisy.png"], ["A"])])
    assert len(made) == 1
