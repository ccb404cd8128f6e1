"""Copy-move evidence: a part of the image that appears a second time elsewhere in it.

``find_duplicate(rgb)`` looks for one region copied within the image (moved, and possibly scaled, rotated or
mirrored) and returns the two matching regions, or None. It follows the classic keypoint method of
copy-move forensics (keypoint matching within one image, as in Amerini et al. 2011, then a dense check of
the fitted transform, as in Pan & Lyu 2010):

1. SIFT keypoints and descriptors of the grey image, worked on at ``WORK_SIDE`` px on the longer side, and
   descriptors of its mirror image, so that a flipped copy matches too;
2. each keypoint's nearest other descriptor, kept when it passes the ratio test against the second nearest
   (generalised 2NN) and lies at least ``MIN_SHIFT`` of the image's longer side away;
3. one affine transform fitted to those pairs by RANSAC (pairs in both directions, so that either copy can
   be the source); its inliers are the evidence's strength;
4. the two regions: the pixels where the image and the image warped by the transform (or by its inverse)
   correlate locally (zero-mean normalised cross-correlation over a small window) and have texture.

Which of the two regions is the pasted copy is not decided here: the tampering map of the auxiliary heads
decides it (``Assistant``), since a pasted copy's borders and resampling are what it was trained to see.

Hand-written on OpenCV because no well-kept library does copy-move detection: OpenCV supplies every step's
primitive (SIFT, brute-force kNN matching, ``estimateAffine2D``, ``warpAffine``, box filters), and this
module only puts them in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

WORK_SIDE = 448
"""The longer side (px) the search works at: small images are upsampled (more keypoints in a small copy),
large ones downsampled (bounded time, about 0.3 s on one CPU core)."""
RATIO = 0.6
"""Ratio test: the nearest descriptor must be this much closer than the second nearest."""
MIN_SHIFT = 0.045
"""Pairs closer than this fraction of the longer side are a keypoint matching its own neighbourhood."""
RANSAC_PX = 3.0
"""RANSAC reprojection threshold, in px of the original image's scale (at ``WORK_SIDE`` it is scaled)."""
MIN_INLIERS = 5
"""Fewer inliers than this are no evidence at all (``find_duplicate`` returns None)."""
NCC_WINDOW = 7
NCC_MIN = 0.8
"""The dense check: a pixel belongs to a copy where the local correlation with its match is at least this."""
MIN_TEXTURE = 4.0
"""... and its window's grey-level variance at least this: flat sky matches anything and proves nothing."""
MIN_AREA = 0.001
"""A region smaller than this fraction of the image is not a copy (``strength`` reads it as none)."""
MAX_OVERLAP = 0.3
"""Two "copies" that overlap this much (intersection over union) are one region matching itself: a
mirror-symmetric object, or a periodic texture shifted by one period (a lattice, a row of windows, solar
panels). A pasted copy lies apart from its source. On loupe-smol's forgery validation split all 4 authentic
photos with 15 or more agreeing pairs had an overlap of 0.34 or more; of the 33 copy-moves with as many, 31
had 0.01 or less, one 0.21 and one 0.99 (a small mirror match, not the pasted copy)."""
MIN_EVIDENCE = 15
"""``strength`` counts a duplicate from this many agreeing pairs. On loupe-smol's forgery validation split,
15 or more came up on 2% of authentic photos (symmetry, repeated texture), 65% of copy-moves and 43% of removals
filled from elsewhere in the photo; at 6 or more, on 30% of authentic photos."""

_sift = None


@dataclass
class Duplicate:
    """One region found twice. ``first``: where ``image(x)`` matches ``image(T^-1 x)``, i.e. the region as
    the transform ``T`` carries it; ``second``: its source, where ``image(x)`` matches ``image(T x)``. Both
    are bool masks at the image's size. Which one was pasted is not known here."""

    inliers: int
    pairs: int
    transform: np.ndarray  # (2, 3) affine map at the image's own scale
    first: np.ndarray
    second: np.ndarray

    @property
    def area(self) -> float:
        return float((self.first | self.second).mean())

    @property
    def overlap(self) -> float:
        """Intersection over union of the two regions."""
        return float((self.first & self.second).sum() / max(1, (self.first | self.second).sum()))


def strength(dup: Duplicate | None) -> float:
    """The copy-move evidence as one number for a verdict: ``log(1 + inliers)`` of a duplicate with at least
    ``MIN_EVIDENCE`` inliers whose two regions the dense check found, apart (``MAX_OVERLAP``), else 0."""
    if not found(dup):
        return 0.0
    return float(np.log1p(dup.inliers))


def found(dup: Duplicate | None) -> bool:
    """Whether ``dup`` counts as copy-move evidence (see ``strength``)."""
    return (dup is not None and dup.inliers >= MIN_EVIDENCE
            and bool(dup.first.mean() >= MIN_AREA) and bool(dup.second.mean() >= MIN_AREA)
            and dup.overlap < MAX_OVERLAP)


def _detector() -> cv2.SIFT:
    global _sift
    if _sift is None:
        # low contrast threshold: a small copied region has few strong corners
        _sift = cv2.SIFT_create(contrastThreshold=0.01, edgeThreshold=15)
    return _sift


def _pairs(grey: np.ndarray, min_shift: float) -> tuple[np.ndarray, np.ndarray]:
    """Matched keypoint positions (a, b) (n, 2), in ``grey``'s pixels: same-image and mirrored matches."""
    sift = _detector()
    kp, des = sift.detectAndCompute(grey, None)
    empty = np.zeros((0, 2), np.float32)
    if des is None or len(kp) < 3:
        return empty, empty
    pts = np.array([k.pt for k in kp], np.float32)
    w = grey.shape[1]
    kpm, desm = sift.detectAndCompute(np.ascontiguousarray(grey[:, ::-1]), None)
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    a: list[np.ndarray] = []
    b: list[np.ndarray] = []

    def keep(matches, targets: np.ndarray, skip_self: bool) -> None:
        for m in matches:
            if skip_self:
                m = [x for x in m if x.trainIdx != x.queryIdx]
            if len(m) >= 2 and m[0].distance < RATIO * m[1].distance:
                p, q = pts[m[0].queryIdx], targets[m[0].trainIdx]
                if float(np.hypot(*(p - q))) >= min_shift:
                    a.append(p)
                    b.append(q)

    keep(matcher.knnMatch(des, des, k=3), pts, skip_self=True)
    if desm is not None and len(kpm) >= 2:
        mirrored = np.array([k.pt for k in kpm], np.float32)
        mirrored[:, 0] = w - 1 - mirrored[:, 0]  # back to the image's coordinates
        keep(matcher.knnMatch(des, desm, k=2), mirrored, skip_self=False)
    if not a:
        return empty, empty
    return np.array(a, np.float32), np.array(b, np.float32)


def _region(grey: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Where ``grey(x)`` correlates with ``grey(T^-1 x)`` (``warpAffine`` by T) and has texture: bool (H, W)."""
    h, w = grey.shape
    warped = cv2.warpAffine(grey, transform, (w, h), flags=cv2.INTER_LINEAR)
    inside = cv2.warpAffine(np.ones_like(grey), transform, (w, h), flags=cv2.INTER_NEAREST) > 0
    k = (NCC_WINDOW, NCC_WINDOW)
    mu1, mu2 = cv2.blur(grey, k), cv2.blur(warped, k)
    v1 = cv2.blur(grey * grey, k) - mu1 * mu1
    v2 = cv2.blur(warped * warped, k) - mu2 * mu2
    ncc = (cv2.blur(grey * warped, k) - mu1 * mu2) / np.sqrt(np.maximum(v1 * v2, 1e-6))
    ok = ((ncc >= NCC_MIN) & inside & (v1 >= MIN_TEXTURE)).astype(np.uint8)
    ok = cv2.morphologyEx(ok, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    ok = cv2.morphologyEx(ok, cv2.MORPH_CLOSE, np.ones((NCC_WINDOW, NCC_WINDOW), np.uint8))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(ok)
    if n <= 1:
        return np.zeros((h, w), bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    # the copy is one or a few large components; scattered small matches are texture coincidences
    big = np.flatnonzero(areas >= max(30, 0.3 * areas.max())) + 1
    return np.isin(labels, big)


def find_duplicate(image: np.ndarray) -> Duplicate | None:
    """The strongest copy-move pair in ``image`` (RGB or grey uint8, (H, W[, 3])), or None when fewer than
    ``MIN_INLIERS`` keypoint pairs agree on one transform."""
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    h, w = image.shape
    s = WORK_SIDE / max(h, w)
    size = (max(8, round(w * s)), max(8, round(h * s)))
    work = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if s > 1 else cv2.INTER_AREA)
    a, b = _pairs(work, MIN_SHIFT * WORK_SIDE)
    if len(a) < MIN_INLIERS:
        return None
    # both directions, so that RANSAC finds one map whichever copy each pair starts from
    t, inl = cv2.estimateAffine2D(np.vstack([a, b]), np.vstack([b, a]), ransacReprojThreshold=RANSAC_PX * max(s, 1.0),
                                  maxIters=4000, confidence=0.995)
    if t is None or int(inl.sum()) < MIN_INLIERS:
        return None
    # back to the image's own scale: x_img = x_work / s
    t = t.astype(np.float64)
    t[:, 2] /= s
    grey = image.astype(np.float32)
    return Duplicate(inliers=int(inl.sum()), pairs=len(a), transform=t,
                     first=_region(grey, t), second=_region(grey, cv2.invertAffineTransform(t)))
