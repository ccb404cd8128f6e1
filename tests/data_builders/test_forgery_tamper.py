"""Tamper synthesis: exact binary masks, nothing changed outside them, determinism, post-processing."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from loupe_vlm.data_builders import tamper as T
from loupe_vlm.data_builders.sources import fractal_texture, load_rgba

STAMPS = sorted(glob.glob("/usr/share/tuxpaint/stamps/animals/**/*.png", recursive=True))


@pytest.fixture(scope="module")
def pair():
    a = fractal_texture(11, 128)
    b = fractal_texture(12, 128)
    a[30:70, 40:90] = (30, 160, 60)  # some edges for the edge/segment shapes
    return a, b


def _check(before: np.ndarray, res: T.TamperResult) -> None:
    assert res.image.shape == before.shape and res.image.dtype == np.uint8
    assert res.masks, "a forgery has at least one region"
    union = np.zeros(before.shape[:2], bool)
    for m in res.masks:
        assert m.shape == before.shape[:2] and m.dtype == np.uint8
        assert set(np.unique(m)) <= {0, 255}
        assert m.any()
        assert not (union & (m > 0)).any(), "regions must not overlap"
        union |= m > 0
    outside = ~union
    assert np.array_equal(res.image[outside], before[outside]), "pixels changed outside the mask"
    assert np.any(res.image[union] != before[union]), "the masked region must really change"
    assert res.cues and all(isinstance(c, str) for c in res.cues)


@pytest.mark.parametrize("shape", T.SHAPES)
def test_splice_every_shape_is_exact(pair, shape):
    a, b = pair
    for seed in range(4):
        _check(a, T.splice(a, b, np.random.default_rng(seed), shape=shape, regions=1 + seed % 2))


@pytest.mark.parametrize("border", ["hard", "feather", "poisson"])
def test_splice_borders_and_cues(pair, border):
    a, b = pair
    res = T.splice(a, b, np.random.default_rng(5), shape="blob", border=border)
    _check(a, res)
    assert ("edges" in res.cues) == (border == "hard")


def test_copy_move_duplicates_content(pair):
    a, _ = pair
    for seed in range(6):
        res = T.copy_move(a, np.random.default_rng(seed))
        _check(a, res)
        assert "duplicated" in res.cues
        p = res.params["regions"][0]
        x0, y0, x1, y1 = p["source_bbox"]
        mask = res.masks[0] > 0
        assert not mask[y0:y1, x0:x1].all(), "the copy must land away from its source"
        if p["scale"] == 1.0 and p["angle"] == 0.0 and not p["flip"]:
            # A pure translation: the pasted pixels are a shifted copy of the source.
            assert res.image[mask].std() > 0


@pytest.mark.parametrize("method", ["telea", "ns", "patch"])
def test_removal_methods(pair, method):
    a, _ = pair
    res = T.removal(a, np.random.default_rng(3), method=method, regions=2)
    _check(a, res)
    assert len(res.masks) == 2
    assert {"smudged", "duplicated"} & set(res.cues)


@pytest.mark.parametrize("mode", ["regenerate", "replace"])
def test_aigc_edit_changes_noise_profile(pair, mode):
    a, _ = pair
    res = T.aigc_edit(a, np.random.default_rng(2), mode=mode)
    _check(a, res)
    assert "noise_texture" in res.cues


@pytest.mark.skipif(not STAMPS, reason="Debian tuxpaint-stamps-default is not installed (no object cut-outs)")
def test_object_splice_uses_the_cutout_alpha(pair):
    a, _ = pair
    stamp = load_rgba(STAMPS[0])
    res = T.splice_object(a, stamp, np.random.default_rng(1), border="hard", colour_match=False)
    _check(a, res)
    assert "shadows" in res.cues and "edges" in res.cues
    assert res.params["regions"][0]["shape"] == "object"


def test_same_seed_same_forgery(pair):
    a, b = pair
    for fn in (lambda r: T.splice(a, b, r), lambda r: T.copy_move(a, r), lambda r: T.removal(a, r),
               lambda r: T.aigc_edit(a, r)):
        r1, r2 = fn(np.random.default_rng(9)), fn(np.random.default_rng(9))
        assert np.array_equal(r1.image, r2.image)
        assert all(np.array_equal(m1, m2) for m1, m2 in zip(r1.masks, r2.masks))
        assert r1.params == r2.params and r1.cues == r2.cues


def test_post_process_keeps_masks_binary_and_aligned(pair):
    a, b = pair
    res = T.splice(a, b, np.random.default_rng(0))
    seen = set()
    for seed in range(30):
        img, masks, post = T.post_process(res.image, res.masks, np.random.default_rng(seed))
        seen.update(p["op"] for p in post)
        for m in masks:
            assert m.shape == img.shape[:2] and set(np.unique(m)) <= {0, 255}
        if any(p["op"] == "resize" for p in post):
            assert img.shape[0] < a.shape[0]
        else:
            assert img.shape == a.shape
        if post and post[-1]["op"] == "jpeg":
            assert 60 <= post[-1]["quality"] <= 95
    assert seen == set(T.POST_OPS)
    img, masks, post = T.post_process(res.image, res.masks, np.random.default_rng(0), ops=())
    assert post == [] and img is res.image
