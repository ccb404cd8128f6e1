"""``loupe eval`` end to end on the tiny checkpoint and a tiny Sample dataset made from tests/assets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loupe_vlm.prompts import Sample, canonical_question, save_jsonl, user_content
from tests.helpers import ASSETS

NOISE = [{"name": "noise_gaussian_rgb", "category": "noise", "severity": 4}]


def _sample(sid: str, task: str, images: list[str], roles: list[str], answer: str, meta: dict,
            masks: list[str] | None = None) -> Sample:
    return Sample(id=sid, task=task, images=images, image_roles=roles,
                  messages=[{"role": "user", "content": user_content(roles, canonical_question(task))},
                            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                  masks=masks or [], meta=meta)


def make_dataset(root: Path) -> Path:
    """Quality (assess, rate) and forgery samples over the test assets; returns test.jsonl."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for name in ("clean", "noisy", "tampered"):
        shutil.copy(ASSETS / f"{name}.png", root / "images" / f"{name}.png")
    shutil.copy(ASSETS / "tampered_mask.png", root / "masks" / "tampered-0.png")
    region = [{"location": "top_left", "area": 0.1, "bbox": [0, 0, 40, 30]}]
    samples = [
        _sample("q-0", "quality.assess", ["images/noisy.png"], ["A"], "Serious Gaussian noise. The quality is poor.",
                {"distortions": NOISE, "rating": "poor", "clean": False, "source_photo": "p1", "detail": "brief"}),
        _sample("q-1", "quality.assess", ["images/clean.png"], ["A"], "No distortion. The quality is excellent.",
                {"distortions": [], "rating": "excellent", "clean": True, "source_photo": "p1"}),
        _sample("q-2", "quality.assess", ["images/tampered.png"], ["A"], "The quality is good.",
                {"distortions": [], "rating": "good", "clean": True, "source_photo": "p2"}),
        _sample("r-0", "quality.rate", ["images/clean.png", "images/noisy.png"], ["A", "B"], "A is better.",
                {"better": "A", "distortions": [], "rating": "excellent"}),
        _sample("r-1", "quality.rate", ["images/noisy.png", "images/clean.png"], ["A", "B"], "B is better.",
                {"better": "B", "distortions": NOISE, "rating": "poor"}),
        _sample("f-0", "forgery.detect", ["images/tampered.png"], ["A"],
                "This image has been tampered with: a spliced region in the top-left <|mask|>.",
                {"tampered": True, "manipulation": "splice", "regions": region, "post": []},
                masks=["masks/tampered-0.png"]),
        _sample("f-1", "forgery.detect", ["images/clean.png"], ["A"], "This image appears authentic.",
                {"tampered": False, "manipulation": None, "regions": [], "post": [{"op": "jpeg", "quality": 80}]}),
        _sample("f-2", "forgery.detect", ["images/tampered.png"], ["A"],
                "This image has been tampered with: copied content in the top-left <|mask|>.",
                {"tampered": True, "manipulation": "copy_move", "regions": region,
                 "post": [{"op": "jpeg", "quality": 60}]}, masks=["masks/tampered-0.png"]),
    ]
    path = root / "test.jsonl"
    save_jsonl(samples, path)
    with path.open("a") as fh:
        fh.write('{"id": "bad", "task": "quality.assess"}\n')  # a broken line is skipped, not fatal
    (root / "card.md").write_text("# tiny eval set\n")
    return path


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    """The tiny checkpoint with short answers (untrained prompts would run to the token cap)."""
    from loupe_vlm.assistant.inference import Assistant

    return Assistant.from_pretrained(tiny_checkpoint, max_new_tokens=40)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("evalset"))


def test_loupe_eval_writes_a_complete_report(tiny_checkpoint, dataset, tmp_path, capsys):
    from loupe_vlm.cli import main as loupe
    from tests.data_builders.llm_server import Server

    out = tmp_path / "report"
    with Server(lambda body, n: (200, "8", 0.0)) as judge:
        rc = loupe(["eval", "--model", str(tiny_checkpoint), "--data", str(dataset), "--out", str(out),
                    "--batch-size", "4", "--max-new-tokens", "40", "--no-progress",
                    "--judge-base-url", judge.base_url, "--judge-model", "judge-test"])
        assert judge.requests == 8  # one score per answered sample
    assert rc == 0
    for name in ("metrics.json", "predictions.jsonl", "report.md", "plots/confusion.png", "plots/reliability.png",
                 "plots/severity.png", "plots/pixel_f1_by_manipulation.png", "plots/worst_forgery.png"):
        assert (out / name).is_file(), name
    result = json.loads((out / "metrics.json").read_text())
    assert result["model"].startswith("tiny-test@")
    assert result["dataset"]["skipped_lines"] == 1
    import hashlib

    assert result["dataset"]["card_sha256"] == hashlib.sha256((dataset.parent / "card.md").read_bytes()).hexdigest()
    m = result["metrics"]
    for name in ("quality.category_accuracy", "quality.rating_accuracy", "quality.srcc", "quality.plcc",
                 "compare.accuracy_as_asked", "compare.accuracy_swapped",
                 "forgery.accuracy", "forgery.auc", "forgery.pixel_f1@0.5", "forgery.pixel_iou@0.5",
                 "forgery.pixel_f1_best_threshold", "forgery[manipulation=splice].pixel_f1@0.5",
                 "forgery[post=jpeg<70].accuracy", "explanations.forgery_verdict", "explanations.quality_names_true",
                 "calibration.ece", "calibration[task=forgery.detect].ece", "cost.seconds_per_sample",
                 "calibration[task=forgery.detect].verdict_ece",
                 "cost.peak_rss_mb", "explanations.judge_score"):
        assert name in m, name
        assert m[name]["protocol"] and m[name]["n"] >= 1
    assert "IMDL-BenCo" in m["forgery.pixel_f1@0.5"]["protocol"]
    assert "BEST-THRESHOLD" in m["forgery.pixel_f1_best_threshold"]["protocol"]
    assert "severity_mos" in m["quality.srcc"]["protocol"]
    assert m["explanations.judge_score"]["value"] == 8.0
    # the tiny model was overfit to say "poor" for noisy.png and to mask tampered.png (IoU > 0.5)
    preds = {json.loads(x)["id"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    assert set(preds) == {"q-0", "q-1", "q-2", "r-0", "r-1", "f-0", "f-1", "f-2"}
    assert preds["q-0"]["quality"]["rating"] == "poor"
    assert preds["f-0"]["forgery"]["tampered"] is True and (out / preds["f-0"]["forgery"]["mask"]).is_file()
    assert preds["r-0"]["task"] == "compare" and preds["r-0"]["sample_task"] == "quality.rate"
    assert preds["f-1"]["gt"] == {"task": "forgery.detect", "detail": None, "group": None, "tampered": False,
                                  "manipulation": "authentic", "masks": [], "locations": [], "post": "jpeg70-89"}
    assert m["forgery[manipulation=splice].pixel_iou@0.5"]["value"] > 0.5
    assert m["forgery.pixel_f1_best_threshold"]["value"] >= m["forgery.pixel_f1@0.5"]["value"]
    report = (out / "report.md").read_text()
    assert "| `forgery.pixel_f1@0.5` |" in report and "plots/worst_forgery.png" in report
    # compare: a report against itself differs by zero everywhere
    capsys.readouterr()
    assert loupe(["eval", "--compare", str(out), str(out)]) == 0
    table = capsys.readouterr().out
    assert "forgery.pixel_f1@0.5" in table and "+0.0000" in table and "WARNING" not in table


class _Interrupting:
    """Wraps an Assistant and raises after ``n`` batches, as a kill would (counts samples it ran)."""

    def __init__(self, assistant, n: int):
        self.assistant, self.n, self.name, self.ran = assistant, n, assistant.name, []

    def run(self, requests, batch_size=8, errors=None):
        if self.n == 0:
            raise KeyboardInterrupt
        self.n -= 1
        self.ran += [r.id for r in requests]
        return self.assistant.run(requests, batch_size=batch_size, errors=errors)


def test_eval_resumes_after_interruption(assistant, dataset, tmp_path):
    from loupe_vlm.finetune.eval import EvalError, evaluate

    out = tmp_path / "report"
    tasks = ["forgery"]  # 3 samples in batches of 2: cheap on a shared CPU, and masks are resumed too
    first = _Interrupting(assistant, 1)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, dataset, tasks=tasks, out_dir=out, batch_size=2, progress=False)
    assert first.ran == ["f-0", "f-1"]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 2 and (out / "masks" / "f-0.png").is_file()
    lines[1] = lines[1][:25]  # the kill cut the last line short
    (out / "predictions.jsonl").write_text("\n".join(lines))
    second = _Interrupting(assistant, 10)
    result = evaluate(second, dataset, tasks=tasks, out_dir=out, batch_size=2, progress=False)
    assert second.ran == ["f-1", "f-2"]  # the done id skipped, the cut one redone
    ids = [json.loads(x)["id"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == ["f-0", "f-1", "f-2"]
    assert result["details"]["counts"]["records"] == 3
    assert json.loads((out / "run.json").read_text())["sessions"][-1]["samples"] == 2
    # in-memory evaluation (no report folder, as training calls it) gives the same numbers, f-0's mask
    # read back from its PNG in one case and kept in memory in the other
    mem = evaluate(assistant, dataset, tasks=tasks, progress=False)
    assert mem["details"]["counts"]["records"] == 3
    for name in ("forgery.pixel_f1@0.5", "forgery.pixel_f1_best_threshold", "forgery.auc"):
        assert mem["metrics"][name]["value"] == pytest.approx(result["metrics"][name]["value"], abs=2e-3)
    # another model's run is not silently mixed in
    other = _Interrupting(assistant, 10)
    other.name = "other@123"
    with pytest.raises(EvalError, match="--restart"):
        evaluate(other, dataset, tasks=tasks, out_dir=out, progress=False)


def test_judge_scores_and_failures():
    from loupe_vlm.finetune.eval import make_judge
    from tests.data_builders.llm_server import Server

    replies = {1: (200, "7", 0.0), 2: (200, "I cannot grade this.", 0.0), 3: (500, "boom", 0.0), 4: (200, "42", 0.0)}
    seen = []

    def behaviour(body, n):
        seen.append(body["messages"][-1]["content"])
        return replies[n]

    sample = _sample("q", "quality.assess", ["images/noisy.png"], ["A"],
                     "Serious Gaussian noise. The quality is poor.", {"distortions": NOISE, "rating": "poor"})
    with Server(behaviour) as server:
        judge = make_judge(server.base_url, "judge-test", max_retries=0)
        scores = [judge({"text": "The quality is poor."}, sample) for _ in range(4)]
    assert scores == [7.0, None, None, None]  # a score, a refusal, a server error, out of range
    assert "Reference answer: Serious Gaussian noise. The quality is poor." in seen[0]
    assert "noise_gaussian_rgb" in seen[0] and "Assistant's answer: The quality is poor." in seen[0]


def test_compute_metrics_on_synthetic_records(tmp_path):
    """No model: hand-made records, a predicted mask at half the truth's size (resized before scoring)."""
    import numpy as np
    from PIL import Image

    from loupe_vlm.finetune.eval import compute_metrics

    truth = np.zeros((8, 8), np.uint8)
    truth[:4, :4] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(truth).save(tmp_path / "masks" / "t.png")
    pred_small = np.zeros((4, 4), bool)
    pred_small[:2, :2] = True

    def rec(id_, tampered, prob, manip, gt_tampered, masks, conf):
        return {"id": id_, "sample_task": "forgery.detect", "images": [f"images/{id_}.png"], "error": None,
                "text": "This image has been tampered with in the top-left." if tampered else "It is authentic.",
                "confidence": conf, "seconds": 0.5,
                "forgery": {"tampered": tampered, "probability": prob, "manipulation": manip, "regions": int(tampered),
                            "mask": None},
                "gt": {"task": "forgery.detect", "tampered": gt_tampered, "manipulation": "splice" if gt_tampered
                       else "authentic", "masks": masks, "locations": ["top_left"] if gt_tampered else [],
                       "post": "none"}}

    records = [rec("a", True, 0.9, "splice", True, ["masks/t.png"], 0.95),
               rec("b", False, 0.2, None, False, [], 0.85),
               rec("c", True, 0.7, "copy_move", False, [], 0.65)]
    masks = {"a": (pred_small, pred_small.astype(float)), "c": (np.ones((8, 8), bool), None)}
    out = compute_metrics(records, tmp_path, lambda r: masks.get(r["id"], (None, None)))
    m = {k: v["value"] for k, v in out["metrics"].items()}
    assert m["forgery.pixel_f1@0.5"] == 1.0 and m["forgery.pixel_iou@0.5"] == 1.0
    assert out["metrics"]["forgery.pixel_f1@0.5"]["n"] == 1  # authentic images are not averaged in
    assert m["forgery.accuracy"] == pytest.approx(2 / 3)
    assert m["forgery.auc"] == 1.0  # P(tampered) ranks the tampered image (0.9) above both authentic ones
    assert m["forgery.authentic_false_positive_area"] == pytest.approx(0.5)  # b: nothing, c: everything
    assert m["forgery.manipulation_accuracy"] == 1.0
    assert m["explanations.forgery_consistent"] == pytest.approx(2 / 3)
    assert m["calibration.ece"] == pytest.approx((abs(1 - 0.95) + abs(1 - 0.85) + abs(0 - 0.65)) / 3)
    # the verdicts' own probabilities: a 0.9 (right), b 1 - 0.2 (right), c 0.7 (wrong), one bin each
    assert m["calibration[task=forgery.detect].verdict_ece"] == pytest.approx((0.1 + 0.2 + 0.7) / 3)
    assert m["cost.seconds_per_sample"] == 0.5
    assert "calibration[task=forgery.detect].ece" not in m  # one task: the pooled figure is the per-task one
    # c's text says tampered and so does its result; b says authentic: every answer agrees with its result
    assert m["explanations.text_matches_result[verdict]"] == 1.0 and m["explanations.repeated_4gram"] == 0.0


def test_text_metrics_catch_an_answer_against_its_result_and_a_repeated_run(tmp_path):
    from loupe_vlm.finetune.eval import compute_metrics

    def rec(id_, task, text, **result):
        return {"id": id_, "sample_task": task, "images": ["a.png"], "error": None, "text": text,
                "confidence": None, "seconds": 0.1, "gt": {"task": task}, **result}

    records = [rec("v", "forgery.detect", "The image is authentic. Nothing was pasted.",
                   forgery={"tampered": True, "probability": 0.55}),  # the word and the number disagree
               rec("r", "quality.assess", "Some blur. Overall, the quality is poor.",
                   quality={"rating": "poor", "score": 2.1}),
               rec("c", "quality.compare", "Image A is better. Both show a cat. So image A is better.",
                   comparison={"better": "A", "probability": 0.8}),
               rec("n", "quality.identify", "There is no visible distortion.", quality={"rating": None})]
    out = compute_metrics(records, tmp_path, lambda r: (None, None))
    m = {k: (v["value"], v["n"]) for k, v in out["metrics"].items()}
    assert m["explanations.text_matches_result"] == (pytest.approx(2 / 3), 3)  # n has no rating: left out
    assert m["explanations.text_matches_result[verdict]"] == (0.0, 1)
    assert m["explanations.text_matches_result[rating]"] == (1.0, 1)
    assert m["explanations.text_matches_result[better]"] == (1.0, 1)
    assert m["explanations.repeated_4gram"] == (0.25, 4)
    assert m["explanations.repeated_4gram[quality.compare]"] == (1.0, 1)


def test_verdict_calibration_of_ab_uses_the_probability_of_the_image_named_better(tmp_path):
    from loupe_vlm.finetune.eval import compute_metrics

    def rec(id_, better, prob, truth):
        return {"id": id_, "sample_task": "quality.compare", "images": ["a.png", "b.png"], "error": None,
                "text": f"Image {better} is better.", "confidence": 0.5, "seconds": 0.1,
                "comparison": {"better": better, "probability": prob, "p_a": prob if better == "A" else 1 - prob,
                               "p_a_swapped": None, "consistent": None},
                "gt": {"task": "quality.compare", "better": truth}}

    out = compute_metrics([rec("x", "A", 0.95, "A"), rec("y", "B", 0.65, "A")], tmp_path, lambda r: (None, None))
    m = {k: v["value"] for k, v in out["metrics"].items()}
    assert m["compare.accuracy"] == 0.5
    assert m["calibration[task=quality.compare].verdict_ece"] == pytest.approx((0.05 + 0.65) / 2)
    assert m["calibration.ece"] == pytest.approx(0.0)  # the answer confidence, 0.5 for both: a different figure


def test_compare_flags_different_data_and_protocols(tmp_path, capsys):
    from loupe_vlm.finetune.eval import main

    for name, card, proto, value in (("r1", "aaa", "p1", 0.5), ("r2", "bbb", "p2", 0.75)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "model": name, "dataset": {"path": "d", "card_sha256": card},
            "metrics": {"quality.srcc": {"value": value, "protocol": proto, "n": 10}}}))
    assert main(["--compare", str(tmp_path / "r1"), str(tmp_path / "r2")]) == 0
    out = capsys.readouterr().out
    assert "WARNING: the dataset cards differ" in out and "PROTOCOLS DIFFER: p1 | p2" in out
    assert "0.5000" in out and "0.7500" in out and "+0.2500" in out
    assert main(["--compare", str(tmp_path / "r1"), str(tmp_path / "missing")]) == 2


def test_nothing_to_evaluate_is_a_clear_error(dataset):
    from types import SimpleNamespace

    from loupe_vlm.finetune.eval import EvalError, evaluate

    idle = SimpleNamespace(name="idle@0")  # never asked to run anything
    with pytest.raises(EvalError, match=r"for tasks quality.identify \(it holds: forgery.detect, quality.assess"):
        evaluate(idle, dataset, tasks=["quality.identify"], progress=False)
    with pytest.raises(EvalError, match="unknown task 'colour'"):
        evaluate(idle, dataset, tasks=["colour"], progress=False)
