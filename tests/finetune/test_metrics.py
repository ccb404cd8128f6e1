"""Metric functions of finetune.metrics against hand-computed cases (and scipy where it has the function)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from loupe_vlm.finetune import metrics as M


def test_mask_f1_iou_hand_computed():
    true = np.zeros((4, 4), bool)
    true[:2, :2] = True  # 4 pixels
    pred = np.zeros((4, 4), bool)
    pred[:2, :3] = True  # 6 pixels, 4 of them right: tp=4 fp=2 fn=0
    f1, iou = M.mask_f1_iou(pred, true)
    assert f1 == pytest.approx(8 / 10)
    assert iou == pytest.approx(4 / 6)


def test_mask_f1_iou_empty_and_inverted():
    true = np.zeros((3, 3), bool)
    true[1, 1] = True
    assert M.mask_f1_iou(None, true) == (0.0, 0.0)  # nothing predicted, something to find
    assert M.mask_f1_iou(np.zeros_like(true), true) == (0.0, 0.0)
    assert M.mask_f1_iou(true, np.zeros_like(true)) == (0.0, 0.0)  # a claim on an untouched image
    assert M.mask_f1_iou(None, np.zeros_like(true)) == (1.0, 1.0)  # both empty: defined as agreement
    assert M.mask_f1_iou(~true, true) == (0.0, 0.0)  # an inverted mask scores nothing
    assert M.mask_f1_iou(true, true) == (1.0, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        M.mask_f1_iou(np.zeros((2, 2), bool), true)


def test_best_threshold_f1_beats_or_equals_fixed_threshold():
    true = np.zeros((4, 4), bool)
    true[0] = True
    prob = np.full((4, 4), 0.1)
    prob[0] = 0.4  # all below 0.5: the fixed threshold finds nothing
    prob[1, 0] = 0.3
    assert M.mask_f1_iou(prob > 0.5, true)[0] == 0.0
    assert M.best_threshold_f1(prob, true) == pytest.approx(1.0)  # a threshold in (0.3, 0.4] is perfect
    prob[1, 0] = 0.45  # now one false positive ranks above the truth: best is 2*4/(2*4+1)
    assert M.best_threshold_f1(prob, true) == pytest.approx(8 / 9)


def test_roc_auc_and_classification_hand_computed():
    y = [True, True, False, False]
    s = [0.9, 0.4, 0.5, 0.1]  # pairs (pos, neg): (.9>.5) (.9>.1) (.4<.5) (.4>.1) -> 3/4
    assert M.roc_auc(y, s) == pytest.approx(0.75)
    assert M.roc_auc(y, [0.5] * 4) == pytest.approx(0.5)  # ties count one half
    assert M.roc_auc([True, True], [0.1, 0.2]) is None
    c = M.binary_classification([True, True, True, False], [True, False, True, True], [0.9, 0.2, 0.8, 0.7])
    assert (c["tp"], c["fn"], c["fp"], c["tn"]) == (2, 1, 1, 0)
    assert c["accuracy"] == pytest.approx(0.5)
    assert c["f1"] == pytest.approx(4 / 6)
    assert c["balanced_accuracy"] == pytest.approx((2 / 3 + 0) / 2)
    assert c["auc"] == pytest.approx(2 / 3)


def test_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    true = rng.uniform(1, 5, 40)
    pred = true + rng.normal(0, 0.8, 40)
    c = M.correlation(pred, true)
    assert c["srcc"] == pytest.approx(stats.spearmanr(pred, true)[0])
    assert c["plcc"] == pytest.approx(stats.pearsonr(pred, true)[0])
    assert c["plcc_logistic"] is not None and c["plcc_logistic"] >= c["plcc"] - 0.05
    assert M.correlation([1, 1, 1], [1, 2, 3])["srcc"] is None  # a constant prediction has no correlation


def test_grouped_correlation_differs_from_global():
    # inside each group the order is perfect, but groups sit at inverted levels
    pred = [1, 2, 3, 11, 12, 13]
    true = [11, 12, 13, 1, 2, 3]
    groups = ["a", "a", "a", "b", "b", "b"]
    assert M.grouped_correlation(pred, true, groups)["srcc"] == pytest.approx(1.0)
    assert M.correlation(pred, true)["srcc"] < 0
    g = M.grouped_correlation(pred[:4], true[:4], groups[:4])
    assert g["n_groups"] == 1 and g["groups_skipped"] == 1


def test_calibration_ece_hand_computed():
    conf = [0.95, 0.95, 0.65, 0.65, 0.65, 0.65]
    correct = [True, False, True, True, True, False]
    cal = M.calibration(conf, correct, n_bins=10)
    # bin 0.9: acc .5 conf .95 (2/6); bin 0.6: acc .75 conf .65 (4/6)
    assert cal["ece"] == pytest.approx(2 / 6 * 0.45 + 4 / 6 * 0.10)
    b9 = cal["bins"][9]
    assert (b9["n"], b9["accuracy"]) == (2, 0.5)
    kept = {k["threshold"]: k for k in cal["kept"]}
    assert kept[0.9]["share"] == pytest.approx(2 / 6) and kept[0.9]["accuracy"] == pytest.approx(0.5)
    assert kept[0.0]["share"] == 1.0
    assert M.calibration([1.0], [True])["bins"][9]["n"] == 1  # confidence 1.0 falls in the last bin


def test_ab_metrics_swap_consistency():
    truth = ["A", "B", "A", "B"]
    p_a = [0.9, 0.2, 0.7, 0.6]  # as asked: right, right, right, wrong
    p_a_swapped = [0.8, 0.7, 0.4, None]  # swapped (mapped back): right, wrong, wrong, missing
    better = ["A", "A", "A", "A"]
    ab = M.ab_metrics(p_a, p_a_swapped, better, truth)
    assert ab["accuracy_as_asked"] == pytest.approx(3 / 4)
    assert ab["accuracy_swapped"] == pytest.approx(1 / 4)
    assert ab["accuracy_averaged"] == pytest.approx(2 / 4)
    assert ab["swap_pairs"] == 3 and ab["swap_consistency"] == pytest.approx(1 / 3)


def test_distortion_metrics_partial_credit_and_severity():
    trues = [
        [{"name": "noise_gaussian_rgb", "category": "noise", "severity": 4}],
        [{"name": "blur_gaussian", "category": "blur", "severity": 2}],
        [{"name": "blur_motion", "category": "blur", "severity": 3},
         {"name": "compression_jpeg", "category": "compression", "severity": 5}],
        [],
    ]
    preds = [
        [{"name": "noise_gaussian_rgb", "category": "noise", "severity": "serious"}],  # exact, severity right
        [{"name": None, "category": "blur", "severity": "obvious"},
         {"name": None, "category": "noise", "severity": None}],  # two categories: not an exact match
        [{"name": "blur_gaussian", "category": "blur", "severity": "obvious"},  # category only: 0.5
         {"name": "noise_speckle", "category": "noise", "severity": None}],  # wrong: 0
        [],
    ]
    d = M.distortion_metrics(preds, trues)
    assert d["single_n"] == 2 and d["category_accuracy"] == pytest.approx(0.5)
    assert d["function_n"] == 1 and d["function_accuracy"] == 1.0
    assert d["multi_n"] == 1
    assert d["set_precision"] == pytest.approx(0.5 / 2) and d["set_recall"] == pytest.approx(0.5 / 2)
    assert d["clean_n"] == 1 and d["clean_accuracy"] == 1.0
    # severity pairs (true, pred): noise (4,4), blur (2,3), blur (3,3); compression has no prediction
    assert sorted(map(tuple, d["severity_pairs"])) == [(2, 3), (3, 3), (4, 4)]
    assert d["severity_accuracy"] == pytest.approx(2 / 3)
    assert d["severity_mae"] == pytest.approx(1 / 3)
    assert d["severity_within_1"] == 1.0
    assert d["severity_coverage"] == pytest.approx(3 / 4)


def test_clean_needs_the_answer_to_say_clean_not_only_to_name_nothing():
    trues = [[], [], [], [{"name": "blur_gaussian", "category": "blur", "severity": 2}]]
    preds = [[], [], [{"name": None, "category": "noise", "severity": None}], []]
    # the second answer names no taxonomy distortion but does not say clean ("moderate tonal range")
    d = M.distortion_metrics(preds, trues, says_clean=[True, False, False, False])
    assert d["clean_n"] == 3
    assert d["clean_accuracy"] == pytest.approx(1 / 3)
    assert d["clean_names_none"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="4 answers"):
        M.distortion_metrics(preds, trues, says_clean=[True])


def test_distortion_credit_counts_each_truth_once():
    true = [{"name": "blur_gaussian", "category": "blur"}]
    pred = [{"name": "blur_gaussian", "category": "blur"}, {"name": None, "category": "blur"}]
    assert M.distortion_credit(pred, true) == 1.0


def test_text_consistency():
    q = M.quality_text_consistency([{"category": "noise"}, {"category": "blur"}], [{"category": "noise"}])
    assert q == {"names_true": True, "no_absent": False, "consistent": False}
    f = M.forgery_text_consistency("tampered", 1, ["top_left"], True, ["top_left"])
    assert f["consistent"]
    f = M.forgery_text_consistency("authentic", 0, [], True, ["top_left"])
    assert not f["verdict"] and not f["region_count"] and not f["location"]
    assert M.forgery_text_consistency("authentic", 0, [], False, [])["consistent"]


def test_confusion_and_finite():
    c = M.confusion(["noise", "blur", "noise"], ["noise", None, "blur"], ["blur", "noise"])
    assert c["columns"] == ["blur", "noise", "none"]
    assert c["matrix"] == [[0, 0, 1], [1, 1, 0]]
    assert M.finite({"a": [float("nan"), 1.0, np.float64(2.0)]}) == {"a": [None, 1.0, 2.0]}
