"""Evaluation metrics for Loupe: pure numpy/scipy functions over predictions and ground truth.

Each function takes plain Python/numpy values (no model, no files) so it can be checked against
hand-computed cases and reused by other tools. Conventions, stated once here and in the report:

* **Localisation** follows IMDL-BenCo: pixel-F1 and IoU at a fixed 0.5 threshold, computed *per
  tampered image* and averaged. Empty masks: an empty prediction against a non-empty truth scores
  0; a non-empty prediction against an empty truth scores 0; both empty score 1 (nothing to find,
  nothing claimed). Authentic images are left out of the averages (their masks are empty by
  definition) and reported as a false-positive area instead.
* **Best-threshold pixel-F1** picks, for each image, the threshold that maximises its F1; it is an
  optimistic upper figure and always labelled as such.
* **SRCC/PLCC** are over all items at once (the standard protocol); the per-group variant averages
  the coefficient inside each reference group and is labelled ``per_group``. PLCC is given raw and
  after the usual 4-parameter logistic fit (VQEG).
* **Image-level AUC** is the Mann-Whitney statistic (ties count one half), written here with
  ``scipy.stats.rankdata`` because scikit-learn is not a dependency of Loupe.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import optimize, special, stats

from loupe_vlm.prompts import SEVERITIES
from loupe_vlm.prompts.parsing import parse_better, parse_rating, parse_verdict, repeated_ngram  # noqa: F401 (re-exported)

# ---- small helpers -----------------------------------------------------------------------------


def _mean(values: Iterable[float]) -> float | None:
    vals = [float(v) for v in values]
    return float(np.mean(vals)) if vals else None


def safe_div(a: float, b: float) -> float | None:
    """a / b, or None when b is 0 (a metric over nothing is undefined, not 0)."""
    return None if b == 0 else float(a) / float(b)


# ---- masks -------------------------------------------------------------------------------------


def mask_f1_iou(pred: np.ndarray | None, true: np.ndarray) -> tuple[float, float]:
    """Pixel F1 and IoU of two binary masks of the same shape (``None`` = empty prediction).

    Empty cases: both empty -> (1, 1); exactly one empty -> (0, 0).
    """
    true = np.asarray(true, dtype=bool)
    pred = np.zeros_like(true) if pred is None else np.asarray(pred, dtype=bool)
    if pred.shape != true.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape} vs truth {true.shape}")
    tp = int(np.logical_and(pred, true).sum())
    fp = int(np.logical_and(pred, ~true).sum())
    fn = int(np.logical_and(~pred, true).sum())
    if tp + fp + fn == 0:
        return 1.0, 1.0
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def best_threshold_f1(prob: np.ndarray | None, true: np.ndarray, levels: int = 256) -> float:
    """The highest pixel-F1 over thresholds of a probability map (per-image oracle threshold).

    Thresholds are the ``levels`` quantisation steps of [0, 1] (PNG probability maps hold 256).
    Computed from cumulative histograms so all thresholds cost one pass.
    """
    true = np.asarray(true, dtype=bool)
    if prob is None:
        return mask_f1_iou(None, true)[0]
    prob = np.asarray(prob, dtype=np.float64)
    if prob.shape != true.shape:
        raise ValueError(f"mask shapes differ: prediction {prob.shape} vs truth {true.shape}")
    n_pos = int(true.sum())
    if n_pos == 0:
        return 1.0 if prob.size and prob.min() < 1.0 else 0.0  # a threshold above every pixel predicts nothing
    bins = np.clip((prob * (levels - 1)).round().astype(int), 0, levels - 1)
    pos_hist = np.bincount(bins[true], minlength=levels)
    neg_hist = np.bincount(bins[~true], minlength=levels)
    # predicting "manipulated" for bins >= k: tp/fp are suffix sums
    tp = np.cumsum(pos_hist[::-1])[::-1]
    fp = np.cumsum(neg_hist[::-1])[::-1]
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
    return float(f1.max())


# ---- image-level classification ---------------------------------------------------------------


def roc_auc(y_true: Sequence[bool], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U / (n_pos * n_neg)); None with one class only."""
    y = np.asarray(y_true, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(s)  # average ranks: ties count one half
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_classification(y_true: Sequence[bool], y_pred: Sequence[bool],
                          scores: Sequence[float | None] | None = None) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 of the positive class, balanced accuracy and AUC."""
    y = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    tp = int((y & p).sum())
    tn = int((~y & ~p).sum())
    fp = int((~y & p).sum())
    fn = int((y & ~p).sum())
    tpr, tnr = safe_div(tp, tp + fn), safe_div(tn, tn + fp)
    out: dict[str, Any] = {
        "n": int(y.size), "n_positive": int(y.sum()), "tp": tp, "tn": tn, "fp": fp, "fn": fn,
        "accuracy": safe_div(tp + tn, y.size),
        "precision": safe_div(tp, tp + fp), "recall": tpr, "specificity": tnr,
        "f1": safe_div(2 * tp, 2 * tp + fp + fn),
        "balanced_accuracy": None if tpr is None or tnr is None else (tpr + tnr) / 2,
        "auc": None, "auc_n": 0,
    }
    if scores is not None:
        keep = [i for i, s in enumerate(scores) if s is not None]
        out["auc"] = roc_auc([bool(y[i]) for i in keep], [float(scores[i]) for i in keep])  # type: ignore[arg-type]
        out["auc_n"] = len(keep)
    return out


# ---- correlation -------------------------------------------------------------------------------


def _logistic4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # expit, not 1 / (1 + exp(-z)): the same curve without overflow warnings while the fit explores
    return (b1 - b2) * special.expit((x - b3) / (abs(b4) + 1e-9)) + b2


def plcc_logistic(pred: Sequence[float], true: Sequence[float]) -> float | None:
    """PLCC after mapping predictions through a fitted 4-parameter logistic (VQEG); None if the fit fails."""
    x, y = np.asarray(pred, float), np.asarray(true, float)
    if x.size < 5 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    p0 = [y.max(), y.min(), float(np.mean(x)), float(np.std(x)) or 1.0]
    try:
        with warnings.catch_warnings():  # an unestimable covariance is fine: only the fitted curve is used
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(_logistic4, x, y, p0=p0, maxfev=10000)
    except (RuntimeError, ValueError):
        return None
    fitted = _logistic4(x, *params)
    if np.ptp(fitted) == 0:
        return None
    return float(stats.pearsonr(fitted, y)[0])


def correlation(pred: Sequence[float], true: Sequence[float]) -> dict[str, Any]:
    """Global SRCC and PLCC (raw and logistic-fitted) of predicted scores vs ground truth."""
    x, y = np.asarray(pred, float), np.asarray(true, float)
    out: dict[str, Any] = {"n": int(x.size), "srcc": None, "plcc": None, "plcc_logistic": None}
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out  # a constant has no rank correlation
    out["srcc"] = float(stats.spearmanr(x, y)[0])
    out["plcc"] = float(stats.pearsonr(x, y)[0])
    out["plcc_logistic"] = plcc_logistic(x, y)
    return out


def grouped_correlation(pred: Sequence[float], true: Sequence[float], groups: Sequence[Any],
                        min_size: int = 3) -> dict[str, Any]:
    """Mean SRCC/PLCC inside each group (e.g. all distortions of one reference image).

    Groups with fewer than ``min_size`` items or constant values are skipped and counted.
    """
    by: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    srcc, plcc, skipped = [], [], 0
    for idx in by.values():
        if len(idx) < min_size:
            skipped += 1
            continue
        c = correlation([pred[i] for i in idx], [true[i] for i in idx])
        if c["srcc"] is None:
            skipped += 1
            continue
        srcc.append(c["srcc"])
        plcc.append(c["plcc"])
    return {"n_groups": len(srcc), "groups_skipped": skipped, "srcc": _mean(srcc), "plcc": _mean(plcc)}


# ---- A/B comparison ----------------------------------------------------------------------------


def ab_metrics(p_a: Sequence[float | None], p_a_swapped: Sequence[float | None],
               better: Sequence[str | None], truth: Sequence[str]) -> dict[str, Any]:
    """A/B accuracy as asked, with the pair swapped, and averaged; plus swap consistency.

    ``p_a`` is P(A better) as asked, ``p_a_swapped`` P(A better) read from the swapped run (already
    mapped back to the original A), ``better`` the averaged verdict. Swap consistency is the share
    of pairs with both readings whose verdict names the same image in both orders (a verdict that
    sticks to a *position* flips the image and counts as inconsistent). A missing reading counts
    wrong for accuracy.
    """
    n = len(truth)
    asked = [p is not None and (p >= 0.5) == (t == "A") for p, t in zip(p_a, truth)]
    swapped = [p is not None and (p >= 0.5) == (t == "A") for p, t in zip(p_a_swapped, truth)]
    averaged = [b is not None and b == t for b, t in zip(better, truth)]
    both = [(a >= 0.5) == (b >= 0.5) for a, b in zip(p_a, p_a_swapped) if a is not None and b is not None]
    return {"n": n, "accuracy_as_asked": safe_div(sum(asked), n), "accuracy_swapped": safe_div(sum(swapped), n),
            "accuracy_averaged": safe_div(sum(averaged), n), "swap_consistency": safe_div(sum(both), len(both)),
            "swap_pairs": len(both)}


# ---- distortions -------------------------------------------------------------------------------


def distortion_credit(pred: Sequence[dict], true: Sequence[dict]) -> float:
    """DepictQA-style partial credit for one answer, summed over its matched distortions.

    Each predicted distortion earns 1 if it names a true *function*, 0.5 if only its *category*
    is a true category, else 0; each true distortion is matched at most once (greedy, full matches
    first). Precision = credit / len(pred), recall = credit / len(true).
    """
    remaining = list(true)
    credit = 0.0
    unmatched = []
    for p in pred:
        hit = next((t for t in remaining if p.get("name") and p.get("name") == t.get("name")), None)
        if hit is not None:
            remaining.remove(hit)
            credit += 1.0
        else:
            unmatched.append(p)
    for p in unmatched:
        hit = next((t for t in remaining if p.get("category") == t.get("category")), None)
        if hit is not None:
            remaining.remove(hit)
            credit += 0.5
    return credit


def distortion_metrics(preds: Sequence[Sequence[dict]], trues: Sequence[Sequence[dict]],
                       says_clean: Sequence[bool] | None = None) -> dict[str, Any]:
    """Identification and severity figures over answers whose ground truth lists its distortions.

    * ``category_accuracy``: single-distortion items whose answer names exactly that one category;
    * ``function_accuracy``: single-distortion items whose answer names a function, scored on the
      function (``function_n`` says how many named one);
    * ``set_precision`` / ``set_recall``: multi-distortion items, partial credit (``distortion_credit``);
    * ``clean_accuracy``: distortion-free items whose answer names no distortion and, where
      ``says_clean`` is given (one flag per item: the answer states that the image is clean,
      ``prompts.parsing.states_clean``), also says so; ``clean_names_none`` counts naming none alone,
      which an answer that invents a distortion name ("moderate tonal range") also does;
    * severity over true distortions whose category the answer names with a severity word:
      exact accuracy, mean absolute error in levels (1..5) and share within one level.
    """
    single_cat, single_fn, clean, names_none = [], [], [], []
    prec, rec = [], []
    sev_true, sev_pred = [], []
    sev_candidates = 0
    level = {s.id: s.value for s in SEVERITIES}
    flags = list(says_clean) if says_clean is not None else [True] * len(preds)
    if len(flags) != len(preds):
        raise ValueError(f"says_clean has {len(flags)} flags for {len(preds)} answers")
    for pred, true, said in zip(preds, trues, flags):
        pred_cats = [p["category"] for p in pred]
        if not true:
            names_none.append(len(pred) == 0)
            clean.append(len(pred) == 0 and bool(said))
        elif len(true) == 1:
            single_cat.append(pred_cats == [true[0]["category"]])
            named = [p["name"] for p in pred if p.get("name")]
            if named and true[0].get("name"):
                single_fn.append(named[0] == true[0]["name"])
        else:
            credit = distortion_credit(pred, true)
            prec.append(credit / len(pred) if pred else 0.0)
            rec.append(credit / len(true))
        for t in true:
            sev_candidates += 1
            p = next((p for p in pred if p["category"] == t["category"] and p.get("severity")), None)
            if p is not None and t.get("severity") is not None:
                sev_true.append(int(t["severity"]))
                sev_pred.append(level[p["severity"]])
    st, sp = np.asarray(sev_true), np.asarray(sev_pred)
    return {
        "single_n": len(single_cat), "category_accuracy": _mean(single_cat),
        "function_n": len(single_fn), "function_accuracy": _mean(single_fn),
        "multi_n": len(prec), "set_precision": _mean(prec), "set_recall": _mean(rec),
        "clean_n": len(clean), "clean_accuracy": _mean(clean), "clean_names_none": _mean(names_none),
        "severity_n": int(st.size), "severity_coverage": safe_div(st.size, sev_candidates),
        "severity_accuracy": _mean(st == sp) if st.size else None,
        "severity_mae": float(np.abs(st - sp).mean()) if st.size else None,
        "severity_within_1": _mean(np.abs(st - sp) <= 1) if st.size else None,
        "severity_pairs": [[int(a), int(b)] for a, b in zip(st, sp)],
    }


def confusion(true_labels: Sequence[str], pred_labels: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """A confusion matrix (rows true, columns predicted) with a ``none`` column for no prediction."""
    cols = list(labels) + ["none"]
    index = {c: i for i, c in enumerate(cols)}
    m = np.zeros((len(labels), len(cols)), dtype=int)
    for t, p in zip(true_labels, pred_labels):
        if t in index and t != "none":
            m[index[t], index.get(p if p is not None else "none", index["none"])] += 1
    return {"labels": list(labels), "columns": cols, "matrix": m.tolist()}


# ---- calibration -------------------------------------------------------------------------------


def calibration(confidence: Sequence[float], correct: Sequence[bool], n_bins: int = 10,
                thresholds: Sequence[float] = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)) -> dict[str, Any]:
    """Accuracy per equal-width confidence bin, expected calibration error, and selective accuracy.

    ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|. Bins are [k/n, (k+1)/n),
    the last one closed. ``kept`` lists, per threshold, the share of answers with confidence >= it
    and their accuracy.
    """
    c = np.asarray(confidence, float)
    y = np.asarray(correct, bool)
    n = c.size
    bins = []
    ece = 0.0
    idx = np.minimum((c * n_bins).astype(int), n_bins - 1) if n else np.zeros(0, int)
    for k in range(n_bins):
        sel = idx == k
        cnt = int(sel.sum())
        acc = float(y[sel].mean()) if cnt else None
        conf = float(c[sel].mean()) if cnt else None
        if cnt:
            ece += cnt / n * abs(acc - conf)  # type: ignore[operator]
        bins.append({"lo": k / n_bins, "hi": (k + 1) / n_bins, "n": cnt, "accuracy": acc, "confidence": conf})
    kept = []
    for t in thresholds:
        sel = c >= t
        kept.append({"threshold": t, "share": safe_div(int(sel.sum()), n),
                     "accuracy": float(y[sel].mean()) if sel.any() else None})
    return {"n": n, "ece": float(ece) if n else None, "bins": bins, "kept": kept,
            "accuracy": float(y.mean()) if n else None, "mean_confidence": float(c.mean()) if n else None}


# ---- explanation consistency ------------------------------------------------------------------


def quality_text_consistency(named: Sequence[dict], true: Sequence[dict]) -> dict[str, bool]:
    """Whether parsed distortions name every true category and no absent one."""
    named_cats = {d["category"] for d in named}
    true_cats = {d["category"] for d in true}
    names_true = true_cats <= named_cats
    no_absent = named_cats <= true_cats
    return {"names_true": names_true, "no_absent": no_absent, "consistent": names_true and no_absent}


def forgery_text_consistency(verdict: str | None, n_regions: int, locations: Sequence[str],
                             tampered: bool, true_locations: Sequence[str]) -> dict[str, bool]:
    """Whether the text states the right verdict, one mask token per true region and the true locations.

    Locations are compared as multisets (one mention per region); an authentic image must name none.
    """
    want = "tampered" if tampered else "authentic"
    verdict_ok = verdict == want
    count_ok = n_regions == (len(true_locations) if tampered else 0)
    loc_ok = Counter(locations) == Counter(true_locations if tampered else [])
    return {"verdict": verdict_ok, "region_count": count_ok, "location": loc_ok,
            "consistent": verdict_ok and count_ok and loc_ok}


def text_reading(text: str, kind: str) -> str | None:
    """What the taxonomy parser reads from an answer for ``kind``: "verdict" (tampered / authentic),
    "rating" (the last rating word) or "better" (A / B)."""
    return {"verdict": parse_verdict, "rating": parse_rating, "better": parse_better}[kind](text)


def structured_reading(rec: dict) -> tuple[str, str] | None:
    """(kind, value) of a prediction record's structured decision, or None when it has none: the
    forgery verdict, else the comparison's better image, else the quality rating."""
    f, c, q = rec.get("forgery") or {}, rec.get("comparison") or {}, rec.get("quality") or {}
    if f.get("tampered") is not None:
        return "verdict", "tampered" if f["tampered"] else "authentic"
    if c.get("better") is not None:
        return "better", c["better"]
    if q.get("rating") is not None:
        return "rating", q["rating"]
    return None


def share_true(rows: Sequence[dict[str, bool]]) -> dict[str, Any]:
    """Per key, the share of rows where it is true (plus n)."""
    out: dict[str, Any] = {"n": len(rows)}
    for key in (rows[0] if rows else {}):
        out[key] = _mean(r[key] for r in rows)
    return out


def finite(x: Any) -> Any:
    """Replace NaN/inf floats (which JSON cannot hold) by None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if isinstance(x, np.generic):
        return finite(x.item())
    return x
