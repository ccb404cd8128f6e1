"""Verdict-consistent decoding: the verdict word written is the one P(tampered) reports."""

from __future__ import annotations

import math

import pytest
import torch

from loupe_vlm.assistant import inference
from loupe_vlm.assistant.consistency import RatingProcessor, RepeatBan, VerdictProcessor
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


def _recorded(monkeypatch, name: str) -> list:
    """The instances of ``inference.<name>`` (a processor class) that the Assistant makes from now on."""
    made: list = []
    base = getattr(inference, name)

    class Recording(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(inference, name, Recording)
    return made


def test_the_assistant_marks_forgery_rows_and_its_text_agrees_with_its_result(tiny_assistant, monkeypatch):
    made = _recorded(monkeypatch, "VerdictProcessor")
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


RATING, END = [7, 8], [2, 3]


def test_an_assessment_cannot_end_before_its_rating_word():
    ends_now = _scores({2: 0.9, 5: 0.1})  # the model would stop here
    scores = torch.stack([ends_now, ends_now])
    proc = RatingProcessor(RATING, END, torch.tensor([True, False]))
    prompt = torch.ones(2, 4, dtype=torch.long)
    out = proc(prompt, scores)
    assert out.argmax(-1).tolist() == [5, 2]  # row 1 is not an assessment: left alone
    assert out[0, 2] == float("-inf") and out[0, 3] == float("-inf") and torch.equal(out[1], scores[1])
    # still held back while no rating word has been written ...
    out = proc(torch.cat([prompt, torch.tensor([[5], [5]])], 1), scores)
    assert out[0, 2] == float("-inf")
    # ... and free once one has
    out = proc(torch.cat([prompt, torch.tensor([[5, 8], [5, 5]])], 1), scores)
    assert torch.equal(out, scores)
    with pytest.raises(ValueError):
        RatingProcessor([], END, torch.tensor([True]))


def test_the_assistant_holds_back_the_end_of_assess_rows_only(tiny_assistant, monkeypatch):
    made = _recorded(monkeypatch, "RatingProcessor")
    tiny_assistant.run([Request("quality.assess", [ASSETS / "noisy.png"], ["A"]),
                        Request("quality.identify", [ASSETS / "noisy.png"], ["A"])])
    assert len(made) == 1 and made[0].rows.tolist() == [True, False]
    assert made[0].rating_ids == set(tiny_assistant.ratings.all_ids)
    assert set(made[0].end_ids.tolist()) == tiny_assistant.eos_ids
    tiny_assistant.run([Request("quality.identify", [ASSETS / "noisy.png"], ["A"])])
    assert len(made) == 1  # no assessment in the batch: no processor


def test_a_quality_answer_never_repeats_a_run_of_tokens_but_keeps_its_key_words_free():
    scores = torch.zeros(2, 32)
    proc = RepeatBan(3, torch.tensor([True, False]), keep=[7])
    prompt = torch.tensor([[4, 5, 6, 9], [4, 5, 6, 9]])  # "4 5 6" in the prompt does not count
    assert torch.equal(proc(prompt, scores), scores)
    # the answer wrote 4 5 6 ... 4 5: a second "6" would repeat "4 5 6"; row 1 is not a quality row
    ids = torch.cat([prompt, torch.tensor([[4, 5, 6, 1, 4, 5], [4, 5, 6, 1, 4, 5]])], 1)
    out = proc(ids, scores)
    assert out[0, 6] == float("-inf") and (out[0] == 0).sum() == 31 and torch.equal(out[1], scores[1])
    # a kept token (a rating word, A or B) is never banned: the result reads its probability
    ids = torch.cat([prompt, torch.tensor([[4, 5, 7, 1, 4, 5], [4, 5, 7, 1, 4, 5]])], 1)
    assert not torch.isinf(proc(ids, scores)).any()


def test_a_repeat_is_counted_by_word_across_case_spaces_and_punctuation(tiny_assistant):
    from loupe_vlm.assistant.consistency import word_classes

    tok = tiny_assistant.tokenizer
    classes = word_classes(tok)
    one = lambda w: tok(w, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert all(int(classes[i]) == -1 for w in (",", ".", " .") for i in one(w))  # punctuation is left out
    # ids 0..7 as words: 1 and 2 are one word ("The" / " the"), 5 is a comma
    word = torch.tensor([0, 1, 1, 3, 4, -1, 6, 7])
    proc = RepeatBan(4, torch.tensor([True]), keep=[7], word_class=word)
    prompt = torch.tensor([[0, 0]])
    proc(prompt, torch.zeros(1, 8))
    # the answer wrote "1 3 4 , 6" then "2 3 4": the comma does not count and 1 reads as 2, so 6 would
    # repeat the run; 5 (a comma) and 7 (kept) stay free
    out = proc(torch.cat([prompt, torch.tensor([[1, 3, 4, 5, 6, 0, 2, 3, 4]])], 1), torch.zeros(1, 8))
    assert out[0, 6] == float("-inf") and (out[0] == 0).sum() == 7
    out = proc(torch.cat([prompt, torch.tensor([[1, 3, 4, 7, 0, 2, 3, 4]])], 1), torch.zeros(1, 8))
    assert not torch.isinf(out).any()  # the run was completed by a kept token: it is not banned
    # the assistant's own classes: "still readable, but" then "still readable but" is one run
    made = RepeatBan(4, torch.tensor([True]), [], word_class=classes)
    ids = one("The scene is still readable, but its look is odd. The content is still readable")
    made(prompt, torch.zeros(1, len(tok)))
    out = made(torch.cat([prompt, torch.tensor([ids])], 1), torch.zeros(1, len(tok)))
    assert torch.isinf(out[0, one(" but")[0]]) and not torch.isinf(out[0, one(",")[0]])


def test_the_assistant_bans_repeats_in_quality_and_forgery_answers_each_with_its_own_exceptions(tiny_assistant,
                                                                                                monkeypatch):
    made = _recorded(monkeypatch, "RepeatBan")
    tiny_assistant.run([Request("quality.assess", [ASSETS / "noisy.png"], ["A"]),
                        Request("forgery.detect", [ASSETS / "noisy.png"], ["A"]),
                        Request("chat", [ASSETS / "noisy.png"], ["A"], messages=[
                            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])])
    assert len(made) == 2
    quality, forgery = made
    assert quality.rows.tolist() == [True, False, False] and forgery.rows.tolist() == [False, True, False]
    assert set(quality.keep.tolist()) == set(tiny_assistant.ratings.all_ids + tiny_assistant.ab.all_ids)
    assert set(forgery.keep.tolist()) == set(tiny_assistant._forgery_keep())
    # quality repeats are counted by word (as loupe eval counts them); forgery ones by token id, so that
    # the coordinates' "10% to 80%" runs stay free
    assert torch.equal(quality.word_class, tiny_assistant._word_classes()) and forgery.word_class is None


def test_a_forced_row_writes_the_forced_verdict_whatever_the_scores_say():
    sure = _scores({20: 0.9, 10: 0.1})  # the scores' own choice: authentic
    scores = torch.stack([sure, sure, sure])
    proc = VerdictProcessor([TAMPERED, AUTHENTIC], torch.tensor([True, True, True]), forced=[0, None, 1])
    out = proc(torch.ones(3, 2, dtype=torch.long), scores)
    assert out.argmax(-1).tolist() == [10, 20, 20]  # forced tampered; the scores' choice; forced authentic
    assert proc.moved == [(0, 20, 10)]
    with pytest.raises(ValueError, match="forced"):
        VerdictProcessor([TAMPERED, AUTHENTIC], torch.tensor([True]), forced=[2])
    with pytest.raises(ValueError, match="forced"):
        VerdictProcessor([TAMPERED, AUTHENTIC], torch.tensor([True, True]), forced=[0])


def test_with_a_verdict_map_the_map_decides_the_verdict_its_probability_and_the_text(tiny_assistant, monkeypatch):
    model = tiny_assistant.model
    own = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    assert own.forgery.tampered is not None  # the tiny model writes a verdict word of its own
    monkeypatch.setattr(model.config, "verdict_map", [1.0, 0.0])
    seen = []

    def fixed(p):
        def map_verdicts(input_ids, batch, low, duplicates=None):
            seen.append(input_ids.shape[0])
            return [p] * input_ids.shape[0]
        return map_verdicts

    for p in (0.93, 0.07):  # one of the two goes against the language model's own choice
        monkeypatch.setattr(model, "map_verdicts", fixed(p))
        out = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"]),
                                  Request("quality.assess", [ASSETS / "noisy.png"], ["A"])])
        r = out[0]
        assert r.forgery.probability == pytest.approx(p) and r.forgery.tampered == (p >= 0.5)
        # the first verdict word of the answer is the map's (this overfit tiny LM may ramble on after it)
        assert _first_verdict_word(r.text) == ("tampered" if p >= 0.5 else "authentic"), r.text
        assert out[1].forgery is None  # a quality row is not read as a verdict
        # streamed (the demo, serve with stream: true): the same verdict, probability and text
        *pieces, streamed = list(tiny_assistant.stream(Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])))
        assert streamed.forgery.probability == pytest.approx(p) and streamed.text == r.text
        assert pieces and all(isinstance(x, str) for x in pieces)  # it streamed text before the result
    assert seen == [2, 1, 2, 1]
    # without a verdict_map the map is never read
    monkeypatch.setattr(model.config, "verdict_map", None)
    again = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    assert seen == [2, 1, 2, 1] and again.forgery.probability == pytest.approx(own.forgery.probability)


def test_copy_move_evidence_raises_p_tampered_and_its_pasted_copy_joins_the_mask(tiny_assistant, monkeypatch):
    import numpy as np

    from loupe_vlm.assistant import duplication

    model = tiny_assistant.model
    w, h = 128, 96  # tests/assets/tampered.png
    left, right = np.zeros((h, w), bool), np.zeros((h, w), bool)
    left[20:60, 10:50] = True
    right[30:70, 70:110] = True
    dup = duplication.Duplicate(30, 44, np.eye(2, 3), first=left, second=right)
    calls = []
    monkeypatch.setattr(duplication, "find_duplicate", lambda rgb: calls.append(rgb.shape) or dup)
    strong_right = torch.full((24, 32), -3.0)
    strong_right[:, 16:] = 1.0  # the map marks the right copy: that one was pasted
    monkeypatch.setattr(model, "tamper_maps", lambda ids, batch, low: {r: strong_right for r in range(ids.shape[0])})
    monkeypatch.setattr(model.config, "verdict_map", [1.0, 0.0, 2.0])
    req = Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])
    r = tiny_assistant.run([req, Request("quality.assess", [ASSETS / "noisy.png"], ["A"])])[0]
    want = 1 / (1 + math.exp(-(1.0 + 2.0 * math.log(31))))
    assert calls == [(h, w, 3)]  # the judged image, once; not the quality row's
    assert r.forgery.probability == pytest.approx(want, abs=1e-4) and r.forgery.tampered
    assert r.forgery.mask is not None and r.forgery.mask[right].all()  # the pasted copy is marked
    assert r.forgery.mask_probability[right].min() == pytest.approx(1.0)
    note = inference.COPY_MOVE_NOTE.format(pairs=30)
    assert r.text.endswith(note)  # the answer says what joined the mask
    *pieces, streamed = list(tiny_assistant.stream(req))  # the demo's path: the same verdict, mask and text
    assert streamed.forgery.probability == pytest.approx(want, abs=1e-4) and streamed.forgery.mask[right].all()
    assert streamed.text == r.text and "".join(pieces) == r.text and pieces[-1] == r.text[-len(pieces[-1]):]
    # judged authentic, the copy is not added: no evidence adds a region to an authentic answer
    weak = torch.full((24, 32), -20.0)
    monkeypatch.setattr(model, "tamper_maps", lambda ids, batch, low: {r: weak for r in range(ids.shape[0])})
    r = tiny_assistant.run([req])[0]
    assert r.forgery.probability == pytest.approx(1 / (1 + math.exp(20.0 - 2.0 * math.log(31))), rel=1e-3)
    assert not r.forgery.tampered and (r.forgery.mask is None or not r.forgery.mask[right].all())
    assert not r.text.endswith(note)
    # a two-term verdict_map does not look for copies at all
    monkeypatch.setattr(model.config, "verdict_map", [1.0, 0.0])
    n = len(calls)
    r = tiny_assistant.run([req])[0]
    assert len(calls) == n and r.forgery.probability == pytest.approx(1 / (1 + math.exp(20.0)), rel=1e-3)


def _first_verdict_word(text: str) -> str | None:
    from loupe_vlm.prompts.taxonomy import VERDICTS

    hits = [(text.lower().find(p), v.id) for v in VERDICTS for p in v.phrasings if p in text.lower()]
    return min(hits)[1] if hits else None


def test_forgery_answers_may_repeat_their_coordinates_and_masks_but_not_their_words(tiny_assistant):
    tok = tiny_assistant.tokenizer
    keep = tiny_assistant._forgery_keep()
    mask_id = tiny_assistant.model.config.mask_token_id
    assert mask_id in keep and set(tiny_assistant.verdicts.all_ids) <= set(keep)

    def banned(prefix: str, nxt: str) -> bool:
        ids = tok(prefix, add_special_tokens=False)["input_ids"]
        want = tok(prefix + nxt, add_special_tokens=False)["input_ids"][len(ids)]
        proc = RepeatBan(4, torch.tensor([True]), keep)
        prompt = torch.tensor([[1, 2]])
        proc(prompt, torch.zeros(1, len(tok)))  # the first call fixes where the answer starts
        scores = proc(torch.cat([prompt, torch.tensor([ids])], 1), torch.zeros(1, len(tok)))
        return bool(torch.isinf(scores[0, want]))

    # the builders' coordinates repeat digits, "%" and their joining words by design
    assert not banned("from 10% to 80% across and 10% to", " 90")
    assert not banned("from 10% to 80% across and 10%", " to")
    # a repeated phrase of words is banned at the token that would complete its second copy
    phrase = "The evidence: sharpness that differs from its surroundings and sharpness that differs"
    assert banned(phrase, " from") and not banned(phrase, " in")
