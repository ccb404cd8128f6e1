"""Forgery answers: every template variant reads back to the ground truth it was worded from."""

from __future__ import annotations

import random

import numpy as np
import pytest

from loupe_vlm.data_builders.forgery_text import answer, location_of, region_facts
from loupe_vlm.prompts import CUES, LOCATIONS, MANIPULATION_DOMAIN, MASK_TOKEN
from loupe_vlm.prompts.parsing import (count_mask_tokens, parse_locations, parse_manipulation, parse_verdict,
                                      repeated_ngram)

POSTS = ([], [{"op": "jpeg", "quality": 70}], [{"op": "resize", "scale": 0.8, "size": [80, 80]},
                                               {"op": "blur", "sigma": 0.5}, {"op": "noise", "sigma": 2.0}])


def _meta(rng: random.Random, manipulation: str | None, n_regions: int) -> dict:
    regions = []
    for _ in range(n_regions):
        loc = rng.choice(LOCATIONS.ids)
        regions.append({"location": loc, "area": rng.uniform(0.002, 0.3), "bbox": [10, 20, 50, 60]})
    cues = rng.sample([c for c in CUES.ids if c != "consistent"], rng.randint(0, 3))
    return {"tampered": True, "manipulation": manipulation,
            "domain": MANIPULATION_DOMAIN.get(manipulation) if manipulation else None,
            "regions": regions, "cues": cues, "post": rng.choice(POSTS)}


@pytest.mark.parametrize("manipulation", [*MANIPULATION_DOMAIN, None])
def test_tampered_answers_read_back(manipulation):
    rng = random.Random(0)
    for k in range(150):
        meta = _meta(rng, manipulation, 1 + k % 3)
        text = answer(meta, detail=bool(k % 2), rng=rng, size=(100, 100))
        assert parse_verdict(text) == "tampered", text
        assert count_mask_tokens(text) == len(meta["regions"]), text
        assert parse_locations(text) == [r["location"] for r in meta["regions"]], text
        assert parse_manipulation(text) == manipulation, text
        assert repeated_ngram(text) is None, text  # several regions: each worded its own way
        # Each region's mask token comes right after that region's description, in order.
        pieces = text.split(MASK_TOKEN)
        for region, before in zip(meta["regions"], pieces):
            assert parse_locations(before)[-1] == region["location"], text


def test_detailed_answers_state_facts_and_evidence():
    rng = random.Random(1)
    meta = {"tampered": True, "manipulation": "splice", "domain": "photoshop", "cues": ["edges", "lighting"],
            "regions": [{"location": "top_left", "area": 0.07, "bbox": [0, 0, 30, 20]}],
            "post": [{"op": "jpeg", "quality": 75}]}
    text = answer(meta, detail=True, rng=rng, size=(100, 100))
    assert "about 7% of the image" in text
    assert "from 0% to 30% across and 0% to 20% down" in text
    assert "quality 75" in text
    assert any(p in text for p in CUES["edges"].phrasings) and any(p in text for p in CUES["lighting"].phrasings)
    assert text.index(MASK_TOKEN) < text.index(next(p for p in CUES["edges"].phrasings if p in text))


def test_authentic_answers_have_no_mask_and_give_reasons():
    rng = random.Random(2)
    for k in range(60):
        meta = {"tampered": False, "manipulation": None, "domain": None, "regions": [], "cues": ["consistent"],
                "post": rng.choice(POSTS)}
        text = answer(meta, detail=bool(k % 2), rng=rng)
        assert parse_verdict(text) == "authentic", text
        assert count_mask_tokens(text) == 0
        assert parse_locations(text) == [] and parse_manipulation(text) is None, text
        assert any(p in text for p in CUES["consistent"].phrasings)


def test_region_facts_grid_area_and_box():
    m = np.zeros((90, 120), np.uint8)
    m[0:30, 80:120] = 255  # top-right cell
    f = region_facts(m)
    assert f == {"location": "top_right", "area": round(30 * 40 / (90 * 120), 5), "bbox": [80, 0, 120, 30]}
    m2 = np.zeros((90, 120), bool)
    m2[40:50, 50:70] = True
    assert location_of(m2) == "center"
    m3 = np.zeros((90, 120), bool)
    m3[80:90, 0:10] = True
    assert location_of(m3) == "bottom_left"
    with pytest.raises(ValueError):
        region_facts(np.zeros((8, 8), np.uint8))
