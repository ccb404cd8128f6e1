"""The distortion library: coverage of the taxonomy, determinism, severity order, pairing, rating rule."""

from __future__ import annotations

import numpy as np
import pytest

from loupe_vlm.data_builders import distortions as D
from loupe_vlm.data_builders.distortions.compression import wavelet_codec
from loupe_vlm.prompts import CATEGORIES, DISTORTIONS, category_of


def test_every_taxonomy_id_has_a_function_with_five_levels():
    assert set(D.REGISTRY) == set(DISTORTIONS.ids)
    assert all(len(D.LADDERS[n]) == 5 for n in D.REGISTRY)


def _diff(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize("name", DISTORTIONS.ids)
def test_function_is_deterministic_and_changes_the_image(name, photo):
    a = D.apply(photo, name, 3, np.random.default_rng(1))
    b = D.apply(photo, name, 3, np.random.default_rng(1))
    assert a.shape == photo.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert _diff(a, photo) > 0.5


@pytest.mark.parametrize("name", DISTORTIONS.ids)
def test_severity_ladder_is_ordered(name, photo):
    diffs = [np.mean([_diff(D.apply(photo, name, k, np.random.default_rng(s)), photo) for s in range(2)])
             for k in range(1, 6)]
    assert diffs[4] > diffs[0], diffs
    assert sum(b >= a * 0.97 for a, b in zip(diffs, diffs[1:])) >= 3, diffs  # mostly increasing


def test_odd_and_tiny_sizes(photo):
    for name in DISTORTIONS.ids:
        out = D.apply(photo[:37, :53], name, 5, 0)
        assert out.shape == (37, 53, 3)


def test_wavelet_codec_is_near_lossless_at_a_tiny_step(photo):
    import cv2
    luma = lambda im: cv2.cvtColor(im, cv2.COLOR_RGB2GRAY)[..., None]  # chroma is coded at half resolution
    assert _diff(luma(wavelet_codec(photo, 0.01)), luma(photo)) < 1.0
    assert _diff(luma(wavelet_codec(photo, 20)), luma(photo)) > 3


def test_bad_input_is_refused(photo):
    with pytest.raises(KeyError, match="unknown distortion"):
        D.apply(photo, "blur_box", 1, 0)
    with pytest.raises(ValueError, match="1..5"):
        D.apply(photo, "blur_gaussian", 6, 0)
    with pytest.raises(ValueError, match="uint8"):
        D.apply(photo.astype(np.float32), "blur_gaussian", 1, 0)


def test_pairs_are_compatible_and_cover_categories():
    rng = np.random.default_rng(0)
    cats = set()
    for _ in range(400):
        a, b = D.sample_pair(rng)
        assert D.compatible(a, b)
        ca, cb = category_of(a), category_of(b)
        assert ca != cb and frozenset((ca, cb)) not in D.INCOMPATIBLE
        cats |= {ca, cb}
    assert cats == set(CATEGORIES.ids)
    order = D.ordered([("compression_jpeg", 2), ("blur_gaussian", 3), ("noise_gaussian_rgb", 1)])
    assert [n for n, _ in order] == ["blur_gaussian", "noise_gaussian_rgb", "compression_jpeg"]


def test_rating_rule():
    assert D.rating_for([]) == "excellent"
    assert [D.rating_for([k]) for k in range(1, 6)] == ["good", "fair", "poor", "poor", "bad"]
    assert D.rating_for([2, 3]) == "poor"  # second one obvious: one step worse
    assert D.rating_for([3, 2]) == "poor"  # second one moderate: no change
    assert D.rating_for([4, 3]) == "bad"
    assert D.rating_for([5, 5]) == "bad"


@pytest.mark.parametrize("name", DISTORTIONS.ids)
def test_slight_is_never_a_no_op_even_on_small_images(name, photo):
    small = np.ascontiguousarray(photo[:64, :64])
    assert _diff(D.apply(small, name, 1, np.random.default_rng(0)), small) > 0.05
