"""Copy-move evidence (assistant/duplication.py): a region found twice in an image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from loupe_vlm.assistant import duplication as D


def _texture(h: int = 224, w: int = 224, seed: int = 0) -> np.ndarray:
    """A photo-like RGB texture: noise summed over several scales, so every patch looks different."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    for sigma, weight in ((8, 1.0), (3, 0.6), (1, 0.4)):
        layer = cv2.GaussianBlur(rng.normal(size=(h, w)).astype(np.float32), (0, 0), sigma)
        img += weight * layer / layer.std()
    img = (img - img.min()) / (img.max() - img.min()) * 255
    grey = img.astype(np.uint8)
    return np.stack([grey, (grey * 0.8 + 20).astype(np.uint8), (255 - grey * 0.5).astype(np.uint8)], -1)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _paste(img: np.ndarray, src: tuple[int, int], dst: tuple[int, int], size: int, flip: bool = False,
           angle: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``img`` with its ``size``-px square at ``src`` (x, y) copied to ``dst`` (optionally mirrored and turned
    about its centre); returns (image, source mask, pasted mask)."""
    out = img.copy()
    (sx, sy), (dx, dy) = src, dst
    patch = img[sy:sy + size, sx:sx + size]
    if flip:
        patch = patch[:, ::-1]
    if angle:
        m = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle, 1.0)
        patch = cv2.warpAffine(np.ascontiguousarray(patch), m, (size, size), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT)
    out[dy:dy + size, dx:dx + size] = patch
    src_mask = np.zeros(img.shape[:2], bool)
    src_mask[sy:sy + size, sx:sx + size] = True
    dst_mask = np.zeros(img.shape[:2], bool)
    dst_mask[dy:dy + size, dx:dx + size] = True
    return out, src_mask, dst_mask


@pytest.mark.parametrize("flip, angle", [(False, 0.0), (True, 0.0), (False, 25.0)])
def test_a_copied_region_is_found_with_both_copies(flip, angle):
    img, src, dst = _paste(_texture(), (20, 30), (130, 120), 60, flip=flip, angle=angle)
    dup = D.find_duplicate(img)
    assert dup is not None and D.found(dup) and dup.inliers >= D.MIN_EVIDENCE
    assert D.strength(dup) == pytest.approx(np.log1p(dup.inliers))
    # the two regions are the source and the pasted copy, in one order or the other
    pairs = [(_iou(dup.first, dst), _iou(dup.second, src)), (_iou(dup.first, src), _iou(dup.second, dst))]
    best = max(pairs, key=min)
    assert min(best) > 0.4, pairs
    # the transform carries the source onto the copy (or back): its translation is about the shift
    shift = np.abs(dup.transform[:, 2]) if not flip and not angle else None
    if shift is not None:
        assert np.allclose(sorted(shift), sorted([110, 90]), atol=4), dup.transform


def test_an_untouched_image_shows_no_copy_move_evidence():
    for seed in range(3):
        assert D.strength(D.find_duplicate(_texture(seed=seed))) == 0.0


def test_flat_grey_and_large_images_are_handled():
    assert D.find_duplicate(np.full((64, 80, 3), 128, np.uint8)) is None  # no keypoints at all
    big, _, dst = _paste(cv2.resize(_texture(), (900, 700), interpolation=cv2.INTER_CUBIC), (60, 60), (500, 380), 240)
    dup = D.find_duplicate(big)  # worked on at WORK_SIDE px, answered at the image's size
    assert dup is not None and dup.first.shape == (700, 900) and D.found(dup)
    assert max(_iou(dup.first, dst), _iou(dup.second, dst)) > 0.4
    grey = D.find_duplicate(cv2.cvtColor(_paste(_texture(), (20, 30), (130, 120), 60)[0], cv2.COLOR_RGB2GRAY))
    assert grey is not None and D.found(grey)


def test_weak_or_regionless_matches_are_no_evidence():
    h, w = 50, 60
    region, other, shifted = np.zeros((h, w), bool), np.zeros((h, w), bool), np.zeros((h, w), bool)
    region[10:30, 10:30] = True
    other[20:40, 35:55] = True
    shifted[10:30, 14:34] = True  # the same place moved by a fifth of its width: IoU 0.67
    t = np.eye(2, 3)
    assert D.strength(None) == 0.0 and not D.found(None)
    assert D.found(D.Duplicate(D.MIN_EVIDENCE, 40, t, region, other))
    assert not D.found(D.Duplicate(D.MIN_EVIDENCE - 1, 40, t, region, other))  # too few agreeing pairs
    assert not D.found(D.Duplicate(99, 120, t, region, np.zeros((h, w), bool)))  # the dense check found no copy
    assert not D.found(D.Duplicate(99, 120, t, region, shifted))  # a region matching itself: texture, symmetry
    assert D.Duplicate(99, 120, t, region, shifted).overlap == pytest.approx(2 / 3)
    assert D.strength(D.Duplicate(99, 120, t, region, other)) == pytest.approx(np.log(100))


def test_a_mirror_symmetric_photo_is_no_copy_move():
    img = _texture()
    img[:, 112:] = img[:, :112][:, ::-1]  # the right half mirrors the left, as a butterfly's wings do
    dup = D.find_duplicate(img)
    assert dup is not None and dup.inliers >= D.MIN_EVIDENCE  # the halves do match ...
    assert dup.overlap >= D.MAX_OVERLAP and D.strength(dup) == 0.0  # ... but as one region matching itself
