"""Full-reference evidence: what a distorted image changed, read against its pristine reference.

When a question comes with a reference image ("Compared with the reference, ..."), the difference between
the two says far more than the judged image alone: a brightened photo is brighter than its reference, a
blurred one has less fine detail, a JPEG one has 8-pixel block edges the reference lacks. loupe-smol's heads
judge each image alone and call half of the slight distortions clean; read against the reference, the same
images are told apart almost always.

``reference_features(reference, image)`` measures FEATURES, a handful of classic full-reference numbers
(PSNR and SSIM from scikit-image, and tonal, colour, detail, blockiness and palette changes from OpenCV and
numpy). ``ReferenceModel`` maps them to

* the distortion category, or clean, and the rating word (softmax regressions);
* the worst severity (0 for clean to 5) and a MOS-like quality from 1 to 5 (ridge regressions),

fitted on a training split's labelled pairs by ``loupe train reference`` and saved with the checkpoint as
``reference.safetensors`` (``REFERENCE_FILE``). The assistant then lets these readings guide the answer
where a reference is given (``assistant/guidance.py``): its distortion and severity words, its rating, and a
comparison's verdict.

Hand-written: no library maps such pairs to a distortion taxonomy; the measurements themselves are
OpenCV's and scikit-image's, and the fit is a few lines of scipy (scikit-learn is not a dependency).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..prompts.taxonomy import CATEGORIES, RATINGS

REFERENCE_FILE = "reference.safetensors"
FORMAT = "loupe-reference-1"

CLASSES = tuple(CATEGORIES.ids) + ("clean",)
"""What the category model tells apart: every distortion category, then "clean" (no visible change)."""

RATING_IDS = tuple(r.id for r in RATINGS)
"""What the rating model tells apart: the rating words, best first."""

FEATURES = ("lightness_shift", "lightness_spread", "chroma", "detail", "detail_direction", "detail_residual",
            "blockiness", "flat_neighbours", "palette", "psnr", "ssim", "coarse_change", "highlights", "shadows",
            "detail_gain")
"""What ``reference_features`` measures, in order (see there)."""

WORK_SIDE = 224
"""Both images are compared at most this size on the longer side (the size of the builders' training images
and of what loupe-smol's heads see), so the detail measures mean the same at any input size."""

PSNR_CAP = 60.0
"""PSNR of identical images is infinite; it is capped here (60 dB is far beyond any visible change)."""

MIN_PAIRS = 30


class ReferenceError(ValueError):
    pass


def _fit_size(rgb: np.ndarray, side: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def distinct_colours(rgb: np.ndarray) -> int:
    """The number of distinct RGB triples of a uint8 image (each packed into one integer: ``np.unique`` over
    rows sorts ten times slower)."""
    x = rgb.reshape(-1, 3).astype(np.int32)
    return len(np.unique((x[:, 0] << 16) | (x[:, 1] << 8) | x[:, 2]))


def reference_features(reference: np.ndarray, image: np.ndarray) -> np.ndarray:
    """FEATURES of ``image`` against its ``reference`` (both uint8 RGB, H x W x 3; the image is resized to
    the reference's size, both to at most WORK_SIDE):

    * lightness_shift, lightness_spread, chroma: the change of mean Lab lightness, log ratio of its spread,
      log ratio of mean chroma (brighten/darken, contrast, saturation);
    * detail, detail_direction, detail_residual, detail_gain: fine detail (the grey image minus its blur):
      log ratio of its energy, correlation of its change with the reference's detail (blur removes it,
      sharpening adds to it), what remains of it that is not a scaled copy of the reference's (noise,
      artefacts), and that scale;
    * blockiness: how much stronger the edges on the 8-pixel grid became (JPEG);
    * flat_neighbours: the change of the share of equal neighbouring pixels (pixelation);
    * palette: log ratio of distinct colours (quantisation);
    * psnr (capped at PSNR_CAP), ssim, coarse_change (mean change of blurred lightness), and the change of the
      95th and 5th lightness percentiles (highlights, shadows)."""
    import cv2
    from skimage.metrics import structural_similarity

    reference = _fit_size(np.ascontiguousarray(reference[..., :3], dtype=np.uint8), WORK_SIDE)
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    if image.shape[:2] != reference.shape[:2]:
        image = cv2.resize(image, (reference.shape[1], reference.shape[0]), interpolation=cv2.INTER_AREA)
    if min(reference.shape[:2]) < 16:
        raise ReferenceError(f"the reference is {reference.shape[1]}x{reference.shape[0]} px; at least 16x16 is needed")
    r = reference.astype(np.float32) / 255
    x = image.astype(np.float32) / 255
    lab_r, lab_x = cv2.cvtColor(r, cv2.COLOR_RGB2LAB), cv2.cvtColor(x, cv2.COLOR_RGB2LAB)
    lr, lx = lab_r[..., 0], lab_x[..., 0]
    chroma_r = np.hypot(lab_r[..., 1], lab_r[..., 2]).mean() + 1
    chroma_x = np.hypot(lab_x[..., 1], lab_x[..., 2]).mean() + 1
    mse = float(((r - x) ** 2).mean())
    psnr = min(PSNR_CAP, 10 * np.log10(1 / max(mse, 1e-12)))
    gr = cv2.cvtColor(reference, cv2.COLOR_RGB2GRAY).astype(np.float32)
    gx = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    ssim = structural_similarity(gr, gx, data_range=255, win_size=min(7, min(gr.shape) // 2 * 2 - 1))
    hr = gr - cv2.GaussianBlur(gr, (0, 0), 1.5)
    hx = gx - cv2.GaussianBlur(gx, (0, 0), 1.5)
    er, ex = hr.std() + 1e-3, hx.std() + 1e-3
    change = hx - hr
    direction = float((change * hr).mean() / (er * (change.std() + 1e-3)))
    gain = float((hx * hr).mean() / er ** 2)
    residual = (hx - gain * hr).std() / er
    dx, dr = np.abs(np.diff(gx, axis=1)), np.abs(np.diff(gr, axis=1))
    blockiness = (np.log((dx[:, 7::8].mean() + 1e-3) / (dx.mean() + 1e-3))
                  - np.log((dr[:, 7::8].mean() + 1e-3) / (dr.mean() + 1e-3)))
    flat = float((dx < 0.5).mean() - (dr < 0.5).mean())

    palette = np.log(distinct_colours(image // 4) + 1) - np.log(distinct_colours(reference // 4) + 1)
    coarse = np.abs(cv2.GaussianBlur(lx, (0, 0), 4) - cv2.GaussianBlur(lr, (0, 0), 4)).mean()
    out = [lx.mean() - lr.mean(), np.log((lx.std() + 1) / (lr.std() + 1)), np.log(chroma_x / chroma_r),
           np.log(ex / er), direction, np.log(residual + 1e-3), blockiness, flat, palette, psnr, ssim, coarse,
           np.percentile(lx, 95) - np.percentile(lr, 95), np.percentile(lx, 5) - np.percentile(lr, 5), gain]
    return np.asarray(out, dtype=np.float64)


def _expand(z: np.ndarray) -> np.ndarray:
    """The standardised features, their squares and absolute values: a change in either direction, and a
    large one, each get a weight of their own (a darkened and a brightened image both differ)."""
    return np.concatenate([z, z ** 2, np.abs(z)], axis=-1)


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(1, keepdims=True)
    p = np.exp(s)
    return p / p.sum(1, keepdims=True)


def _softmax_fit(a: np.ndarray, labels: Sequence[int | None], k: int, l2: float, what: str) -> np.ndarray:
    """Weights (d, k) of an L2-penalised softmax regression of the rows of ``a`` (N, d; last column ones,
    whose weights are not shrunk) with a label; None labels are left out."""
    from scipy.optimize import minimize

    keep = np.array([c is not None for c in labels], dtype=bool)
    x, y = a[keep], np.eye(k)[[c for c in labels if c is not None]]
    if len(x) < MIN_PAIRS or (y.sum(0) > 0).sum() < 2:
        raise ReferenceError(f"{len(x)} labelled pairs of {int((y.sum(0) > 0).sum())} classes for {what}; "
                             f"the fit needs at least {MIN_PAIRS} of two classes or more")
    d = a.shape[1]
    penalty = np.ones((d, 1))
    penalty[-1] = 0.0

    def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
        wm = w.reshape(d, k)
        s = x @ wm
        s -= s.max(1, keepdims=True)
        logp = s - np.log(np.exp(s).sum(1, keepdims=True))
        grad = x.T @ (np.exp(logp) - y) / len(x) + l2 * penalty * wm
        return float(-(logp * y).sum(1).mean() + 0.5 * l2 * (penalty * wm ** 2).sum()), grad.ravel()

    return minimize(objective, np.zeros(d * k), jac=True, method="L-BFGS-B", options={"maxiter": 3000}).x.reshape(d, k)


@dataclass
class ReferenceCue:
    """A reading model's reading of one judged image (``ReferenceModel``, or ``NoReferenceModel`` in
    ``assistant/noreference.py``)."""

    p_category: np.ndarray  # (len(CATEGORIES),): P(each distortion category); 1 - their sum is P(clean)
    p_clean: float
    severity: float  # predicted worst severity, 0 (clean) .. 5
    mos: float  # predicted quality 1 (bad) .. 5 (excellent), the scale of ``rating_value``
    p_rating: np.ndarray  # (len(RATING_IDS),): P(each rating word)
    mos_raw: float  # the quality reading before clipping to 1..5: two bad images still rank

    @property
    def category(self) -> str:
        k = int(np.argmax(np.r_[self.p_category, self.p_clean]))
        return CLASSES[k]


class ReadingModel:
    """Features -> category and rating (softmax regressions), worst severity and MOS (ridge regressions).
    Subclasses name their FEATURES, the safetensors FORMAT and the command that fits them (REFIT)."""

    FEATURES: tuple[str, ...] = ()
    FORMAT = ""
    REFIT = ""
    TENSORS = ("feature_mean", "feature_std", "expanded_mean", "expanded_std", "category_weight", "rating_weight",
               "severity_weight", "mos_weight")

    def __init__(self, feature_mean: np.ndarray, feature_std: np.ndarray, expanded_mean: np.ndarray,
                 expanded_std: np.ndarray, category_weight: np.ndarray, rating_weight: np.ndarray,
                 severity_weight: np.ndarray, mos_weight: np.ndarray):
        self.feature_mean, self.feature_std = feature_mean, feature_std
        self.expanded_mean, self.expanded_std = expanded_mean, expanded_std
        self.category_weight, self.rating_weight = category_weight, rating_weight
        self.severity_weight, self.mos_weight = severity_weight, mos_weight
        f = len(self.FEATURES)
        d = 3 * f + 1
        shapes = {"feature_mean": (feature_mean.shape, (f,)), "feature_std": (feature_std.shape, (f,)),
                  "expanded_mean": (expanded_mean.shape, (d - 1,)), "expanded_std": (expanded_std.shape, (d - 1,)),
                  "category_weight": (category_weight.shape, (d, len(CLASSES))),
                  "rating_weight": (rating_weight.shape, (d, len(RATING_IDS))),
                  "severity_weight": (severity_weight.shape, (d,)), "mos_weight": (mos_weight.shape, (d,))}
        bad = [f"{k} {tuple(got)} (expected {want})" for k, (got, want) in shapes.items() if tuple(got) != want]
        if bad:
            raise ReferenceError(f"{self.FORMAT} tensors of the wrong shape: " + ", ".join(bad))

    def _design(self, features: np.ndarray) -> np.ndarray:
        z = _expand((np.atleast_2d(features) - self.feature_mean) / self.feature_std)
        z = (z - self.expanded_mean) / self.expanded_std
        return np.concatenate([z, np.ones((len(z), 1))], axis=1)

    def predict(self, features: np.ndarray) -> list[ReferenceCue]:
        """One ``ReferenceCue`` per row of ``features`` (N, len(FEATURES)) or for one vector."""
        a = self._design(np.asarray(features, dtype=np.float64))
        p, pr = _softmax(a @ self.category_weight), _softmax(a @ self.rating_weight)
        sev = np.clip(a @ self.severity_weight, 0.0, 5.0)
        raw = a @ self.mos_weight
        mos = np.clip(raw, 1.0, 5.0)
        return [ReferenceCue(p[i, :-1], float(p[i, -1]), float(sev[i]), float(mos[i]), pr[i], float(raw[i]))
                for i in range(len(a))]

    # ---- fit / save / load ---------------------------------------------------------------------
    @classmethod
    def fit(cls, features: np.ndarray, classes: Sequence[int | None], severity: Sequence[float],
            mos: Sequence[float], ratings: Sequence[int | None], category_l2: float = 1e-3,
            regression_l2: float = 10.0) -> "ReadingModel":
        """Fit on labelled images: ``features`` (N, F); ``classes`` each image's index in CLASSES, or None for
        one with several distortions (left out of the category model only); ``severity`` the worst
        severity (0 clean); ``mos`` the quality 1..5; ``ratings`` the index in RATING_IDS or None (unknown).
        L2 weights: chosen on loupe-smol's quality validation split (``loupe train reference`` and ``loupe
        train noreference`` print the figures)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(cls.FEATURES) or len(x) < MIN_PAIRS:
            raise ReferenceError(f"{len(x)} labelled images for the {cls.FORMAT} fit; it needs at least {MIN_PAIRS}")
        mean, std = x.mean(0), x.std(0) + 1e-9
        z = _expand((x - mean) / std)
        emean, estd = z.mean(0), z.std(0) + 1e-9
        a = np.concatenate([(z - emean) / estd, np.ones((len(z), 1))], axis=1)
        w_cat = _softmax_fit(a, classes, len(CLASSES), category_l2, "the category model (one distortion or none)")
        w_rating = _softmax_fit(a, ratings, len(RATING_IDS), category_l2, "the rating model")
        penalty = np.ones(a.shape[1])
        penalty[-1] = 0.0  # the intercept is not shrunk
        ridge = a.T @ a + regression_l2 * np.diag(penalty)
        w_sev = np.linalg.solve(ridge, a.T @ np.asarray(severity, dtype=np.float64))
        w_mos = np.linalg.solve(ridge, a.T @ np.asarray(mos, dtype=np.float64))
        return cls(mean, std, emean, estd, w_cat, w_rating, w_sev, w_mos)

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {k: np.ascontiguousarray(getattr(self, k), dtype=np.float32) for k in self.TENSORS}
        save_file(tensors, str(path), metadata={"format": self.FORMAT, "classes": json.dumps(CLASSES),
                                               "ratings": json.dumps(RATING_IDS),
                                               "features": json.dumps(self.FEATURES)})

    @classmethod
    def load(cls, path: str | Path) -> "ReadingModel":
        """Read a saved model; a file of another format, classes or features is refused."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k).astype(np.float64) for k in f.keys()}
        except Exception as exc:  # safetensors' own error type is not an OSError or ValueError
            raise ReferenceError(f"{path}: not a readable safetensors file ({exc}); refit it with "
                                 f"{cls.REFIT}") from None
        if meta.get("format") != cls.FORMAT or json.loads(meta.get("classes", "[]")) != list(CLASSES) \
                or json.loads(meta.get("ratings", "[]")) != list(RATING_IDS) \
                or json.loads(meta.get("features", "[]")) != list(cls.FEATURES):
            raise ReferenceError(f"{path}: a reading model of another format, taxonomy or feature set (this needs "
                                 f"{cls.FORMAT}); refit it with {cls.REFIT}")
        if sorted(tensors) != sorted(cls.TENSORS):
            raise ReferenceError(f"{path}: tensors {sorted(tensors)} are not a {cls.FORMAT} model's; refit it with "
                                 f"{cls.REFIT}")
        return cls(**tensors)


class ReferenceModel(ReadingModel):
    """FEATURES of a (reference, image) pair -> the readings (``ReadingModel``)."""

    FEATURES = FEATURES
    FORMAT = FORMAT
    REFIT = "loupe train reference"

    def judge(self, reference: np.ndarray, image: np.ndarray) -> ReferenceCue:
        """The reading of ``image`` against ``reference`` (uint8 RGB arrays)."""
        return self.predict(reference_features(reference, image))[0]


def load_reference_model(checkpoint: str | Path) -> ReferenceModel | None:
    """The checkpoint's reference model, or None where it has none."""
    path = Path(checkpoint) / REFERENCE_FILE
    return ReferenceModel.load(path) if path.is_file() else None


def labelled_images(sample: Any) -> list[tuple[int, list[dict], str | None]]:
    """The labelled (image index, distortions, rating or None) of one quality record, as the builders label
    them: a reference image is clean (its rating unstated); the judged image has ``meta.distortions`` and
    ``meta.rating``; a comparison's A and B have ``distortions_A`` / ``distortions_B`` and ``rating_A`` /
    ``rating_B``."""
    roles, meta = list(sample.image_roles), sample.meta or {}
    out: list[tuple[int, list[dict], str | None]] = []
    if "reference" in roles:
        out.append((roles.index("reference"), [], None))
    if sample.task in ("quality.assess", "quality.identify"):
        if isinstance(meta.get("distortions"), list):
            out.append((len(roles) - 1, meta["distortions"], meta.get("rating")))
    elif sample.task in ("quality.compare", "quality.rate"):
        out += [(roles.index(k), meta[f"distortions_{k}"], meta.get(f"rating_{k}")) for k in ("A", "B")
                if k in roles and isinstance(meta.get(f"distortions_{k}"), list)]
    return out


def pairs_of(sample: Any) -> list[tuple[int, int, list[dict], str | None]]:
    """The labelled (reference index, image index, distortions, rating or None) pairs of one quality record
    with a reference image: each of its ``labelled_images`` but the reference itself."""
    roles = list(sample.image_roles)
    if "reference" not in roles:
        return []
    ref = roles.index("reference")
    return [(ref, i, dists, rating) for i, dists, rating in labelled_images(sample) if i != ref]


def labels_of(distortions: Sequence[dict], rating: str | None = None) -> tuple[int | None, float, float, int | None]:
    """(class index in CLASSES or None for several distortions, worst severity, MOS, rating index in RATING_IDS
    or None) of a distortion list and rating. The MOS is ``loupe eval``'s rule (``prompts.taxonomy.severity_mos``)."""
    from ..prompts.taxonomy import severity_mos

    levels = [int(d["severity"]) for d in distortions if d.get("severity") is not None]
    if not distortions:
        cls: int | None = CLASSES.index("clean")
    elif len(distortions) == 1 and distortions[0].get("category") in CLASSES:
        cls = CLASSES.index(distortions[0]["category"])
    else:
        cls = None
    return (cls, float(max(levels, default=0)), severity_mos(distortions),
            RATING_IDS.index(rating) if rating in RATING_IDS else None)
