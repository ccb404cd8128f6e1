"""No-reference readings (assistant/noreference.py) and how the assistant uses them."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from loupe_vlm.assistant.noreference import (CLASSIC_FEATURES, FEATURES, HEADS_FEATURES, NOREFERENCE_FILE,
                                             NoReferenceModel, image_features,
                                             load_noreference_model, with_heads)
from loupe_vlm.assistant.reference import (CLASSES, REFERENCE_FILE, RATING_IDS, ReferenceError, labelled_images,
                                           labels_of)
from tests.assistant.test_reference import _distort, _fit, _messages, _pairs, _photo, _png, _splits

F = {name: i for i, name in enumerate(CLASSIC_FEATURES)}
KINDS = ("clean", "brighten", "blur", "noise")


def _images(seeds):
    """Features (with uninformative heads logits) and labels of each seed's photo, clean and distorted."""
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for s in seeds:
        photo = _photo(s)
        for kind in KINDS:
            level = 2 + s % 3
            img = photo if kind == "clean" else _distort(photo, kind, level, rng)
            dists = [] if kind == "clean" else [{"category": kind, "severity": level}]
            feats.append(with_heads(image_features(img), rng.normal(0, 1, len(HEADS_FEATURES))))
            labels.append(labels_of(dists, "excellent" if kind == "clean" else RATING_IDS[min(level, 4)]))
    return np.asarray(feats), labels


def _fit_nr(feats, labels) -> NoReferenceModel:
    return NoReferenceModel.fit(feats, [lab[0] for lab in labels], [lab[1] for lab in labels],
                                [lab[2] for lab in labels], [lab[3] for lab in labels])


def test_the_features_see_each_distortion_in_the_image_alone():
    photo = _photo(3)
    clean = image_features(photo)
    assert clean.shape == (len(CLASSIC_FEATURES),) and np.isfinite(clean).all()
    rng = np.random.default_rng(0)
    assert image_features(_distort(photo, "brighten", 3, rng))[F["lightness_mean"]] > clean[F["lightness_mean"]] + 10
    blur = image_features(_distort(photo, "blur", 3, rng))
    assert blur[F["fine_to_middle"]] < clean[F["fine_to_middle"]] - 0.3  # the finest detail goes first
    noise = image_features(_distort(photo, "noise", 3, rng))
    assert noise[F["noise_sigma"]] > clean[F["noise_sigma"]] + 0.3
    for side in (12, 32):  # blocks of 8 and 3 px: runs of equal pixels, whatever the block size
        blocks = cv2.resize(cv2.resize(photo, (side, side), interpolation=cv2.INTER_AREA), (96, 96),
                            interpolation=cv2.INTER_NEAREST)
        assert image_features(blocks)[F["equal_right"]] > 0.6 > 0.1 > clean[F["equal_right"]]
    few = (photo // 64) * 64 + 32  # four levels a channel
    assert image_features(few)[F["colours"]] < clean[F["colours"]] - 2
    # a large image is read at WORK_SIDE; a constant one has finite features; a tiny one is refused
    assert np.isfinite(image_features(cv2.resize(photo, (500, 400)))).all()
    assert np.isfinite(image_features(np.full((64, 64, 3), 128, np.uint8))).all()
    with pytest.raises(ReferenceError, match="16x16"):
        image_features(photo[:8, :8])
    with pytest.raises(ReferenceError, match="heads logits"):
        with_heads(clean, np.zeros(3))


def test_the_fit_tells_distortions_apart_on_unseen_photos_and_round_trips(tmp_path):
    model = _fit_nr(*_images(range(16)))
    feats, labels = _images(range(100, 108))
    cues = model.predict(feats)
    hits = [CLASSES.index(c.category) == lab[0] for c, lab in zip(cues, labels)]
    assert np.mean(hits) >= 0.75, [c.category for c in cues]  # chance is 0.25
    clean = [c.mos_raw for c, lab in zip(cues, labels) if lab[0] == CLASSES.index("clean")]
    worst = [c.mos_raw for c, lab in zip(cues, labels) if lab[1] >= 4]
    assert np.mean(worst) < np.mean(clean) - 1
    model.save(tmp_path / NOREFERENCE_FILE)
    again = load_noreference_model(tmp_path)
    for a, b in zip(cues, again.predict(feats)):
        assert np.allclose(a.p_category, b.p_category, atol=1e-5) and math.isclose(a.mos, b.mos, abs_tol=1e-4)
    assert load_noreference_model(tmp_path / "nothing-here") is None
    # a full-reference model's file is not a no-reference one, and says how to make the right one
    _fit(*_pairs(range(12))).save(tmp_path / NOREFERENCE_FILE)
    with pytest.raises(ReferenceError, match="loupe train noreference"):
        load_noreference_model(tmp_path)


def test_labelled_images_follow_the_records():
    from loupe_vlm.prompts import Sample

    blur = [{"category": "blur", "severity": 2}]
    ref = Sample.from_dict({"id": "a", "task": "quality.assess", "images": ["r.png", "x.png"],
                            "image_roles": ["reference", "A"], "messages": _messages(2),
                            "meta": {"distortions": blur, "rating": "fair"}})
    assert labelled_images(ref) == [(0, [], None), (1, blur, "fair")]
    cmp = Sample.from_dict({"id": "c", "task": "quality.compare", "images": ["a.png", "b.png"],
                            "image_roles": ["A", "B"], "messages": _messages(2),
                            "meta": {"distortions_A": [], "distortions_B": blur, "rating_A": "excellent",
                                     "better": "A"}})
    assert labelled_images(cmp) == [(0, [], "excellent"), (1, blur, None)]
    unlabelled = Sample.from_dict({"id": "n", "task": "quality.assess", "images": ["x.png"], "image_roles": ["A"],
                                   "messages": _messages(1), "meta": {}})
    assert labelled_images(unlabelled) == []


def test_the_assistant_reads_questions_without_a_reference_by_the_model(tmp_path, monkeypatch):
    from loupe_vlm.assistant import inference
    from loupe_vlm.assistant.inference import Assistant, Request
    from loupe_vlm.assistant.processing import load_image, to_lowlevel_tensor
    from loupe_vlm.finetune.export import export
    from tests.assistant.test_aux import _tiny

    model, lp = _tiny(1.0)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    _fit_nr(*_images(range(16))).save(tmp_path / "ck" / NOREFERENCE_FILE)
    _fit(*_pairs(range(12))).save(tmp_path / "ck" / REFERENCE_FILE)
    export(tmp_path / "ck", tmp_path / "ex", evidence_guidance=2.0)
    assert (tmp_path / "ex" / NOREFERENCE_FILE).read_bytes() == (tmp_path / "ck" / NOREFERENCE_FILE).read_bytes()
    with_file = inference.checkpoint_id(tmp_path / "ex", "m")
    (tmp_path / "ex" / NOREFERENCE_FILE).rename(tmp_path / "kept")
    assert inference.checkpoint_id(tmp_path / "ex", "m") != with_file  # the file is part of the model's id
    (tmp_path / "kept").rename(tmp_path / "ex" / NOREFERENCE_FILE)
    a = Assistant.from_pretrained(tmp_path / "ex")
    assert a.noreference_model is not None and a.reference_model is not None
    photo = _photo(7)
    noisy = _distort(photo, "noise", 4, np.random.default_rng(0))
    paths = [_png(tmp_path / "photo.png", photo), _png(tmp_path / "noisy.png", noisy)]

    def heads(path):
        px = to_lowlevel_tensor(load_image(path), a.model.config.lowlevel_max_side)
        with torch.no_grad():
            return a.model.encode_lowlevel([px]).aux[0][0].float().numpy()

    calls = []
    real = a.model.generate

    def spy(batch, **kw):
        calls.append(kw)
        return real(batch, **kw)

    monkeypatch.setattr(a.model, "generate", spy)
    out = a.run([Request("quality.assess", [paths[1]], ["A"]), Request("quality.assess", paths, ["reference", "A"])])
    assert all(r.error is None for r in out)
    given = calls[-1]["guide_given"]
    alone = a.noreference_model.judge(noisy, heads(paths[1]))
    against = a.reference_model.judge(photo, noisy)
    assert torch.allclose(given["p_category"][0], torch.as_tensor(alone.p_category, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(given["p_rating"][0], torch.as_tensor(alone.p_rating, dtype=torch.float32), atol=1e-5)
    assert torch.allclose(given["p_category"][1], torch.as_tensor(against.p_category, dtype=torch.float32))
    # a comparison without a reference is decided by the two readings, in both orders alike, with no LM probe
    a.model.config.ab_verdict = "both_orders"
    calls.clear()
    res = a.run([Request("quality.compare", paths, ["A", "B"])])[0]
    clean = a.noreference_model.judge(photo, heads(paths[0]))
    p = 1 / (1 + math.exp(-inference.REFERENCE_COMPARE_SLOPE * (clean.mos_raw - alone.mos_raw)))
    c = res.comparison
    assert math.isclose(c.p_a, p, rel_tol=1e-5) and math.isclose(c.p_a_swapped, p, rel_tol=1e-5)
    assert c.better == ("A" if p >= 0.5 else "B") and c.consistent and len(calls) == 1  # no probe pass
    # without the file the heads guide alone, as before
    a.noreference_model = None
    calls.clear()
    a.run([Request("quality.assess", [paths[1]], ["A"])])
    assert "guide_given" not in calls[-1]


def test_loupe_train_noreference_fits_writes_and_refuses_a_test_split(tmp_path, capsys):
    from loupe_vlm.finetune.noreference import main
    from tests.assistant.test_aux import _tiny

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for s in range(12):
        photo = _photo(s)
        imgs = {kind: photo if kind == "clean" else _distort(photo, kind, 2 + s % 3, rng) for kind in KINDS}
        for kind, img in imgs.items():
            _png(data / "images" / f"{s}-{kind}.png", img)
            dists = [] if kind == "clean" else [{"name": kind, "category": kind, "severity": 2 + s % 3}]
            lines.append({"id": f"{s}-{kind}", "task": "quality.assess", "images": [f"images/{s}-{kind}.png"],
                          "image_roles": ["A"], "messages": _messages(1),
                          "meta": {"distortions": dists, "rating": "excellent" if kind == "clean" else "fair"}})
        lines.append({"id": f"{s}-cmp", "task": "quality.compare",
                      "images": [f"images/{s}-clean.png", f"images/{s}-blur.png"], "image_roles": ["A", "B"],
                      "messages": _messages(2), "meta": {"distortions_A": [], "distortions_B": [
                          {"name": "blur", "category": "blur", "severity": 2 + s % 3}], "better": "A"}})
    lines.append({"id": "broken"})
    _splits(data, lines)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    train = ["--data", str(data / "train.jsonl"), "--no-progress"]
    assert main(["--checkpoint", str(ckpt), *train]) == 2  # not a checkpoint
    model, lp = _tiny(1.0)
    model.save_pretrained(ckpt, processor=lp.processor)
    assert main(["--checkpoint", str(ckpt), "--data", str(data / "test.jsonl"), "--no-progress"]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), *train, "--dry-run"]) == 0
    assert not (ckpt / NOREFERENCE_FILE).exists()
    assert main(["--checkpoint", str(ckpt), *train, "--val", str(data / "train.jsonl")]) == 0
    out, err = capsys.readouterr()
    assert "fitted on 48 labelled images" in out and "clean called clean" in out and "comparisons" in out
    assert "the heads alone" in out and "skipped" in err  # the broken line is named, and the run goes on
    assert load_noreference_model(ckpt).FEATURES == FEATURES
