"""``loupe train calibrate`` and the verdict temperature it writes (``finetune/calibrate.py``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from loupe_vlm.assistant.inference import checkpoint_id, temper
from loupe_vlm.assistant.modeling import LoupeConfig
from loupe_vlm.finetune import calibrate
from tests.helpers import ASSETS


def test_temper_keeps_the_side_of_one_half_and_moves_towards_it():
    for p in (0.01, 0.3, 0.49, 0.5, 0.51, 0.8, 0.999):
        assert temper(p, 1.0) == p
        for t in (0.5, 2.0, 7.0):
            assert (temper(p, t) >= 0.5) == (p >= 0.5)
        assert abs(temper(p, 2.0) - 0.5) <= abs(p - 0.5) + 1e-12
        assert abs(temper(p, 0.5) - 0.5) >= abs(p - 0.5) - 1e-12
    assert temper(0.8, 2.0) == pytest.approx(1 / (1 + (0.2 / 0.8) ** 0.5))


def test_the_fit_recovers_an_overconfidence_of_three():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-z))
    # a model three times too sure of itself: its logits are 3 z
    assert calibrate.fit_temperature(3 * z, y) == pytest.approx(3.0, rel=0.1)
    assert calibrate._verdict_ece(3 * z, y, 3.0) < calibrate._verdict_ece(3 * z, y, 1.0)


def _checkpoint(tmp_path: Path, temperature: float = 1.0) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    LoupeConfig(name="cal-test", verdict_temperature=temperature).save(ckpt / "loupe_config.json")
    (ckpt / "heads.safetensors").write_bytes(b"heads")
    return ckpt


def _report(tmp_path: Path, model: str, probs, truth, data="data/forgery/val.jsonl", name="val-eval") -> Path:
    report = tmp_path / name
    report.mkdir()
    (report / "run.json").write_text(json.dumps({"model": model, "data": data, "sessions": []}))
    with open(report / "predictions.jsonl", "w") as f:
        for i, (p, y) in enumerate(zip(probs, truth)):
            f.write(json.dumps({"id": str(i), "model": model, "sample_task": "forgery.detect",
                                "forgery": {"tampered": p >= 0.5, "probability": float(p)},
                                "gt": {"tampered": bool(y)}}) + "\n")
        f.write(json.dumps({"id": "q", "model": model, "sample_task": "quality.assess", "gt": {}}) + "\n")
    return report


def _overconfident(n=400, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, n)
    y = rng.random(n) < 1 / (1 + np.exp(-z))
    return (1 / (1 + np.exp(-3 * z))).tolist(), y.tolist()


def test_calibrate_writes_the_temperature_and_a_refit_starts_from_the_lms_own_logit(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    probs, truth = _overconfident()
    report = _report(tmp_path, checkpoint_id(ckpt, "cal-test") + "+fp16lm", probs, truth)
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(report), "--dry-run"]) == 0
    assert LoupeConfig.load(ckpt / "loupe_config.json").verdict_temperature == 1.0  # nothing written
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(report)]) == 0
    t = LoupeConfig.load(ckpt / "loupe_config.json").verdict_temperature
    assert 2.4 < t < 3.6
    out = capsys.readouterr().out
    assert "400 forgery answers" in out and "verdict ECE" in out
    # a report made with that temperature is undone with it: the refit lands on T again, not on ~1
    tempered = [temper(p, t) for p in probs]
    report2 = _report(tmp_path, checkpoint_id(ckpt, "cal-test"), tempered, truth, name="val-eval-2")
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(report2)]) == 0
    assert LoupeConfig.load(ckpt / "loupe_config.json").verdict_temperature == pytest.approx(t, rel=1e-3)


def test_calibrate_refuses_another_models_report_a_test_split_and_too_few_answers(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    probs, truth = _overconfident()
    own = checkpoint_id(ckpt, "cal-test")
    other = _report(tmp_path, "loupe-smol@0123456789", probs, truth, name="other")
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(other)]) == 2
    assert "not of" in capsys.readouterr().err
    test = _report(tmp_path, own, probs, truth, data="data/forgery/test.jsonl", name="test")
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(test)]) == 2
    assert "test split" in capsys.readouterr().err
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(test), "--allow-test", "--dry-run"]) == 0
    few = _report(tmp_path, own, probs[:10], truth[:10], name="few")
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(few)]) == 2
    assert "at least 20" in capsys.readouterr().err
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(tmp_path / "none")]) == 2
    assert "no predictions.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "predictions.jsonl").write_text('{"id": 1}\n{not json\n')
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(bad)]) == 2
    assert "predictions.jsonl:2: not JSON" in capsys.readouterr().err


def test_a_temperature_that_is_not_positive_is_a_config_error():
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="verdict_temperature"):
            LoupeConfig(verdict_temperature=bad).check()


def test_the_assistant_reports_the_tempered_probability_and_the_same_verdict(tiny_assistant):
    config = tiny_assistant.model.config
    before = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    try:
        config.verdict_temperature = 2.5
        after = tiny_assistant.detect_forgery(ASSETS / "tampered.png")
    finally:
        config.verdict_temperature = 1.0
    assert after.forgery.probability == pytest.approx(temper(before.forgery.probability, 2.5), abs=1e-9)
    assert after.forgery.tampered == before.forgery.tampered and after.text == before.text
    assert abs(after.forgery.probability - 0.5) < abs(before.forgery.probability - 0.5)


def test_the_map_fit_recovers_a_logistic_reading():
    rng = np.random.default_rng(0)
    m = rng.normal(3.0, 4.0, 5000)
    y = rng.random(5000) < 1 / (1 + np.exp(-(0.5 * m - 1.0)))
    a, b = calibrate.fit_map(m, y)
    assert a == pytest.approx(0.5, rel=0.1) and b == pytest.approx(-1.0, abs=0.15)


def test_the_map_fit_with_copy_move_evidence_recovers_all_three_terms():
    rng = np.random.default_rng(1)
    m = rng.normal(3.0, 4.0, 8000)
    d = np.where(rng.random(8000) < 0.2, rng.uniform(2.7, 5.0, 8000), 0.0)  # log(1 + inliers) or none
    y = rng.random(8000) < 1 / (1 + np.exp(-(0.5 * m - 1.0 + 0.8 * d)))
    a, b, c = calibrate.fit_map(m, y, d)
    assert a == pytest.approx(0.5, rel=0.1) and b == pytest.approx(-1.0, abs=0.2) and c == pytest.approx(0.8, rel=0.15)


def test_calibrate_map_writes_three_terms_and_refuses_evidence_that_points_the_wrong_way(tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint(tmp_path)
    val = tmp_path / "val.jsonl"
    val.write_text("")
    rng = np.random.default_rng(2)
    m = rng.normal(0.0, 3.0, 3000)
    d = np.where(rng.random(3000) < 0.3, 3.5, 0.0)

    def fake(c):
        y = rng.random(3000) < 1 / (1 + np.exp(-(0.6 * m + 0.2 + c * d)))
        return lambda checkpoint, data, progress=True, duplicates=False: (
            m.tolist(), y.tolist(), 0, d.tolist() if duplicates else [])

    monkeypatch.setattr(calibrate, "map_logits", fake(1.0))
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(val), "--no-progress"]) == 0
    out = capsys.readouterr().out
    coef = LoupeConfig.load(ckpt / "loupe_config.json").verdict_map
    assert len(coef) == 3 and coef[2] == pytest.approx(1.0, rel=0.25) and "copy-move evidence on" in out
    # --no-duplicates: the map alone
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(val), "--no-duplicates"]) == 0
    assert len(LoupeConfig.load(ckpt / "loupe_config.json").verdict_map) == 2
    # evidence that goes with authentic images cannot raise P(tampered): refused, nothing written
    before = LoupeConfig.load(ckpt / "loupe_config.json").verdict_map
    monkeypatch.setattr(calibrate, "map_logits", fake(-1.5))
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(val), "--no-progress"]) == 2
    assert "copy-move evidence is not positive" in capsys.readouterr().err
    assert LoupeConfig.load(ckpt / "loupe_config.json").verdict_map == before


def test_a_verdict_map_must_be_a_pair_with_a_positive_slope():
    assert LoupeConfig(verdict_map=None).check() and LoupeConfig(verdict_map=[0.2, -0.1]).check()
    assert LoupeConfig(verdict_map=[0.2, -0.1, 0.9]).check()
    for bad in ([0.0, 1.0], [-0.3, 1.0], [1.0], [1.0, "x"], [1.0, float("nan")], [True, 0.0], 0.5,
                [0.2, 0.1, 0.0], [0.2, 0.1, -1.0], [0.2, 0.1, 1.0, 1.0]):
        with pytest.raises(ValueError, match="verdict_map"):
            LoupeConfig(verdict_map=bad).check()


def test_a_model_whose_map_decides_refuses_a_temperature_fit(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    config = LoupeConfig.load(ckpt / "loupe_config.json")
    config.verdict_map = [0.2, 0.1]
    config.save(ckpt / "loupe_config.json")
    probs, truth = _overconfident()
    report = _report(tmp_path, checkpoint_id(ckpt, "cal-test"), probs, truth)
    assert calibrate.main(["--checkpoint", str(ckpt), "--report", str(report)]) == 2
    assert "tampering map" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --report nor --map
        calibrate.main(["--checkpoint", str(ckpt)])
    assert calibrate.main(["--checkpoint", str(ckpt), "--map"]) == 2
    assert "--data" in capsys.readouterr().err


def test_calibrate_map_fits_on_the_heads_of_a_real_model_and_writes_the_reading(tmp_path, capsys):
    import shutil

    import torch

    from loupe_vlm.assistant.modeling import map_verdict
    from tests.assistant.test_aux import _tiny

    model, lp = _tiny(1.0)
    ckpt = tmp_path / "ck"
    model.save_pretrained(ckpt, processor=lp.processor)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    maxes = {}
    for name in ("tampered", "clean"):
        shutil.copy(ASSETS / f"{name}.png", data / "images" / f"{name}.png")
        with torch.no_grad():
            px = lp.encode_sample(_forgery_sample(name, True), data, train=False).lowlevel_pixels[-1]
            maxes[name] = float(model.encode_lowlevel([px]).aux[0][1].max())
    hi, lo = sorted(maxes, key=maxes.get, reverse=True)

    def write(path: Path, tampered_share: dict[str, int]) -> Path:
        with open(path, "w") as f:  # 12 records an image: tampered_share[image] of them tampered
            for name, k in tampered_share.items():
                for i in range(12):
                    f.write(json.dumps(_forgery_sample(name, i < k, f"{name}-{i}").to_dict()) + "\n")
        return path

    # the copy-move search runs on each judged image: a texture with a copied square shows evidence, the
    # assets do not
    from PIL import Image

    from tests.assistant.test_duplication import _paste, _texture

    Image.fromarray(_paste(_texture(), (20, 30), (130, 120), 60)[0]).save(data / "images" / "copied.png")
    probe = write(data / "probe.jsonl", {"copied": 6, hi: 6, lo: 6})
    _, _, _, evidence = calibrate.map_logits(ckpt, probe, progress=False, duplicates=True)
    assert len(evidence) == 36 and all(e > 0 for e in evidence[:12]) and not any(evidence[12:])
    assert calibrate.map_logits(ckpt, probe, progress=False)[3] == []
    val = write(data / "val.jsonl", {hi: 9, lo: 3})  # the stronger map is tampered 3 times in 4
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(val), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "24 forgery records (12 tampered, 0 skipped)" in out
    coef = LoupeConfig.load(ckpt / "loupe_config.json").verdict_map
    # the maximum-likelihood reading gives each image the share of its records that were tampered
    assert map_verdict(torch.tensor([maxes[hi]]), coef) == pytest.approx(0.75, abs=0.01)
    assert map_verdict(torch.tensor([maxes[lo]]), coef) == pytest.approx(0.25, abs=0.01)
    # labels that say the weaker map is the tampered one cannot decide verdicts: refused, nothing written
    backwards = write(data / "val2.jsonl", {hi: 3, lo: 9})
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(backwards), "--no-progress"]) == 2
    assert "not positive" in capsys.readouterr().err
    assert LoupeConfig.load(ckpt / "loupe_config.json").verdict_map == coef
    test = write(data / "test.jsonl", {hi: 9, lo: 3})
    assert calibrate.main(["--checkpoint", str(ckpt), "--map", "--data", str(test)]) == 2
    assert "test split" in capsys.readouterr().err


def _forgery_sample(name: str, tampered: bool, sid: str = "s"):
    from loupe_vlm.prompts import Sample, canonical_question, user_content

    return Sample(id=sid, task="forgery.detect", images=[f"images/{name}.png"], image_roles=["A"],
                  messages=[{"role": "user", "content": user_content(["A"], canonical_question("forgery.detect"))},
                            {"role": "assistant", "content": [{"type": "text", "text": "The image is authentic."}]}],
                  masks=[], meta={"tampered": tampered})
