"""The Assistant API on a tiny trained checkpoint: typed results, probabilities, masks, symmetry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loupe_vlm.assistant.inference import Request
from loupe_vlm.assistant.processing import ImageError
from loupe_vlm.prompts import RATINGS
from tests.helpers import ASSETS


def test_assess_reads_the_rating_from_probabilities(tiny_assistant):
    r = tiny_assistant.assess(ASSETS / "noisy.png")
    q = r.quality
    assert q is not None and q.rating_probabilities is not None
    assert set(q.rating_probabilities) == set(RATINGS.ids)
    assert sum(q.rating_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    expected = sum(p * RATINGS[k].value for k, p in q.rating_probabilities.items())
    assert q.score == pytest.approx(expected) and 1.0 <= q.score <= 5.0
    assert q.rating == max(q.rating_probabilities, key=q.rating_probabilities.get)
    assert q.rating == "poor"  # what it was trained to say for this image
    assert q.distortions and q.distortions[0]["category"] == "noise"
    assert 0.0 < r.confidence <= 1.0
    assert "<|mask|>" not in r.text


def test_detect_forgery_gives_probability_and_mask_at_image_size(tiny_assistant):
    r = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    f = r.forgery
    assert f.tampered is True and 0.5 <= f.probability <= 1.0
    truth = np.asarray(Image.open(ASSETS / "tampered_mask.png")) > 127
    assert f.mask.shape == truth.shape and f.mask.dtype == bool
    iou = (f.mask & truth).sum() / max(1, (f.mask | truth).sum())
    assert iou > 0.5
    assert f.area == pytest.approx(f.mask.mean())
    clean = tiny_assistant.detect_forgery(ASSETS / "clean.png").forgery
    assert clean.tampered is False and clean.probability < 0.5 and clean.mask is None


def test_verdict_probabilities_are_the_softmax_over_the_verdict_words(tiny_assistant):
    out = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])])[0]
    toks = tiny_assistant.tokenizer.encode(out.raw_text, add_special_tokens=False)
    assert tiny_assistant.verdicts.first_position(toks) is not None
    v = tiny_assistant.verdicts
    logits = torch.zeros(len(tiny_assistant.tokenizer))
    logits[v.groups["tampered"][0]] = 2.0  # one phrasing of "tampered" at +2; every other id at 0
    n_t, n_a = len(v.groups["tampered"]), len(v.groups["authentic"])
    expected = (np.exp(2.0) + n_t - 1) / (np.exp(2.0) + n_t - 1 + n_a)
    probs = v.probabilities(logits)
    assert probs["tampered"] == pytest.approx(expected, abs=1e-6)
    assert probs["authentic"] == pytest.approx(1 - expected, abs=1e-6)
    logits[v.groups["authentic"][0]] = 50.0  # an id outside the verdict words does not count
    logits[0] = 99.0
    assert v.probabilities(logits)["authentic"] > 0.999


def test_record_matches_the_schema(tiny_assistant):
    rec = tiny_assistant.detect_forgery(ASSETS / "tampered.png").to_record(mask_path="masks/x.png")
    assert set(rec) == {"id", "task", "images", "reference", "text", "confidence", "quality", "comparison",
                        "forgery", "error", "model", "seconds"}
    assert rec["task"] == "forgery" and rec["quality"] is None and rec["comparison"] is None
    assert rec["forgery"]["mask"] == "masks/x.png" and rec["model"].startswith("tiny-test@")


def test_bad_image_in_a_batch_becomes_an_error_record(tiny_assistant, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    results = tiny_assistant.run([Request("quality.assess", [ASSETS / "noisy.png"], ["A"]),
                                  Request("quality.assess", [bad], ["A"])])
    assert results[0].error is None and results[0].quality.rating == "poor"
    rec = results[1].to_record()
    assert rec["error"]["type"] == "not_image" and "bad.png" in rec["error"]["message"]
    assert rec["text"] is None and rec["quality"] is None
    with pytest.raises(ImageError):
        tiny_assistant.assess(bad)


def test_batched_equals_unbatched(tiny_assistant):
    reqs = [Request("forgery.detect", [ASSETS / n], ["A"]) for n in ("tampered.png", "clean.png", "noisy.png")]
    batched = tiny_assistant.run(reqs, batch_size=3)
    single = [tiny_assistant.run([r], batch_size=1)[0] for r in reqs]
    for b, s in zip(batched, single):
        assert b.text == s.text
        assert (b.forgery.probability is None) == (s.forgery.probability is None)
        if b.forgery.probability is not None:
            assert b.forgery.probability == pytest.approx(s.forgery.probability, abs=1e-4)


# ---- comparisons, references, chat and confidence on real generated answers ----------------------

def test_compare_writes_a_verdict_in_both_orders_and_averages_them(tiny_assistant):
    """The fixture learnt: clean vs noisy -> the clean one is better, whichever slot it is in."""
    r = tiny_assistant.compare(ASSETS / "clean.png", ASSETS / "noisy.png")
    c = r.comparison
    assert c.p_a is not None and c.p_a_swapped is not None  # both orders wrote an A/B word
    assert c.p_a > 0.9  # as asked: A (clean) is better
    assert c.p_a_swapped > 0.9  # swapped pair said "B" (clean in slot B), read back as P(original A)
    assert c.better == "A" and c.consistent is True
    assert c.probability == pytest.approx((c.p_a + c.p_a_swapped) / 2, abs=1e-6)
    mirror = tiny_assistant.compare(ASSETS / "noisy.png", ASSETS / "clean.png").comparison
    assert mirror.better == "B" and mirror.consistent is True
    assert mirror.probability == pytest.approx(c.probability, abs=1e-4)
    assert mirror.p_a == pytest.approx(1 - c.p_a_swapped, abs=1e-4)
    assert "A" in r.to_record()["comparison"]["better"]


def test_assess_with_a_reference_image(tiny_assistant):
    r = tiny_assistant.assess(ASSETS / "noisy.png", reference=ASSETS / "clean.png")
    assert r.text.startswith("Against the reference")  # the answer it learnt for the reference prompt
    assert r.quality.rating == "bad"
    assert r.reference == str(ASSETS / "clean.png") and r.images == [str(ASSETS / "noisy.png")]
    plain = tiny_assistant.assess(ASSETS / "noisy.png")
    assert plain.quality.rating == "poor"  # the reference changed the answer, so it reached the model
    rec = r.to_record()
    assert rec["reference"] == str(ASSETS / "clean.png") and rec["images"] == [str(ASSETS / "noisy.png")]


def test_multi_turn_chat_answers_the_follow_up(tiny_assistant):
    from tests.helpers import FOLLOW_UP_ANSWER, two_turn_chat

    history = two_turn_chat()[:-1]  # the first exchange and the follow-up question
    r = tiny_assistant.chat(history, [ASSETS / "noisy.png"])
    assert r.text == FOLLOW_UP_ANSWER
    assert r.quality is not None and r.quality.rating == "poor"  # "poor" in the answer: read as a rating


def test_confidence_is_the_mean_probability_of_the_key_tokens(tiny_assistant):
    """Confidence of 'The image suffers from serious Gaussian noise. Overall, the quality is poor.' is the
    mean probability of its three key tokens: the severity, the distortion and the rating word."""
    from tests.helpers import QUALITY_ANSWER

    a = tiny_assistant
    req = Request("quality.assess", [ASSETS / "noisy.png"], ["A"])
    out = a._generate([a._encode(req, [ASSETS / "noisy.png"])])[0]
    toks = out["tokens"]
    assert a.tokenizer.decode(toks) == QUALITY_ANSWER
    probs = torch.softmax(out["logits"].float(), dim=-1)
    chosen = [float(probs[t, x]) for t, x in enumerate(toks)]
    pieces = [a.tokenizer.decode([x]) for x in toks]
    text = "".join(pieces)
    ends = np.cumsum([len(piece) for piece in pieces])
    # the token in which each key word starts
    starts = [int(np.searchsorted(ends, text.index(word), side="right")) for word in ("serious", "Gaussian", "poor")]
    assert len(set(starts)) == 3, pieces
    expected = float(np.mean([chosen[i] for i in starts]))
    r = a.assess(ASSETS / "noisy.png")
    assert r.confidence == pytest.approx(expected, abs=1e-6)


def test_two_threads_on_one_model_match_one_at_a_time(tiny_assistant):
    """No per-call state on the model: concurrent calls give exactly the sequential results."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [lambda: tiny_assistant.detect_forgery(ASSETS / "tampered.png"),
            lambda: tiny_assistant.compare(ASSETS / "clean.png", ASSETS / "noisy.png"),
            lambda: tiny_assistant.assess(ASSETS / "noisy.png", reference=ASSETS / "clean.png"),
            lambda: tiny_assistant.detect_forgery(ASSETS / "clean.png")] * 2

    def key(r):
        rec = r.to_record()
        rec.pop("seconds")
        mask = None if r.forgery is None or r.forgery.mask_probability is None else r.forgery.mask_probability
        return rec, mask

    sequential = [key(j()) for j in jobs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        concurrent = [key(f.result()) for f in [pool.submit(j) for j in jobs]]
    for (rec_s, mask_s), (rec_c, mask_c) in zip(sequential, concurrent):
        assert rec_s == rec_c
        assert (mask_s is None) == (mask_c is None)
        if mask_s is not None:
            assert np.array_equal(mask_s, mask_c)


def test_stream_yields_the_answer_token_by_token_then_the_result(tiny_assistant):
    from loupe_vlm.assistant.inference import Result

    whole = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    items = list(tiny_assistant.stream(Request("forgery.detect", [ASSETS / "tampered.png"], ["A"], detail=True)))
    *pieces, result = items
    assert isinstance(result, Result) and all(isinstance(p, str) for p in pieces)
    n_tokens = len(tiny_assistant.tokenizer.encode(whole.raw_text, add_special_tokens=False))
    assert len(pieces) >= n_tokens // 2 > 3  # a piece per token or so, not the finished text at once
    assert "".join(pieces) == result.text == whole.text
    assert not any("<|mask|>" in p for p in pieces)
    assert result.forgery.probability == pytest.approx(whole.forgery.probability, abs=1e-6)
    assert np.array_equal(result.forgery.mask, whole.forgery.mask)
    pair = list(tiny_assistant.stream(Request("quality.rate", [ASSETS / "clean.png", ASSETS / "noisy.png"],
                                              ["A", "B"])))
    assert pair[-1].comparison.better == "A" and pair[-1].comparison.consistent is True
    with pytest.raises(ImageError):
        tiny_assistant.stream(Request("quality.assess", [ASSETS / "missing.png"], ["A"]))


def test_merge_lora_gives_the_bits_of_peft_merge_and_keeps_the_tie(tmp_path):
    """The base comes from a (memory-mapped) safetensors folder, as a packaged base does; merge_lora copies
    the targeted matrices out of the file first and must give exactly peft's merged weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from loupe_vlm.assistant.inference import merge_lora

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "base", safe_serialization=True)
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    merged = []
    for merge in (merge_lora, lambda m: m.merge_and_unload()):
        torch.manual_seed(1)  # the same random LoRA matrices both times
        lm = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base", use_safetensors=True), lcfg)
        merged.append(merge(lm))
    ours, peft_own = (m.state_dict() for m in merged)
    assert ours.keys() == peft_own.keys()
    assert all(torch.equal(ours[k], peft_own[k]) for k in ours)
    base = LlamaForCausalLM.from_pretrained(tmp_path / "base", use_safetensors=True).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[key], base[key])  # the update is in
    assert merged[0].get_input_embeddings().weight is merged[0].get_output_embeddings().weight
