"""Template labeller: every text reads back as its ground truth; the check catches wrong texts."""

from __future__ import annotations

import numpy as np
import pytest

from loupe_vlm.data_builders.labellers.base import ImageTruth, LabelJob, check_text
from loupe_vlm.data_builders.labellers.template import TemplateLabeller
from loupe_vlm.data_builders.quality import _random_spec, _truth, pair_better, BuildConfig
from loupe_vlm.prompts.parsing import parse_better, parse_distortions, parse_rating, repeated_ngram
from loupe_vlm.prompts import RATINGS, severity_name


def _jobs(n: int, seed: int = 0):
    cfg = BuildConfig(out="unused", clean_rate=0.1, multi_rate=0.4)
    rng = np.random.default_rng(seed)
    tasks = [("quality.identify", False), ("quality.assess", False), ("quality.assess", True),
             ("quality.rate", False), ("quality.compare", True)]
    for i in range(n):
        task, detail = tasks[i % len(tasks)]
        x = _random_spec(rng, cfg)
        if task in ("quality.rate", "quality.compare"):
            while True:
                y = _random_spec(rng, cfg)
                if pair_better(x, y):
                    break
            better = "A" if pair_better(x, y) == "x" else "B"
            yield LabelJob(task, detail, bool(i % 3 == 0), "a red apple", _truth(x), _truth(y), better, key=f"k{i}")
        else:
            yield LabelJob(task, detail, bool(i % 3 == 0), "a red apple", _truth(x), key=f"k{i}")


def test_texts_read_back_as_ground_truth():
    lab = TemplateLabeller(seed=0)
    seen_tasks = set()
    for job in _jobs(250):
        text = lab.label(job)
        assert check_text(job, text) is None, text
        seen_tasks.add((job.task, job.detail))
        if job.task in ("quality.identify", "quality.assess"):
            got = {(d["category"], d["name"], d["severity"]) for d in parse_distortions(text)}
            want = {(d["category"], d["name"], severity_name(d["severity"])) for d in job.a.distortions}
            assert got == want, text
            if job.a.clean:
                low = text.lower()
                assert "no visible distortion" in low or "free of visible distortion" in low \
                    or "no distortion" in low, text
        if job.task == "quality.assess":
            assert parse_rating(text) == job.a.rating
            words = [w.strip(".,;:").lower() for w in text.split()]
            assert sum(w in RATINGS.ids for w in words) == 1, text  # rating word appears exactly once
        if job.task in ("quality.rate", "quality.compare"):
            assert parse_better(text) == job.better
            loser = "B" if job.better == "A" else "A"
            assert text.index(job.better) < text.find(loser) if loser in text else True
    assert len(seen_tasks) == 5


def test_no_answer_repeats_a_run_of_four_words():
    lab = TemplateLabeller(seed=3)
    repeats = [(gram, text) for job in _jobs(1500, seed=3) for text in [lab.label(job)]
               if (gram := repeated_ngram(text)) is not None]
    assert repeats == []
    # the check itself: a closing sentence that restates the verdict is caught
    assert repeated_ngram("Image A is better. Both show a cat. So image A is better.") == ("image", "a", "is", "better")


def test_detailed_assessment_covers_content_each_distortion_and_rating():
    job = LabelJob("quality.assess", True, False, "a red apple",
                   ImageTruth([{"name": "blur_motion", "category": "blur", "severity": 2},
                               {"name": "noise_gaussian_rgb", "category": "noise", "severity": 4}], "bad"), key="x")
    text = TemplateLabeller(0).label(job)
    assert "a red apple" in text and text.rstrip(".").endswith("bad")
    assert [d["name"] for d in parse_distortions(text)] == ["blur_motion", "noise_gaussian_rgb"]


def test_deterministic_per_seed_and_varied():
    jobs = list(_jobs(40))
    a = [TemplateLabeller(1).label(j) for j in jobs]
    b = [TemplateLabeller(1).label(j) for j in jobs]
    c = [TemplateLabeller(2).label(j) for j in jobs]
    assert a == b and a != c
    assert len(set(a)) > 30


@pytest.mark.parametrize("text,why", [
    ("The image suffers from serious Gaussian noise. Overall, the quality is poor.", "categories differ"),
    ("The image suffers from serious Gaussian blur. Overall, the quality is fair.", "rating"),
    ("The image suffers from moderate Gaussian blur. Overall, the quality is poor.", "severity"),
    ("The image suffers from serious motion blur. Overall, the quality is poor.", "names"),
])
def test_check_catches_wrong_texts(text, why):
    job = LabelJob("quality.assess", False, False, "", ImageTruth(
        [{"name": "blur_gaussian", "category": "blur", "severity": 4}], "poor"))
    assert why in check_text(job, text)


def test_check_catches_wrong_comparison():
    a = ImageTruth([{"name": "blur_gaussian", "category": "blur", "severity": 1}], "good")
    b = ImageTruth([{"name": "blur_gaussian", "category": "blur", "severity": 4}], "bad")
    job = LabelJob("quality.compare", True, False, "", a, b, "A")
    assert check_text(job, "Image B is better. Image A has serious Gaussian blur.")
    assert check_text(job, "Image A is better. Image B has Gaussian noise and Gaussian blur.")  # absent noise
    assert check_text(job, "Image A is better, it is sharper.")  # leaves out the blur
    assert check_text(job, "Image A is better: B has serious Gaussian blur.") is None
