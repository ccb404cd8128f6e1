"""The Assistant API on a tiny trained checkpoint: typed results, probabilities, masks, symmetry."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_verdict_probabilities_sum_to_one(tiny_assistant):
    out = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])])[0]
    toks = tiny_assistant.tokenizer.encode(out.raw_text, add_special_tokens=False)
    assert tiny_assistant.verdicts.first_position(toks) is not None
    import torch

    probs = tiny_assistant.verdicts.probabilities(torch.randn(len(tiny_assistant.tokenizer)))
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)


def test_compare_runs_both_orders(tiny_assistant):
    r = tiny_assistant.compare(ASSETS / "clean.png", ASSETS / "noisy.png")
    swapped = tiny_assistant.compare(ASSETS / "noisy.png", ASSETS / "clean.png")
    c, s = r.comparison, swapped.comparison
    # the tiny model never learned to compare, so it may write no A/B word at all; when it does,
    # the two calls are mirror images of each other by construction
    if c.p_a is not None and s.p_a is not None:
        assert c.p_a_swapped == pytest.approx(1 - s.p_a, abs=1e-4)
        assert s.p_a_swapped == pytest.approx(1 - c.p_a, abs=1e-4)
    else:
        assert c.better is None and c.probability is None  # no invented number


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
