"""prompts/: taxonomy ids are unique and phrasings map back, templates render, Sample validates."""

from __future__ import annotations

import json

import pytest

from loupe_vlm.prompts import (
    CATEGORIES,
    DISTORTIONS,
    MASK_TOKEN,
    RATINGS,
    SEVERITIES,
    TASKS,
    Sample,
    SampleError,
    canonical_question,
    image_roles_for,
    load_jsonl,
    save_jsonl,
    user_content,
)
from loupe_vlm.prompts.parsing import (find_terms, parse_better, parse_distortions, parse_rating, parse_verdict,
                                       states_clean)
from loupe_vlm.prompts.taxonomy import ALL_VOCABULARIES
from loupe_vlm.prompts.templates import QUESTIONS, all_questions


def test_taxonomy_shape():
    assert len(CATEGORIES) == 12
    assert 30 <= len(DISTORTIONS) <= 40
    assert {d.category for d in DISTORTIONS} == set(CATEGORIES.ids)
    assert [s.value for s in SEVERITIES] == [1, 2, 3, 4, 5]
    assert [r.value for r in RATINGS] == [5, 4, 3, 2, 1]


def test_ids_unique_and_every_phrasing_maps_back():
    for vocab in ALL_VOCABULARIES:
        assert len(set(vocab.ids)) == len(vocab.ids)
        for term in vocab:
            for phrase in term.phrasings:
                found = find_terms(f"We see {phrase} here.", vocab)
                assert [m.id for m in found] == [term.id], (vocab.name, phrase, found)


def test_distortion_phrasings_are_unambiguous_across_the_whole_taxonomy():
    owners: dict[str, str] = {}
    for vocab in ALL_VOCABULARIES:
        for term in vocab:
            for phrase in term.phrasings:
                key = phrase.lower()
                assert key not in owners or owners[key] == f"{vocab.name}:{term.id}", (phrase, owners.get(key))
                owners[key] = f"{vocab.name}:{term.id}"


@pytest.mark.parametrize("task", TASKS)
def test_every_template_renders(task):
    for (detail, reference), questions in QUESTIONS[task].items():
        assert len(questions) >= 3
        assert canonical_question(task, detail == "detailed", reference) == questions[0]
        roles = image_roles_for(task, reference)
        parts = user_content(roles, questions[0])
        assert sum(p["type"] == "image" for p in parts) == len(roles)
        assert parts[-1] == {"type": "text", "text": questions[0]}
    assert all(q.strip() for _, _, q in all_questions())


def test_forgery_takes_no_reference():
    with pytest.raises(ValueError, match="reference"):
        image_roles_for("forgery.detect", reference=True)


def test_parsers_read_the_conventions():
    text = "The image shows a harbour. It has serious Gaussian noise and slight motion blur. Overall, the quality is poor."
    assert parse_distortions(text) == [
        {"name": "noise_gaussian_rgb", "category": "noise", "severity": "serious"},
        {"name": "blur_motion", "category": "blur", "severity": "slight"}]
    assert parse_rating(text) == "poor"
    assert parse_better("Image B is better than Image A.") == "B"
    assert parse_verdict("This image has been tampered with, it is not authentic.") == "tampered"


def _sample(**kw):
    base = dict(id="q-1", task="forgery.detect", images=["images/1.png"], image_roles=["A"],
                messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tampered?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": f"Yes, here {MASK_TOKEN}."}]}],
                masks=["masks/1.png"], meta={"tampered": True})
    base.update(kw)
    return Sample(**base)


@pytest.mark.parametrize("text, clean", [
    ("The image shows no visible distortion.", True),
    ("No distortion can be seen in the image.", True),
    ("Against the reference, the image is free of visible distortion.", True),
    ("Image B: no visible distortions.", True),
    # the sixth build's escapes from guidance: a made-up distortion name is still a claim of one
    ("Compared with the reference, the image shows moderate tonal range and noticeable greyish tone.", False),
    ("The image shows noticeable haloscreened areas.", False),
    ("The image suffers from moderate Gaussian blur.", False),
    ("A distortion-free look is not what this has: heavy noise.", False),
])
def test_states_clean_needs_the_answer_to_say_so(text, clean):
    assert states_clean(text) is clean


def test_sample_round_trip(tmp_path):
    s = _sample()
    s.validate()
    save_jsonl([s, _sample(id="q-2")], tmp_path / "train.jsonl")
    back = load_jsonl(tmp_path / "train.jsonl")
    assert [b.to_dict() for b in back] == [s.to_dict(), _sample(id="q-2").to_dict()]


@pytest.mark.parametrize("change, field", [
    ({"masks": []}, "masks"),
    ({"task": "quality.nope"}, "task"),
    ({"images": ["/etc/passwd"]}, "images"),
    ({"images": ["../x.png"]}, "images"),
    ({"image_roles": ["A", "B"]}, "image_roles"),
])
def test_sample_validation_names_the_field(change, field):
    with pytest.raises(SampleError) as info:
        _sample(**change).validate()
    assert info.value.field == field


def test_bad_jsonl_line_names_file_line_and_field(tmp_path):
    path = tmp_path / "val.jsonl"
    good = _sample().to_json()
    bad = json.loads(good)
    del bad["task"]
    path.write_text(good + "\n" + json.dumps(bad) + "\n{not json\n")
    with pytest.raises(SampleError) as info:
        load_jsonl(path)
    assert str(path) in str(info.value) and "line 2" in str(info.value) and "'task'" in str(info.value)
    from loupe_vlm.prompts import iter_jsonl

    errors: list = []
    assert [n for n, _ in iter_jsonl(path, errors=errors)] == [1]
    assert [e.line for e in errors] == [2, 3]
    assert "malformed JSON" in str(errors[1])
