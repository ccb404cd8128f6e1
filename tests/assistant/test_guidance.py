"""Evidence-guided decoding (assistant/guidance.py): the heads' verdicts steer the taxonomy words."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from loupe_vlm.assistant.guidance import COMPARE_SLOPE, FLOOR, GUIDED_TASKS, EvidenceGuide
from loupe_vlm.assistant.processing import AUX_CATEGORIES
from tests.assistant.test_aux import _tiny
from tests.helpers import ASSETS

CAT = {c: i for i, c in enumerate(AUX_CATEGORIES)}


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _probs(**high: float) -> torch.Tensor:
    p = torch.full((1, len(AUX_CATEGORIES)), 0.01)
    for c, v in high.items():
        p[0, CAT[c]] = v
    return p


def _step(guide, p_cat, level: int, strength: float, tail: list[int]) -> torch.Tensor:
    p_sev = torch.full((1, 5), 0.01)
    p_sev[0, level - 1] = 0.96
    proc = guide.processor(p_cat, p_sev, torch.tensor([strength]))
    scores = torch.zeros(1, 2000)
    return proc(torch.tensor([tail]), scores)[0]


def test_guide_pushes_down_the_words_of_classes_the_heads_doubt_and_leaves_the_rest():
    _, lp = _tiny(1.0)
    tok = lp.tokenizer
    guide = EvidenceGuide(tok, AUX_CATEGORIES)
    blur, noise, gauss = _ids(tok, " blur")[0], _ids(tok, " noise")[0], _ids(tok, " Gaussian")[0]
    the, image = _ids(tok, " the image")
    out = _step(guide, _probs(blur=0.9), 4, 2.0, [the, image])
    assert out[blur] == 0  # the heads' best reading is left alone
    assert math.isclose(float(out[noise]), 2.0 * math.log(0.01 / 0.9), rel_tol=1e-4)
    assert out[gauss] == 0  # " Gaussian" opens a blur name too: the best class it may name decides
    assert out[the] == 0 and out[image] == 0  # ordinary words are untouched
    # after " Gaussian", the continuation decides between Gaussian blur and Gaussian noise
    after = _step(guide, _probs(noise=0.8), 4, 2.0, [the, gauss])
    assert after[blur] < -5 and after[noise] == 0
    # severity words follow the heads' level: " s" opens both "serious" (4) and "slight" (1)
    s, er, light = _ids(tok, " serious")[0], _ids(tok, " serious")[1], _ids(tok, " slight")[1]
    sev = _step(guide, _probs(blur=0.9), 4, 2.0, [the, s])
    assert sev[er] == 0 and sev[light] < -5
    # a clean image: every distortion name is pushed down against "nothing visible"
    clean = _step(guide, _probs(), 4, 2.0, [the])
    assert math.isclose(float(clean[blur]), 2.0 * math.log(0.01 / 0.99), rel_tol=1e-4)
    free = _ids(tok, " free of visible distortion")[0]
    assert clean[free] > 0  # ... the words that call it clean are pulled up (next test), and when it is not clean:
    assert math.isclose(float(out[free]), 2.0 * math.log(0.1 / 0.9), rel_tol=1e-4)
    # strength 0 leaves a row alone; a huge strength stops at FLOOR
    assert not _step(guide, _probs(blur=0.9), 4, 0.0, [the]).any()
    assert float(_step(guide, _probs(blur=0.9), 4, 9.0, [the])[noise]) == FLOOR


def test_a_clean_image_pushes_severity_words_down_and_pulls_a_clean_statement_until_a_claim_is_written():
    _, lp = _tiny(1.0)
    tok = lp.tokenizer
    guide = EvidenceGuide(tok, AUX_CATEGORIES)
    the, image = _ids(tok, " the image")
    no, visible = _ids(tok, " no visible")[:2]
    s, er = _ids(tok, " serious")[:2]
    margin = math.log(0.99 / 0.01)  # P(nothing visible) against the likeliest category's
    p_sev = torch.full((1, 5), 0.01)
    p_sev[0, 3] = 0.96  # "serious" is the heads' level
    proc = guide.processor(_probs(), p_sev, torch.tensor([2.0]))
    first = proc(torch.tensor([[the, image]]), torch.zeros(1, 2000))[0]
    # the severity word of the heads' own level is pushed down too: it would open a claim of a distortion
    assert math.isclose(float(first[s]), -2.0 * margin, rel_tol=1e-4)
    assert math.isclose(float(first[no]), 2.0 * margin, rel_tol=1e-4)  # the clean statement's opening, pulled up
    assert first[the] == 0 and first[image] == 0
    # inside the statement its next word is pulled up as well
    inside = proc(torch.tensor([[the, image, no]]), torch.zeros(1, 2000))[0]
    assert math.isclose(float(inside[visible]), 2.0 * margin, rel_tol=1e-4)
    # ... also after the answer's first word, "No" (no space before it): it goes on to say what it is about
    start = _ids(tok, "No visible")
    assert start[0] in guide.clean_openers
    opened = proc(torch.tensor([start[:1]]), torch.zeros(1, 2000))[0]
    assert math.isclose(float(opened[start[1]]), 2.0 * margin, rel_tol=1e-4)
    # once the answer has written a severity word it has made its claim: no more pull on the opening
    proc = guide.processor(_probs(), p_sev, torch.tensor([2.0]))
    proc(torch.tensor([[the, image]]), torch.zeros(1, 2000))
    later = proc(torch.tensor([[the, image, s, er]]), torch.zeros(1, 2000))[0]
    assert later[no] == 0
    # a distorted image: no pull, and its level's severity word is left alone
    proc = guide.processor(_probs(blur=0.9), p_sev, torch.tensor([2.0]))
    distorted = proc(torch.tensor([[the, image]]), torch.zeros(1, 2000))[0]
    assert distorted[s] == 0 and distorted[no] < 0


def _guided_batch(tmp_path, task: str, rows: int):
    """A tiny model with heads, its processor, a batch of ``rows`` copies of one ``task`` record on the noisy
    asset, and an EvidenceGuide."""
    from tests.assistant.test_aux import _sample

    torch.manual_seed(0)
    model, lp = _tiny(1.0)
    model.eval()
    shutil.copy(ASSETS / "noisy.png", tmp_path / "A.png")
    item = lp.encode_sample(_sample(task, ["A"], {}), tmp_path, train=False)
    return model, lp, lp.collate([item] * rows, padding_side="left"), EvidenceGuide(lp.tokenizer, AUX_CATEGORIES)


def test_generate_returns_the_guided_logits_and_only_guided_rows_change(tmp_path):
    from tests.assistant.test_aux import _sample

    model, lp, batch, guide = _guided_batch(tmp_path, "quality.identify", 2)
    with torch.no_grad():
        plain = model.generate(batch, max_new_tokens=1)
        guided = model.generate(batch, max_new_tokens=1, guide=guide, guide_strength=torch.tensor([3.0, 0.0]))
    delta = guided["logits"][:, 0] - plain["logits"][:, 0]
    assert not delta[1].any()  # strength 0: untouched
    moved = delta[0].nonzero().flatten().tolist()
    assert moved and (delta[0] <= 0).all() and delta[0].min() >= FLOOR
    # exactly the tokens that open some taxonomy phrase (after the prompt) may move
    openers = set(guide.categories.entries[()][0].tolist()) | set(guide.severities.entries[()][0].tolist())
    assert set(moved) <= openers
    # the decision was made on these logits
    assert int(guided["new_tokens"][0, 0]) == int(guided["logits"][0, 0].argmax())
    # a model whose heads are off has nothing to guide by: generation is unchanged
    bare, lp2 = _tiny(0.0)
    bare.eval()
    b2 = lp2.collate([lp2.encode_sample(_sample("quality.identify", ["A"], {}), tmp_path, train=False)],
                     padding_side="left")
    with torch.no_grad():
        a = bare.generate(b2, max_new_tokens=1)["logits"]
        b = bare.generate(b2, max_new_tokens=1, guide=guide, guide_strength=torch.tensor([3.0]))["logits"]
    assert torch.equal(a, b)


def test_assistant_guides_identify_and_assess_only_and_the_setting_round_trips(tmp_path, monkeypatch):
    from loupe_vlm.assistant.inference import Assistant, Request
    from loupe_vlm.finetune.export import export

    model, lp = _tiny(1.0)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    export(tmp_path / "ck", tmp_path / "ex", evidence_guidance=1.5)
    a = Assistant.from_pretrained(tmp_path / "ex")
    assert a.evidence_guidance == 1.5 and a.guide is not None and "+guidance" not in a.name
    off = Assistant.from_pretrained(tmp_path / "ex", evidence_guidance=0)
    assert off.guide is None and off.name.endswith("+guidance0")
    assert Assistant.from_pretrained(tmp_path / "ck").guide is None  # 0 unless the checkpoint says so
    with pytest.raises(ValueError, match="evidence_guidance"):
        export(tmp_path / "ck", tmp_path / "bad", evidence_guidance=-1)
    with pytest.raises(ValueError, match="guidance"):
        Assistant.from_pretrained(tmp_path / "ck", evidence_guidance=11)

    seen = []
    real = a.model.generate

    def spy(batch, **kw):
        seen.append(kw.get("guide_strength"))
        return real(batch, **kw)

    monkeypatch.setattr(a.model, "generate", spy)
    img = str(ASSETS / "noisy.png")
    a.run([Request("quality.identify", [img], ["A"]), Request("forgery.detect", [img], ["A"]),
           Request("quality.assess", [img], ["A"])], batch_size=8)
    assert seen[-1].tolist() == [1.5, 0.0, 1.5]
    assert set(GUIDED_TASKS) == {"quality.identify", "quality.assess", "quality.compare", "quality.rate"}
    a.run([Request("forgery.detect", [img], ["A"])])
    assert seen[-1] is None  # no guided row: no guidance passed at all


def test_comparison_guidance_steers_only_the_verdict_and_only_until_it_is_written():
    _, lp = _tiny(1.0)
    tok = lp.tokenizer
    guide = EvidenceGuide(tok, AUX_CATEGORIES)
    a, b = guide.ab_ids
    assert [a] == _ids(tok, " A")[:1] and [b] == _ids(tok, " B")[:1]
    image, blur, noise = _ids(tok, "Image")[0], _ids(tok, " blur")[0], _ids(tok, " noise")[0]
    # row 0: the heads see A as two levels worse than B; row 1: not a comparison, unguided by the pair
    p_a = torch.sigmoid(torch.tensor([COMPARE_SLOPE * (1.0 - 3.0), float("nan")]))
    p_cat = torch.cat([_probs(blur=0.9), _probs(blur=0.9)])
    proc = guide.processor(p_cat, torch.full((2, 5), 0.2), torch.tensor([2.0, 2.0]), p_a)
    prompt = [[image, image], [image, image]]
    first = proc(torch.tensor(prompt), torch.zeros(2, 2000))
    want = 2.0 * math.log(float(p_a[0]) / (1 - float(p_a[0])))
    assert math.isclose(float(first[0, a]), want, rel_tol=1e-4) and first[0, b] == 0
    assert first[0].nonzero().flatten().tolist() == [a]  # a comparison's distortion words are left alone
    assert first[1, a] == 0 and first[1, noise] < 0  # the other row is guided as a description
    # once a verdict is written (here " B"), the rest of the answer is the language model's alone
    later = proc(torch.tensor([[image, image, b], [image, image, blur]]), torch.zeros(2, 2000))
    assert not later[0].any()
    # the pair's order does not matter to the heads: shown swapped, the same image is favoured
    swapped = guide.processor(p_cat, torch.full((2, 5), 0.2), torch.tensor([2.0, 0.0]), 1 - p_a)
    out = swapped(torch.tensor(prompt), torch.zeros(2, 2000))
    assert math.isclose(float(out[0, b]), want, rel_tol=1e-4) and out[0, a] == 0


def test_generate_reads_a_comparison_from_the_pair_s_severities(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0)
    model.eval()
    shutil.copy(ASSETS / "noisy.png", tmp_path / "A.png")
    shutil.copy(ASSETS / "clean.png", tmp_path / "B.png")
    from tests.assistant.test_aux import _sample

    item = lp.encode_sample(_sample("quality.compare", ["A", "B"], {}), tmp_path, train=False)
    batch = lp.collate([item], padding_side="left")
    guide = EvidenceGuide(lp.tokenizer, AUX_CATEGORIES)
    with torch.no_grad():
        low = model.encode_lowlevel(batch["lowlevel_pixels"])
    proc = model.guide_processor(guide, torch.tensor([2.0]), batch["input_ids"], batch, low, torch.tensor([True]))
    sev = [float(x[0][len(AUX_CATEGORIES)].sigmoid()) * 5 for x in low.aux]
    assert abs(sev[0] - sev[1]) > 1e-4  # two different images: the pair has a reading either way
    want = torch.sigmoid(torch.tensor(COMPARE_SLOPE * (sev[-1] - sev[-2])))
    assert bool(proc.compare[0]) and math.isclose(float(proc.log_ab[0].exp().max()), 1.0, rel_tol=1e-6)
    got = float(proc.log_ab[0, 0] - proc.log_ab[0, 1])
    assert math.isclose(got, float(torch.log(want / (1 - want))), rel_tol=1e-3, abs_tol=1e-5)


def test_both_orders_comparisons_write_the_verdict_of_the_lm_s_two_orders_averaged(tmp_path, monkeypatch):
    from loupe_vlm.assistant import inference
    from loupe_vlm.assistant.inference import AB_PROBE_TOKENS, Assistant, Request
    from loupe_vlm.finetune.export import export

    model, lp = _tiny(1.0)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    export(tmp_path / "ck", tmp_path / "ex", evidence_guidance=2.0)
    a = Assistant.from_pretrained(tmp_path / "ex")
    req = Request("quality.compare", [str(ASSETS / "noisy.png"), str(ASSETS / "clean.png")], ["A", "B"])
    calls = []
    real = a.model.generate

    def spy(batch, **kw):
        calls.append({**kw, "rows": len(batch["input_ids"])})
        return real(batch, **kw)

    monkeypatch.setattr(a.model, "generate", spy)
    a.run([req])
    assert len(calls) == 1 and "guide_p_a" not in calls[0]  # the default, "heads": one pass, heads' reading
    # both_orders: a short unguided pass over both orders first, then one answer guided to their verdict
    a.model.config.ab_verdict = "both_orders"
    calls.clear()
    a.run([req])
    assert calls[0]["max_new_tokens"] == AB_PROBE_TOKENS and "guide" not in calls[0]
    # as asked P(A) 0.3; shown swapped, P(that order's A, the original B) 0.2, so P(A) 0.8 read that way:
    # the average favours A (0.55)
    monkeypatch.setattr(a, "_probe_orders", lambda jobs, bs, results=None: {0: (0.3, 0.8)})
    calls.clear()
    out = a.run([req])[0]
    # A, in the order asked; the swapped order's answer is not written (the probe read that order already)
    assert len(calls) == 1 and calls[0]["guide_p_a"].tolist() == [1.0] and calls[0]["rows"] == 1
    c = out.comparison
    assert c.better == "A" and math.isclose(c.probability, 0.55) and c.p_a == 0.3 and math.isclose(c.p_a_swapped, 0.8)
    assert c.consistent is False  # the LM's own two readings disagree; the answers do not
    # streaming goes the same way
    calls.clear()
    *pieces, res = list(a.stream(req))
    assert [k["guide_p_a"].tolist() for k in calls] == [[1.0]] and res.comparison.better == "A"
    # a model config with an unknown setting is refused
    a.model.config.ab_verdict = "coin"
    with pytest.raises(ValueError, match="ab_verdict"):
        a.model.config.check()
    assert inference._written_p_a((None, 0.1)) == 0.0  # only the swapped reading, turned back: B better


def test_rating_width_guides_an_assessment_s_rating_words_by_the_heads_severity(tmp_path):
    from loupe_vlm.assistant.modeling import RATING_VALUES

    model, _, batch, guide = _guided_batch(tmp_path, "quality.assess", 1)
    with torch.no_grad():
        low = model.encode_lowlevel(batch["lowlevel_pixels"])
    args = (guide, torch.tensor([2.0]), batch["input_ids"], batch, low)
    assert model.guide_processor(*args).log_rating is None  # off by default: the rating words are the LM's
    model.config.rating_width = 0.5
    proc = model.guide_processor(*args)
    level = float(low.aux[0][0][len(AUX_CATEGORIES)].sigmoid()) * 5
    q = torch.softmax(-(RATING_VALUES - (5 - 0.8 * level)) ** 2 / (2 * 0.25), dim=0)
    assert torch.allclose(proc.log_rating[0], q.log() - q.max().log(), atol=1e-5)
    # a reference's reading takes precedence
    given = {"p_category": torch.full((1, len(AUX_CATEGORIES)), 0.05), "level": torch.tensor([1.0]),
             "p_rating": torch.tensor([[0.1, 0.6, 0.1, 0.1, 0.1]])}
    proc = model.guide_processor(*args, given=given)
    assert torch.allclose(proc.log_rating[0], torch.log(given["p_rating"][0] / 0.6), atol=1e-5)
    for bad in (0, -1.0, True, "wide", float("inf")):
        model.config.rating_width = bad
        with pytest.raises(ValueError, match="rating_width"):
            model.config.check()
