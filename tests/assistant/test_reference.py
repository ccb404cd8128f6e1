"""Full-reference readings (assistant/reference.py) and how the assistant uses them."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest
import torch

from loupe_vlm.assistant.reference import (CLASSES, FEATURES, PSNR_CAP, RATING_IDS, REFERENCE_FILE, ReferenceError,
                                           ReferenceModel, labels_of, load_reference_model, pairs_of,
                                           reference_features)
from tests.helpers import ASSETS

F = {name: i for i, name in enumerate(FEATURES)}


def _photo(seed: int, side: int = 96) -> np.ndarray:
    """A textured colour image: smooth colour fields plus fine detail."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.uniform(40, 215, (6, 6, 3)).astype(np.float32), (side, side), interpolation=cv2.INTER_CUBIC)
    detail = cv2.GaussianBlur(rng.normal(0, 25, (side, side)).astype(np.float32), (0, 0), 0.8)[..., None]
    return np.clip(base + detail, 0, 255).astype(np.uint8)


def _distort(img: np.ndarray, kind: str, level: int, rng: np.random.Generator) -> np.ndarray:
    x = img.astype(np.float32)
    if kind == "brighten":
        x = x + 18 * level
    elif kind == "blur":
        x = cv2.GaussianBlur(x, (0, 0), 0.6 * level)
    elif kind == "noise":
        x = x + rng.normal(0, 6 * level, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _pairs(seeds, kinds=("clean", "brighten", "blur", "noise")):
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for s in seeds:
        ref = _photo(s)
        for kind in kinds:
            level = 1 + s % 4
            img = ref if kind == "clean" else _distort(ref, kind, level, rng)
            dists = [] if kind == "clean" else [{"category": kind, "severity": level}]
            rating = "excellent" if kind == "clean" else RATING_IDS[min(level, 4)]
            feats.append(reference_features(ref, img))
            labels.append(labels_of(dists, rating))
    return np.asarray(feats), labels


def _png(path, img: np.ndarray) -> str:
    """Write an RGB array as a PNG; its path as a string."""
    cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return str(path)


def _splits(data, lines: list[dict]) -> None:
    """``lines`` as ``data/train.jsonl``, and the same again as ``test.jsonl`` (for the refusal of a test split)."""
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (data / "test.jsonl").write_text((data / "train.jsonl").read_text())


def _fit(feats, labels) -> ReferenceModel:
    return ReferenceModel.fit(feats, [lab[0] for lab in labels], [lab[1] for lab in labels],
                              [lab[2] for lab in labels], [lab[3] for lab in labels])


def test_the_features_measure_what_changed():
    ref = _photo(1)
    same = reference_features(ref, ref.copy())
    assert same[F["psnr"]] == PSNR_CAP and math.isclose(same[F["ssim"]], 1.0, abs_tol=1e-6)
    assert same[F["lightness_shift"]] == 0 and same[F["detail"]] == 0
    rng = np.random.default_rng(0)
    bright = reference_features(ref, _distort(ref, "brighten", 2, rng))
    assert bright[F["lightness_shift"]] > 5 and bright[F["psnr"]] < 30
    blur = reference_features(ref, _distort(ref, "blur", 3, rng))
    assert blur[F["detail"]] < -0.5 and blur[F["detail_direction"]] < -0.5  # fine detail removed
    noise = reference_features(ref, _distort(ref, "noise", 3, rng))
    assert noise[F["detail"]] > 0.2 and noise[F["detail_residual"]] > blur[F["detail_residual"]]
    jpeg = cv2.imdecode(cv2.imencode(".jpg", ref, [cv2.IMWRITE_JPEG_QUALITY, 8])[1], cv2.IMREAD_UNCHANGED)
    assert reference_features(ref, jpeg)[F["blockiness"]] > 0.1  # edges on the 8-pixel grid
    # an image of another size is compared at the reference's size; a huge pair at WORK_SIDE
    big = cv2.resize(ref, (300, 300), interpolation=cv2.INTER_CUBIC)
    assert reference_features(ref, big)[F["psnr"]] > 30
    assert reference_features(big, big)[F["psnr"]] == PSNR_CAP
    with pytest.raises(ReferenceError, match="16x16"):
        reference_features(ref[:8, :8], ref[:8, :8])


def test_the_fit_tells_the_changes_apart_on_unseen_pairs_and_round_trips(tmp_path):
    feats, labels = _pairs(range(12))
    model = _fit(feats, labels)
    test_feats, test_labels = _pairs(range(100, 106))
    cues = model.predict(test_feats)
    hits = [CLASSES.index(c.category) == lab[0] for c, lab in zip(cues, test_labels)]
    assert np.mean(hits) >= 0.9, [c.category for c in cues]
    clean = [c for c, lab in zip(cues, test_labels) if lab[0] == CLASSES.index("clean")]
    assert all(c.p_clean > 0.5 and c.severity < 1 and c.mos > 4 for c in clean)
    worse = [c.mos for c, lab in zip(cues, test_labels) if lab[1] >= 3]
    assert max(worse) < min(c.mos for c in clean)  # strong distortions read as worse than none
    for c in cues:
        assert math.isclose(float(c.p_category.sum()) + c.p_clean, 1.0, rel_tol=1e-6)
        assert math.isclose(float(c.p_rating.sum()), 1.0, rel_tol=1e-6) and 1 <= c.mos <= 5 and 0 <= c.severity <= 5
    # save and load: the same readings, from safetensors
    path = tmp_path / REFERENCE_FILE
    model.save(path)
    again = load_reference_model(tmp_path)
    for a, b in zip(cues, again.predict(test_feats)):
        assert np.allclose(a.p_category, b.p_category, atol=1e-5) and math.isclose(a.mos, b.mos, abs_tol=1e-4)
    assert load_reference_model(tmp_path / "nothing-here") is None


def test_a_damaged_or_foreign_reference_file_is_refused_with_the_fix(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / REFERENCE_FILE
    path.write_bytes(b"not safetensors")
    with pytest.raises(ReferenceError, match="loupe train reference"):
        load_reference_model(tmp_path)
    save_file({"w": np.zeros(3, np.float32)}, str(path), metadata={"format": "other"})
    with pytest.raises(ReferenceError, match="another format"):
        load_reference_model(tmp_path)


def test_the_fit_needs_enough_labelled_pairs():
    feats, labels = _pairs(range(3))
    with pytest.raises(ReferenceError, match="at least"):
        _fit(feats, labels)


def test_labels_and_pairs_follow_the_records():
    from loupe_vlm.prompts import Sample

    assert labels_of([]) == (CLASSES.index("clean"), 0.0, 5.0, None)
    assert labels_of([{"category": "blur", "severity": 2}], "fair") == (CLASSES.index("blur"), 2.0, 3.4, 2)
    two = labels_of([{"category": "blur", "severity": 3}, {"category": "noise", "severity": 1}])
    assert two[0] is None and two[1] == 3.0 and math.isclose(two[2], 5 - 2.4 - 0.2)
    assess = Sample.from_dict({"id": "a", "task": "quality.assess", "images": ["r.png", "x.png"],
                               "image_roles": ["reference", "A"], "messages": _messages(2),
                               "meta": {"distortions": [], "rating": "excellent"}})
    assert pairs_of(assess) == [(0, 1, [], "excellent")]
    cmp = Sample.from_dict({"id": "c", "task": "quality.compare", "images": ["r.png", "a.png", "b.png"],
                            "image_roles": ["reference", "A", "B"], "messages": _messages(3),
                            "meta": {"distortions_A": [], "distortions_B": [{"category": "blur", "severity": 2}],
                                     "rating_A": "excellent", "rating_B": "fair", "better": "A"}})
    assert pairs_of(cmp) == [(0, 1, [], "excellent"), (0, 2, [{"category": "blur", "severity": 2}], "fair")]
    alone = Sample.from_dict({"id": "n", "task": "quality.assess", "images": ["x.png"], "image_roles": ["A"],
                              "messages": _messages(1), "meta": {"distortions": []}})
    assert pairs_of(alone) == []


def _messages(n_images: int) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": "How is it?"}]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": "Fine."}]}]


def test_rating_guidance_pushes_the_rating_words_the_reading_doubts():
    from loupe_vlm.assistant.guidance import EvidenceGuide
    from loupe_vlm.assistant.processing import AUX_CATEGORIES
    from tests.assistant.test_aux import _tiny

    _, lp = _tiny(1.0)
    tok = lp.tokenizer
    guide = EvidenceGuide(tok, AUX_CATEGORIES)
    p_cat = torch.full((2, len(AUX_CATEGORIES)), 0.01)
    p_cat[:, 0] = 0.9
    p_sev = torch.full((2, 5), 0.2)
    p_rating = torch.tensor([[0.02, 0.03, 0.05, 0.1, 0.8], [float("nan")] * 5])  # row 0: "bad"; row 1: not guided
    proc = guide.processor(p_cat, p_sev, torch.tensor([2.0, 2.0]), p_rating=p_rating)
    the = tok.encode(" the", add_special_tokens=False)[0]
    out = proc(torch.tensor([[the], [the]]), torch.zeros(2, len(tok)))
    fair, bad = (tok.encode(" " + w, add_special_tokens=False)[0] for w in ("fair", "bad"))
    assert out[0, bad] == 0 and math.isclose(float(out[0, fair]), 2.0 * math.log(0.05 / 0.8), rel_tol=1e-4)
    assert out[1, fair] == 0 and out[1, bad] == 0  # the heads alone do not guide the rating


def _reference_assistant(tmp_path):
    from loupe_vlm.assistant.inference import Assistant
    from loupe_vlm.finetune.export import export
    from tests.assistant.test_aux import _tiny

    model, lp = _tiny(1.0)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    feats, labels = _pairs(range(12))
    _fit(feats, labels).save(tmp_path / "ck" / REFERENCE_FILE)
    export(tmp_path / "ck", tmp_path / "ex", evidence_guidance=2.0, rating_width=0.7)
    assert (tmp_path / "ex" / REFERENCE_FILE).read_bytes() == (tmp_path / "ck" / REFERENCE_FILE).read_bytes()
    a = Assistant.from_pretrained(tmp_path / "ex")
    assert a.model.config.rating_width == 0.7
    return a


def test_the_assistant_reads_a_reference_where_one_is_given(tmp_path, monkeypatch):
    from loupe_vlm.assistant import inference
    from loupe_vlm.assistant.inference import Request

    a = _reference_assistant(tmp_path)
    assert a.reference_model is not None
    # the file is part of the model's id: predictions made with and without it are told apart
    with_file = inference.checkpoint_id(tmp_path / "ex", "m")
    (tmp_path / "ex" / REFERENCE_FILE).rename(tmp_path / "kept")
    assert inference.checkpoint_id(tmp_path / "ex", "m") != with_file
    (tmp_path / "kept").rename(tmp_path / "ex" / REFERENCE_FILE)
    ref = _photo(7)
    blurred = _distort(ref, "blur", 4, np.random.default_rng(0))
    for name, img in (("ref", ref), ("blurred", blurred)):
        cv2.imwrite(str(tmp_path / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    paths = [str(tmp_path / "ref.png"), str(tmp_path / "blurred.png")]
    calls = []
    real = a.model.generate

    def spy(batch, **kw):
        calls.append(kw)
        return real(batch, **kw)

    monkeypatch.setattr(a.model, "generate", spy)
    # an assessment against the reference: the reading replaces the heads' and guides the rating words
    out = a.run([Request("quality.assess", paths, ["reference", "A"]),
                 Request("quality.assess", [paths[1]], ["A"])])
    given = calls[-1]["guide_given"]
    cue = a.reference_model.judge(ref, blurred)
    assert cue.category == "blur"
    assert torch.allclose(given["p_category"][0], torch.as_tensor(cue.p_category, dtype=torch.float32))
    assert math.isclose(float(given["level"][0]), cue.severity, rel_tol=1e-5)
    assert torch.isnan(given["p_category"][1]).all() and torch.isnan(given["p_rating"][1]).all()  # no reference
    assert all(r.error is None for r in out)
    # a comparison with a reference is decided by the two readings, in both orders alike, with no LM probe
    a.model.config.ab_verdict = "both_orders"
    calls.clear()
    res = a.run([Request("quality.compare", [paths[0], paths[1], paths[0]], ["reference", "A", "B"])])[0]
    clean = a.reference_model.judge(ref, ref)  # B is the reference itself
    p = 1 / (1 + math.exp(-inference.REFERENCE_COMPARE_SLOPE * (cue.mos_raw - clean.mos_raw)))
    c = res.comparison
    assert c.better == "B" and math.isclose(c.p_a, p, rel_tol=1e-6) and math.isclose(c.p_a_swapped, p, rel_tol=1e-6)
    assert c.consistent and len(calls) == 1 and calls[0]["guide_p_a"].tolist() == [0.0]  # no probe pass
    # without a reference model nothing changes: the heads guide as before
    a.reference_model = None
    calls.clear()
    a.run([Request("quality.assess", paths, ["reference", "A"])])
    assert "guide_given" not in calls[-1]


def test_loupe_train_reference_fits_writes_and_refuses_a_test_split(tmp_path, capsys):
    from loupe_vlm.finetune.reference import main

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for s in range(12):
        ref = _photo(s)
        _png(data / "images" / f"{s}-ref.png", ref)
        for kind in ("clean", "brighten", "blur", "noise"):
            level = 1 + s % 4
            img = ref if kind == "clean" else _distort(ref, kind, level, rng)
            _png(data / "images" / f"{s}-{kind}.png", img)
            dists = [] if kind == "clean" else [{"name": kind, "category": kind, "severity": level}]
            lines.append({"id": f"{s}-{kind}", "task": "quality.assess",
                          "images": [f"images/{s}-ref.png", f"images/{s}-{kind}.png"],
                          "image_roles": ["reference", "A"], "messages": _messages(2),
                          "meta": {"distortions": dists, "rating": "excellent" if kind == "clean" else "fair"}})
    _splits(data, lines)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert main(["--checkpoint", str(ckpt), "--data", str(data / "train.jsonl")]) == 2  # not a checkpoint
    (ckpt / "loupe_config.json").write_text("{}")
    assert main(["--checkpoint", str(ckpt), "--data", str(data / "test.jsonl"), "--no-progress"]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--data", str(data / "train.jsonl"), "--val", str(data / "train.jsonl"),
                 "--no-progress", "--dry-run"]) == 0
    assert not (ckpt / REFERENCE_FILE).exists()
    assert main(["--checkpoint", str(ckpt), "--data", str(data / "train.jsonl"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "fitted on 48 reference pairs" in out and "clean called clean 1.000 (n=12)" in out
    assert load_reference_model(ckpt) is not None
