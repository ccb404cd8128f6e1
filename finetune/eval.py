"""``loupe eval``: run a checkpoint over a Sample dataset and report the field's metrics.

``evaluate(assistant, samples, root, ...)`` is the importable core (training calls it for in-run
evaluation); ``main(argv)`` is the CLI. For each Sample it builds the Assistant ``Request`` the
sample asks for (its task, images and roles, the canonical question of its variant), runs them in
batches through ``Assistant.run`` and keeps one record per sample:

* ``REPORT_DIR/predictions.jsonl``: the caption schema of DESIGN.md (``Result.to_record``) plus
  ``sample_task`` and ``gt`` (the ground truth the metrics need, taken from ``meta``). Lines are
  appended and fsynced after each batch, after the batch's mask PNGs, so a killed run resumes by
  skipping the ids already there.
* ``REPORT_DIR/masks/ID.png``: the predicted mask (255 = manipulated) and ``prob_maps/ID.png`` its
  per-pixel probability (0..255), for best-threshold F1 and the worst-cases grid.
* ``metrics.json``: every number under a name with its protocol and n, the dataset card's sha256 and
  the model id; ``report.md`` and plots (``finetune/report.py``).

Quality ground truth for SRCC/PLCC: ``meta.mos`` when the dataset has one (imported public sets);
otherwise a severity-derived MOS-like value, ``5 - 0.8 * max severity - 0.2 * sum of the other
severities`` clipped to [1, 5] (5 for a clean image), which ranks more finely than the 5 rating
words; failing both, the rating value 5..1. The report names which one was used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from loupe_vlm.assistant import lm_precision
from loupe_vlm.assistant.inference import GUIDANCE_HELP, MODEL_HELP, Assistant, Request, Result
from loupe_vlm.prompts import CATEGORIES, RATINGS, TASKS, Sample, SampleError, canonical_question, iter_jsonl, rating_value
from loupe_vlm.prompts.taxonomy import severity_mos
from loupe_vlm.prompts.parsing import parse_locations, parse_verdict, states_clean

from . import metrics as M

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_STATE = "run.json"

Judge = Callable[[dict, Sample], "float | None"]


class EvalError(RuntimeError):
    """A problem with the inputs or the report folder, worded for the user."""


# ---- ground truth and requests ----------------------------------------------------------------


def post_label(post: Sequence[dict] | None) -> str:
    """A post-processing group name: ``none`` or ops joined by '+', JPEG bucketed by quality."""
    if not post:
        return "none"
    parts = []
    for op in post:
        name = op.get("op", "?")
        if name == "jpeg" and op.get("quality") is not None:
            q = int(op["quality"])
            name = "jpeg>=90" if q >= 90 else "jpeg70-89" if q >= 70 else "jpeg<70"
        parts.append(name)
    return "+".join(parts)


def ground_truth(sample: Sample) -> dict[str, Any]:
    """The ground-truth fields evaluation reads from a sample's ``meta`` (missing ones are None)."""
    meta = sample.meta
    gt: dict[str, Any] = {"task": sample.task, "detail": meta.get("detail"),
                          "group": meta.get("reference_group") or meta.get("source_photo") or meta.get("source")}
    if sample.task in ("quality.assess", "quality.identify"):
        dists = meta.get("distortions")
        if dists is None and meta.get("clean"):
            dists = []
        gt["distortions"] = None if dists is None else [
            {"name": d.get("name"), "category": d.get("category"), "severity": d.get("severity")} for d in dists]
        rating = meta.get("rating")
        gt["rating"] = rating if rating in RATINGS else None
        if meta.get("mos") is not None:
            gt["mos"], gt["mos_source"] = float(meta["mos"]), "mos"
        elif gt["distortions"] is not None:
            gt["mos"], gt["mos_source"] = severity_mos(gt["distortions"]), "severity_mos"
        elif gt["rating"] is not None:
            gt["mos"], gt["mos_source"] = float(rating_value(gt["rating"])), "rating"
        else:
            gt["mos"] = gt["mos_source"] = None
    elif sample.task in ("quality.rate", "quality.compare"):
        better = meta.get("better")
        gt["better"] = better if better in ("A", "B") else None
    elif sample.task == "forgery.detect":
        regions = meta.get("regions") or []
        tampered = meta.get("tampered")
        gt.update({"tampered": None if tampered is None else bool(tampered),
                   "manipulation": meta.get("manipulation") if tampered else "authentic",
                   "masks": list(sample.masks), "locations": [r.get("location") for r in regions],
                   "post": post_label(meta.get("post"))})
    return gt


def build_request(sample: Sample, root: Path) -> Request:
    """The Assistant request a sample asks for: its images in role order and its variant's canonical question."""
    detail = sample.meta.get("detail") == "detailed"
    reference = "reference" in sample.image_roles
    return Request(task=sample.task, images=[root / p for p in sample.images], roles=list(sample.image_roles),
                   question=canonical_question(sample.task, detail, reference), detail=detail, id=sample.id,
                   names=list(sample.images))


def select(samples: Iterable[Sample], tasks: Sequence[str] | None = None, limit: int | None = None) -> list[Sample]:
    """Samples of the given tasks (a full name or a prefix like ``quality``), at most ``limit``, in order."""
    if tasks:
        for t in tasks:
            if not any(task == t or task.startswith(t + ".") for task in TASKS):
                raise EvalError(f"unknown task {t!r}; use one of {', '.join(TASKS)} (or quality / forgery)")
    chosen = [s for s in samples if not tasks or any(s.task == t or s.task.startswith(t + ".") for t in tasks)]
    return chosen[:limit] if limit is not None else chosen


def card_hash(root: Path) -> str | None:
    """sha256 of the dataset's card.md (None when the folder has none)."""
    card = root / "card.md"
    return hashlib.sha256(card.read_bytes()).hexdigest() if card.is_file() else None


def _safe(sample_id: str) -> str:
    return re.sub(r"[^\w.-]", "_", sample_id)


# ---- the report folder ------------------------------------------------------------------------


class PredictionStore:
    """predictions.jsonl + mask PNGs in a report folder (or in memory with ``out_dir=None``)."""

    def __init__(self, out_dir: Path | None, model: str, data: str, restart: bool = False):
        self.out_dir = out_dir
        self.records: dict[str, dict] = {}
        self.memory_masks: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        if out_dir is None:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "masks").mkdir(exist_ok=True)
        (out_dir / "prob_maps").mkdir(exist_ok=True)
        state_path, pred_path = out_dir / RUN_STATE, out_dir / PREDICTIONS
        if restart:
            pred_path.unlink(missing_ok=True)
            state_path.unlink(missing_ok=True)
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            if state.get("model") != model or state.get("data") != data:
                raise EvalError(f"{out_dir} holds predictions of model {state.get('model')} on {state.get('data')}; "
                                f"this run is {model} on {data}. Use another --out, or --restart to discard them.")
        else:
            state_path.write_text(json.dumps({"model": model, "data": data, "sessions": []}, indent=2))
        if pred_path.is_file():
            self._recover(pred_path)

    def _recover(self, path: Path) -> None:
        good, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.records[rec["id"]] = rec
                good.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += 1  # a line cut by a kill mid-write
        if dropped:
            logger.warning("%s: dropped %d incomplete line(s) left by an interrupted run", path, dropped)
            path.write_text("".join(x + "\n" for x in good), encoding="utf-8")
        if self.records:
            logger.info("%s: resuming, %d sample(s) already done", path, len(self.records))

    def done(self) -> set[str]:
        return set(self.records)

    def add(self, batch: list[tuple[Sample, Result, dict]], judge_scores: list[float | None]) -> None:
        """Save the batch's masks, then append its records (fsynced) so a kill never loses a mask."""
        lines = []
        for (sample, result, gt), score in zip(batch, judge_scores):
            mask_rel = prob_rel = None
            f = result.forgery
            if f is not None and f.mask is not None:
                if self.out_dir is None:
                    self.memory_masks[sample.id] = (f.mask, f.mask_probability)
                else:
                    mask_rel = f"masks/{_safe(sample.id)}.png"
                    Image.fromarray(f.mask.astype(np.uint8) * 255).save(self.out_dir / mask_rel)
                    if f.mask_probability is not None:
                        prob_rel = f"prob_maps/{_safe(sample.id)}.png"
                        Image.fromarray((np.clip(f.mask_probability, 0, 1) * 255).round().astype(np.uint8)).save(
                            self.out_dir / prob_rel)
            rec = result.to_record(mask_rel)
            _full_precision(rec, result)
            rec.update({"id": sample.id, "sample_task": sample.task, "prob_map": prob_rel, "gt": gt})
            if score is not None:
                rec["judge_score"] = score
            self.records[sample.id] = rec
            lines.append(json.dumps(rec, ensure_ascii=False))
        if self.out_dir is not None and lines:
            with (self.out_dir / PREDICTIONS).open("a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def predicted_mask(self, rec: dict) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(binary mask, probability map) of a forgery record; (None, None) when it has none."""
        if self.out_dir is None:
            return self.memory_masks.get(rec["id"], (None, None))
        fr = rec.get("forgery") or {}
        binary = prob = None
        if fr.get("mask"):
            binary = np.asarray(Image.open(self.out_dir / fr["mask"]).convert("L")) > 127
        if rec.get("prob_map"):
            prob = np.asarray(Image.open(self.out_dir / rec["prob_map"]).convert("L"), dtype=np.float32) / 255.0
        return binary, prob

    def log_session(self, session: dict) -> list[dict]:
        if self.out_dir is None:
            return [session]
        path = self.out_dir / RUN_STATE
        state = json.loads(path.read_text())
        state.setdefault("sessions", []).append(session)
        path.write_text(json.dumps(state, indent=2))
        return state["sessions"]


def _full_precision(rec: dict, result: Result) -> None:
    """Put back the unrounded numbers: caption's 4-decimal rounding makes rank ties that bias SRCC and AUC."""
    if rec.get("quality") and result.quality is not None:
        rec["quality"]["score"] = result.quality.score
    if rec.get("comparison") and result.comparison is not None:
        c = result.comparison
        rec["comparison"].update({"probability": c.probability, "p_a": c.p_a, "p_a_swapped": c.p_a_swapped})
    if rec.get("forgery") and result.forgery is not None:
        rec["forgery"]["probability"] = result.forgery.probability
    if result.confidence is not None and rec.get("confidence") is not None:
        rec["confidence"] = result.confidence


# ---- running --------------------------------------------------------------------------------


def peak_memory_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def evaluate(assistant: Assistant, samples: Sequence[Sample] | str | Path, root: str | Path | None = None,
             tasks: Sequence[str] | None = None, limit: int | None = None, out_dir: str | Path | None = None,
             progress: bool = True, batch_size: int = 8, judge: Judge | None = None, restart: bool = False,
             data_name: str | None = None) -> dict[str, Any]:
    """Evaluate ``assistant`` on samples (a list, or a path to a Sample JSONL) and return metrics.json's dict.

    ``root`` is the dataset folder the samples' paths are relative to (default: the JSONL's folder).
    With ``out_dir`` the predictions, masks, metrics.json, report.md and plots are written there and
    an interrupted run resumes; without it everything stays in memory (handy during training).
    """
    skipped: list[SampleError] = []
    if isinstance(samples, (str, Path)):
        path = Path(samples)
        root = Path(root) if root is not None else path.parent
        data_name = data_name or str(path.resolve())  # resolved: a resumed run may name it another way
        samples = [s for _, s in iter_jsonl(path, errors=skipped)]
        for err in skipped[:5]:
            logger.warning("skipping a bad line: %s", err)
    if root is None:
        raise EvalError("evaluate() needs root, the dataset folder the samples' paths are relative to")
    root = Path(root)
    chosen = select(samples, tasks, limit)
    if not chosen:
        present = sorted({s.task for s in samples})
        raise EvalError(f"no samples to evaluate in {data_name or root}"
                        + (f" for tasks {', '.join(tasks)} (it holds: {', '.join(present) or 'nothing'})" if tasks
                           else ""))
    data_name = data_name or str(root.resolve())
    store = PredictionStore(Path(out_dir) if out_dir is not None else None, assistant.name, data_name,
                            restart=restart)
    done = store.done()
    todo = [s for s in chosen if s.id not in done]
    t_start = time.perf_counter()
    bar = tqdm(total=len(chosen), initial=len(chosen) - len(todo), desc="loupe eval", unit="sample",
               disable=not progress)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        results = assistant.run([build_request(s, root) for s in chunk], batch_size=batch_size)
        scores = [judge(r.to_record(), s) if judge is not None and r.error is None else None
                  for s, r in zip(chunk, results)]
        store.add([(s, r, ground_truth(s)) for s, r in zip(chunk, results)], scores)
        bar.update(len(chunk))
    bar.close()
    wall = time.perf_counter() - t_start
    session = {"samples": len(todo), "wall_seconds": round(wall, 3), "peak_rss_mb": round(peak_memory_mb(), 1)}
    if torch.cuda.is_available():
        session["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    sessions = store.log_session(session)
    records = [store.records[s.id] for s in chosen if s.id in store.records]
    result = compute_metrics(records, root, store.predicted_mask, sessions)
    result.update({"model": assistant.name, "dataset": {"path": data_name, "card_sha256": card_hash(root),
                                                        "skipped_lines": len(skipped)}})
    result = M.finite(result)
    if out_dir is not None:
        out = Path(out_dir)
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        from .report import write_report

        write_report(result, out, root)
    return result


# ---- metrics over records -------------------------------------------------------------------


class _Table:
    """Collects named numbers, each with its protocol and n: metrics.json's ``metrics`` section."""

    def __init__(self) -> None:
        self.items: dict[str, dict[str, Any]] = {}

    def put(self, name: str, value: Any, protocol: str, n: int) -> None:
        if value is not None:
            self.items[name] = {"value": value, "protocol": protocol, "n": n}


def compute_metrics(records: list[dict], root: Path,
                    predicted_mask: Callable[[dict], tuple[np.ndarray | None, np.ndarray | None]],
                    sessions: list[dict] | None = None) -> dict[str, Any]:
    """All metrics from prediction records (with ``gt``) and the predicted masks."""
    table, details = _Table(), {}
    ok = [r for r in records if r.get("error") is None]
    counts = defaultdict(int)
    for r in records:
        counts[r["sample_task"]] += 1
    details["counts"] = {"records": len(records), "errors": len(records) - len(ok), "by_task": dict(counts)}
    table.put("run.errors", len(records) - len(ok), "records whose images failed to load (left out of every metric)",
              len(records))
    correct_for_calibration: list[tuple[float, bool, str]] = []
    verdicts: list[tuple[float, bool, str]] = []  # (probability of the chosen verdict, correct, task)
    _quality(ok, table, details, correct_for_calibration)
    _comparison(ok, table, correct_for_calibration, verdicts)
    _forgery(ok, root, predicted_mask, table, details, correct_for_calibration, verdicts)
    _calibration(correct_for_calibration, table, details)
    _verdict_calibration(verdicts, table, details)
    _text(ok, table)
    judged = [r["judge_score"] for r in ok if r.get("judge_score") is not None]
    table.put("explanations.judge_score", M._mean(judged),
              "LLM judge, 0-10 against the reference answer and ground truth (DepictQA-style GPT scoring)", len(judged))
    secs = [r["seconds"] for r in ok if r.get("seconds") is not None]
    table.put("cost.seconds_per_sample", M._mean(secs), "mean Assistant-reported seconds per sample "
              "(image loading + share of batched generation; both orders for A/B)", len(secs))
    if sessions:
        n = sum(s["samples"] for s in sessions)
        wall = sum(s["wall_seconds"] for s in sessions)
        table.put("cost.wall_seconds_per_sample", M.safe_div(wall, n), "wall time of the eval sessions / samples run",
                  n)
        table.put("cost.peak_rss_mb", max(s["peak_rss_mb"] for s in sessions),
                  "peak resident memory of the eval process (resource.getrusage), max over sessions", n)
        cuda = [s["peak_cuda_mb"] for s in sessions if "peak_cuda_mb" in s]
        if cuda:
            table.put("cost.peak_cuda_mb", max(cuda), "torch.cuda.max_memory_allocated, max over sessions", n)
    return {"metrics": table.items, "details": details}


def _by_reference(records: list[dict], values: list) -> list[tuple[str, list]]:
    """``values`` (one per record) split into those of records whose question gave a reference image ("yes")
    and the others ("no")."""
    return [(tag, [v for r, v in zip(records, values) if (r.get("reference") is not None) == has])
            for tag, has in (("yes", True), ("no", False))]


def _quality(ok: list[dict], table: _Table, details: dict, calib: list) -> None:
    recs = [r for r in ok if r["sample_task"] in ("quality.assess", "quality.identify")]
    if not recs:
        return
    with_dist = [r for r in recs if r["gt"].get("distortions") is not None]
    preds = [(r.get("quality") or {}).get("distortions") or [] for r in with_dist]
    trues = [r["gt"]["distortions"] for r in with_dist]
    d = M.distortion_metrics(preds, trues, [states_clean(r.get("text") or "") for r in with_dist])
    details["severity_pairs"] = d.pop("severity_pairs")
    table.put("quality.category_accuracy", d["category_accuracy"],
              "single-distortion items: the answer names exactly the true category", d["single_n"])
    table.put("quality.function_accuracy", d["function_accuracy"],
              "single-distortion items whose answer names a function: first named function is the true one",
              d["function_n"])
    table.put("quality.set_precision", d["set_precision"],
              "multi-distortion items, partial credit (function 1, category only 0.5), DepictQA-style", d["multi_n"])
    table.put("quality.set_recall", d["set_recall"],
              "multi-distortion items, partial credit (function 1, category only 0.5), DepictQA-style", d["multi_n"])
    table.put("quality.clean_accuracy", d["clean_accuracy"],
              "distortion-free items whose answer says the image is clean and names no distortion", d["clean_n"])
    table.put("quality.clean_names_none", d["clean_names_none"],
              "distortion-free items whose answer names no taxonomy distortion (an invented name passes)", d["clean_n"])
    table.put("quality.severity_accuracy", d["severity_accuracy"],
              "true distortions whose category the answer names with a severity: exact level", d["severity_n"])
    table.put("quality.severity_mae", d["severity_mae"], "same items: mean absolute error in levels 1..5",
              d["severity_n"])
    table.put("quality.severity_within_1", d["severity_within_1"], "same items: share within one level",
              d["severity_n"])
    table.put("quality.severity_coverage", d["severity_coverage"],
              "share of true distortions given a severity for their category", d["severity_n"])
    strong = [(p, t) for p, t in zip(preds, trues) if len(t) == 1 and (t[0].get("severity") or 0) >= 2]
    if strong:
        table.put("quality.category_accuracy_severity2", M.distortion_metrics(*zip(*strong))["category_accuracy"],
                  "single-distortion items at severity >= 2: the answer names exactly the true category", len(strong))
    # with and without a reference image: a reference is read against (assistant/reference.py)
    for tag, part in _by_reference(with_dist, list(zip(preds, trues))):
        part = [(p, t) for p, t in part if len(t) == 1]
        if part:
            table.put(f"quality[reference={tag}].category_accuracy", M.distortion_metrics(*zip(*part))["category_accuracy"],
                      "single-distortion items, with / without a reference image", len(part))
    single = [(r["gt"]["distortions"][0]["category"], (p[0]["category"] if p else None))
              for r, p in zip(with_dist, preds) if len(r["gt"]["distortions"]) == 1]
    if single:
        details["category_confusion"] = M.confusion([t for t, _ in single], [p for _, p in single], CATEGORIES.ids)
    # rating and score: assess answers only (identify answers name distortions, no rating word)
    assess = [r for r in recs if r["sample_task"] == "quality.assess"]
    rated = [r for r in assess if r["gt"].get("rating") is not None]
    right = [(r.get("quality") or {}).get("rating") == r["gt"]["rating"] for r in rated]
    table.put("quality.rating_accuracy", M._mean(right),
              "quality.assess items: predicted rating word == true rating (no rating = wrong)", len(rated))
    for r, c in zip(rated, right):
        if r.get("confidence") is not None:
            calib.append((r["confidence"], c, "quality.assess"))
    scored = [r for r in assess if r["gt"].get("mos") is not None and (r.get("quality") or {}).get("score") is not None]
    if scored:
        sources = sorted({r["gt"]["mos_source"] for r in scored})
        label = "/".join(sources)
        pred = [r["quality"]["score"] for r in scored]
        true = [r["gt"]["mos"] for r in scored]
        c = M.correlation(pred, true)
        proto = f"global over all quality.assess items, score (rating-word expectation) vs ground truth [{label}]"
        table.put("quality.srcc", c["srcc"], proto, c["n"])
        for tag, part in _by_reference(scored, list(zip(pred, true))):
            if len(part) > 2:
                cp = M.correlation(*zip(*part))
                table.put(f"quality[reference={tag}].srcc", cp["srcc"],
                          "the same, over the items with / without a reference image", cp["n"])
        table.put("quality.plcc", c["plcc"], proto + ", no fit", c["n"])
        table.put("quality.plcc_logistic", c["plcc_logistic"], proto + ", after a 4-parameter logistic fit", c["n"])
        with_mos = [r for r in assess if r["gt"].get("mos") is not None]
        table.put("quality.score_coverage", M.safe_div(len(scored), len(with_mos)),
                  "share of quality.assess items with ground truth whose answer gave a score", len(with_mos))
        groups = [r["gt"].get("group") for r in scored]
        if any(g is not None for g in groups) and len(set(groups)) < len(groups):
            g = M.grouped_correlation(pred, true, groups)
            gproto = (f"per reference group (mean over {g['n_groups']} groups of >=3 items), "
                      f"NOT the global protocol [{label}]")
            table.put("quality.srcc_per_group", g["srcc"], gproto, g["n_groups"])
            table.put("quality.plcc_per_group", g["plcc"], gproto, g["n_groups"])
    # explanation consistency
    rows = [M.quality_text_consistency((r.get("quality") or {}).get("distortions") or [], r["gt"]["distortions"])
            for r in with_dist]
    s = M.share_true(rows)
    for key in ("names_true", "no_absent", "consistent"):
        table.put(f"explanations.quality_{key}", s.get(key),
                  "taxonomy parser on the answer vs true distortion categories: " + {
                      "names_true": "names every true one", "no_absent": "names no absent one",
                      "consistent": "both"}[key], s["n"])
    for r, row in zip(with_dist, rows):
        if r["sample_task"] == "quality.identify" and r.get("confidence") is not None:
            calib.append((r["confidence"], row["consistent"], "quality.identify"))


def _comparison(ok: list[dict], table: _Table, calib: list, verdicts: list) -> None:
    recs = [r for r in ok if r["sample_task"] in ("quality.rate", "quality.compare") and r["gt"].get("better")]
    if not recs:
        return
    comp = [r.get("comparison") or {} for r in recs]
    ab = M.ab_metrics([c.get("p_a") for c in comp], [c.get("p_a_swapped") for c in comp],
                      [c.get("better") for c in comp], [r["gt"]["better"] for r in recs])
    table.put("compare.accuracy_as_asked", ab["accuracy_as_asked"], "A/B verdict from the pair in the dataset's order",
              ab["n"])
    table.put("compare.accuracy_swapped", ab["accuracy_swapped"], "A/B verdict from the pair shown swapped", ab["n"])
    table.put("compare.accuracy", ab["accuracy_averaged"], "A/B verdict from P(A) averaged over both orders", ab["n"])
    table.put("compare.swap_consistency", ab["swap_consistency"],
              "share of pairs naming the same image in both orders", ab["swap_pairs"])
    for tag, part in _by_reference(recs, [c.get("better") == r["gt"]["better"] for r, c in zip(recs, comp)]):
        if part:
            table.put(f"compare[reference={tag}].accuracy", M._mean(part),
                      "the A/B verdict, pairs with / without a reference image", len(part))
    for r, c in zip(recs, comp):
        if r.get("confidence") is not None:
            calib.append((r["confidence"], c.get("better") == r["gt"]["better"], r["sample_task"]))
        if c.get("probability") is not None:  # P(the image named better), both orders averaged
            verdicts.append((c["probability"], c.get("better") == r["gt"]["better"], r["sample_task"]))


def _text(ok: list[dict], table: _Table) -> None:
    """The answers against their own structured results, and against repetition (issue 15's text targets)."""
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for r in ok:
        reading = M.structured_reading(r)
        if reading is not None:
            kind, value = reading
            by_kind[kind].append(M.text_reading(r.get("text") or "", kind) == value)
    every = [x for rows in by_kind.values() for x in rows]
    table.put("explanations.text_matches_result", M._mean(every),
              "the taxonomy parser's reading of the answer equals the structured result (forgery verdict, "
              "A/B verdict, or rating), over answers with one", len(every))
    for kind, rows in sorted(by_kind.items()):
        table.put(f"explanations.text_matches_result[{kind}]", M._mean(rows),
                  f"as above, answers whose structured result is a {kind}", len(rows))
    texts = [r.get("text") or "" for r in ok]
    table.put("explanations.repeated_4gram", M._mean(M.repeated_ngram(t) is not None for t in texts),
              "share of answers in which some run of 4 words occurs twice (lower-cased, punctuation and "
              "mask tokens left out)", len(texts))
    for task in sorted({r["sample_task"] for r in ok}):
        rows = [M.repeated_ngram(r.get("text") or "") is not None for r in ok if r["sample_task"] == task]
        table.put(f"explanations.repeated_4gram[{task}]", M._mean(rows), f"as above, {task} answers", len(rows))


def _load_truth_mask(root: Path, rels: Sequence[str], shape: tuple[int, int] | None) -> np.ndarray | None:
    """Union of a sample's true masks (>127 is manipulated)."""
    out = None
    for rel in rels:
        m = np.asarray(Image.open(root / rel).convert("L")) > 127
        out = m if out is None else (out | m)
    return out


def _fit(mask: np.ndarray | None, shape: tuple[int, int], binary: bool) -> np.ndarray | None:
    """A predicted map resized to the truth's (H, W) when they differ (nearest for binary)."""
    if mask is None or mask.shape == shape:
        return mask
    if binary:
        img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
        return np.asarray(img) > 127
    img = Image.fromarray(mask.astype(np.float32)).resize((shape[1], shape[0]), Image.BILINEAR)
    return np.asarray(img)


def _forgery(ok: list[dict], root: Path, predicted_mask: Callable, table: _Table, details: dict, calib: list,
             verdicts: list) -> None:
    recs = [r for r in ok if r["sample_task"] == "forgery.detect" and r["gt"].get("tampered") is not None]
    if not recs:
        return
    cases = []
    per: list[dict[str, Any]] = []
    for r in recs:
        gt, fr = r["gt"], r.get("forgery") or {}
        truth = bool(gt["tampered"])
        pred = fr.get("tampered")
        row: dict[str, Any] = {"truth": truth, "pred": (not truth) if pred is None else bool(pred),
                               "no_verdict": pred is None, "prob": fr.get("probability"),
                               "manipulation": gt.get("manipulation") or "unknown", "post": gt.get("post", "none"),
                               "f1": None, "iou": None, "f1_best": None, "fp_area": None}
        binary, prob = predicted_mask(r)
        if truth and gt.get("masks"):
            true_mask = _load_truth_mask(root, gt["masks"], None)
            binary, prob = _fit(binary, true_mask.shape, True), _fit(prob, true_mask.shape, False)
            row["f1"], row["iou"] = M.mask_f1_iou(binary, true_mask)
            row["f1_best"] = M.best_threshold_f1(prob if prob is not None else binary, true_mask)
            cases.append({"id": r["id"], "image": r["images"][0], "truth_masks": gt["masks"],
                          "pred_mask": fr.get("mask"), "pixel_f1": row["f1"], "iou": row["iou"]})
        elif not truth:
            row["fp_area"] = 0.0 if binary is None else float(binary.mean())
        per.append(row)
        if r.get("confidence") is not None and pred is not None:
            calib.append((r["confidence"], bool(pred) == truth, "forgery.detect"))
        if pred is not None and fr.get("probability") is not None:  # P(the verdict given)
            p_t = float(fr["probability"])
            verdicts.append((p_t if pred else 1.0 - p_t, bool(pred) == truth, "forgery.detect"))
        v = M.forgery_text_consistency(parse_verdict(r.get("text") or ""), int(fr.get("regions") or 0),
                                       parse_locations(r.get("text") or ""), truth, gt.get("locations") or [])
        row["text"] = v

    def block(rows: list[dict], prefix: str, label: str) -> None:
        c = M.binary_classification([x["truth"] for x in rows], [x["pred"] for x in rows], [x["prob"] for x in rows])
        where = f" ({label})" if label else ""
        table.put(f"{prefix}.accuracy", c["accuracy"], "image-level, authentic images included; no verdict = wrong"
                  + where, c["n"])
        table.put(f"{prefix}.f1", c["f1"], "image-level F1 of the tampered class, authentic included" + where, c["n"])
        table.put(f"{prefix}.balanced_accuracy", c["balanced_accuracy"], "image-level (TPR + TNR) / 2" + where, c["n"])
        table.put(f"{prefix}.auc", c["auc"], "image-level ROC AUC of P(tampered)" + where, c["auc_n"])
        loc = [x for x in rows if x["f1"] is not None]
        table.put(f"{prefix}.pixel_f1@0.5", M._mean(x["f1"] for x in loc),
                  "IMDL-BenCo: pixel-F1 at fixed 0.5 per tampered image, averaged" + where, len(loc))
        table.put(f"{prefix}.pixel_iou@0.5", M._mean(x["iou"] for x in loc),
                  "IoU at fixed 0.5 per tampered image, averaged" + where, len(loc))
        table.put(f"{prefix}.pixel_f1_best_threshold", M._mean(x["f1_best"] for x in loc),
                  "BEST-THRESHOLD (per-image oracle, optimistic) pixel-F1, averaged over tampered images" + where,
                  len(loc))

    block(per, "forgery", "")
    fp = [x["fp_area"] for x in per if x["fp_area"] is not None]
    table.put("forgery.authentic_false_positive_area", M._mean(fp),
              "authentic images: mean share of pixels the predicted mask marks", len(fp))
    no_v = [x["no_verdict"] for x in per]
    table.put("forgery.no_verdict_rate", M._mean(no_v), "answers with no verdict word", len(no_v))
    manip = [(r.get("forgery") or {}).get("manipulation") == r["gt"]["manipulation"]
             for r in recs if r["gt"]["tampered"]]
    table.put("forgery.manipulation_accuracy", M._mean(manip),
              "tampered images: the manipulation named first is the true one", len(manip))
    s = M.share_true([x["text"] for x in per])
    for key in ("verdict", "region_count", "location", "consistent"):
        table.put(f"explanations.forgery_{key}", s.get(key), "taxonomy parser on the answer: " + {
            "verdict": "states the true verdict", "region_count": "one mask token per true region",
            "location": "names the true region locations (multiset; none for authentic)",
            "consistent": "all three"}[key], s["n"])
    for key, label in (("manipulation", "manipulation"), ("post", "post-processing")):
        groups: dict[str, list[dict]] = defaultdict(list)
        for x in per:
            groups[x[key]].append(x)
        if len(groups) > 1 or key == "manipulation":
            for g, rows in sorted(groups.items()):
                block(rows, f"forgery[{key}={g}]", f"{label} = {g}")
    details["forgery_cases"] = sorted(cases, key=lambda c: c["pixel_f1"])


def _calibration(items: list[tuple[float, bool, str]], table: _Table, details: dict) -> None:
    if not items:
        return
    cal = M.calibration([c for c, _, _ in items], [y for _, y, _ in items])
    details["calibration"] = cal
    tasks = sorted({t for _, _, t in items})
    table.put("calibration.ece", cal["ece"], "expected calibration error, 10 equal-width confidence bins, answers of "
              + ", ".join(tasks) + " (correct = rating / verdict / A-B / consistent distortions)", cal["n"])
    for k in cal["kept"]:
        if k["threshold"] in (0.5, 0.8, 0.9):
            table.put(f"calibration.kept@{k['threshold']}", k["share"], "share of answers with confidence >= threshold",
                      cal["n"])
            table.put(f"calibration.accuracy@{k['threshold']}", k["accuracy"],
                      "accuracy of the answers kept at that threshold", cal["n"])
    if len(tasks) > 1:  # confidence means different things per task; the pooled ECE can hide that
        for task in tasks:
            sub = [(c, y) for c, y, t in items if t == task]
            per = M.calibration([c for c, _ in sub], [y for _, y in sub])
            table.put(f"calibration[task={task}].ece", per["ece"], f"expected calibration error, {task} answers only",
                      per["n"])


def _verdict_calibration(items: list[tuple[float, bool, str]], table: _Table, details: dict) -> None:
    """Calibration of the verdicts' own probabilities (what a result reports as ``probability``), per
    task: P(tampered) for the verdict given, and P(better) for the image named better."""
    if not items:
        return
    details["verdict_calibration"] = {}
    for task in sorted({t for _, _, t in items}):
        sub = [(c, y) for c, y, t in items if t == task]
        cal = M.calibration([c for c, _ in sub], [y for _, y in sub])
        details["verdict_calibration"][task] = cal
        table.put(f"calibration[task={task}].verdict_ece", cal["ece"],
                  f"expected calibration error of the verdict's own probability ({_VERDICT_PROB.get(task, task)}), "
                  "10 equal-width bins", cal["n"])


_VERDICT_PROB = {"forgery.detect": "P(tampered) or 1 - P(tampered), for the verdict given",
                 "quality.compare": "P(better) of the image named better, both orders averaged",
                 "quality.rate": "P(better) of the image named better, both orders averaged"}


# ---- LLM judge ------------------------------------------------------------------------------


JUDGE_PROMPT = (
    "You grade an image-analysis assistant. You are given the question, the ground-truth facts about the image(s), "
    "a reference answer written from those facts, and the assistant's answer. Score the assistant's answer from 0 "
    "(wrong or unrelated) to 10 (as correct and complete as the reference), judging factual agreement with the "
    "ground truth, not style. Reply with the score as a bare number.")


def make_judge(base_url: str, model: str, api_key_env: str = "LOUPE_JUDGE_API_KEY", timeout: float = 60.0,
               max_retries: int = 2) -> Judge:
    """An OpenAI-compatible LLM judge scoring answers 0-10 (DepictQA's GPT-4 scoring); None when it fails."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env, "EMPTY"), timeout=timeout,
                    max_retries=max_retries)

    def judge(record: dict, sample: Sample) -> float | None:
        facts = json.dumps({k: v for k, v in sample.meta.items() if k not in ("labeller", "tamper")}, default=str)
        question = next((p.get("text") for m in sample.messages if m["role"] == "user" for p in m["content"]
                         if p.get("type") == "text"), "")
        user = (f"Question: {question}\nGround truth: {facts}\nReference answer: {sample.answer()}\n"
                f"Assistant's answer: {record.get('text') or ''}\nScore (0-10):")
        try:
            reply = client.chat.completions.create(model=model, temperature=0, max_tokens=8, messages=[
                {"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": user}])
            text = reply.choices[0].message.content or ""
        except Exception as exc:  # noqa: BLE001 - any API failure leaves this item unjudged; the run goes on
            logger.warning("judge failed on %s: %s", sample.id, exc)
            return None
        m = re.search(r"\d+(?:\.\d+)?", text)
        if not m or not 0 <= float(m.group()) <= 10:
            logger.warning("judge gave no 0-10 score for %s: %r", sample.id, text)
            return None
        return float(m.group())

    return judge


# ---- compare --------------------------------------------------------------------------------


def compare_reports(r1: str | Path, r2: str | Path) -> str:
    """A side-by-side table of two reports' metrics (by name), with the difference."""
    reports = []
    for r in (r1, r2):
        path = Path(r) / "metrics.json" if Path(r).is_dir() else Path(r)
        if not path.is_file():
            raise EvalError(f"{path}: no metrics.json; give report folders written by `loupe eval --out`")
        reports.append(json.loads(path.read_text()))
    a, b = reports
    lines = [f"R1: {r1}  model {a.get('model')}  data {a['dataset'].get('path')}",
             f"R2: {r2}  model {b.get('model')}  data {b['dataset'].get('path')}"]
    if a["dataset"].get("card_sha256") != b["dataset"].get("card_sha256"):
        lines.append("WARNING: the dataset cards differ; these numbers come from different data and are not "
                     "comparable.")
    names = list(a["metrics"]) + [n for n in b["metrics"] if n not in a["metrics"]]
    width = max([len(n) for n in names] + [6])
    lines.append(f"{'metric':<{width}}  {'R1':>9}  {'R2':>9}  {'R2-R1':>9}  protocol / n")
    for n in names:
        x, y = a["metrics"].get(n), b["metrics"].get(n)
        vx, vy = (x or {}).get("value"), (y or {}).get("value")
        d = vy - vx if isinstance(vx, (int, float)) and isinstance(vy, (int, float)) else None
        proto = (x or y)["protocol"]
        if x and y and x["protocol"] != y["protocol"]:
            proto = "PROTOCOLS DIFFER: " + proto + " | " + y["protocol"]
        ns = f"n={(x or {}).get('n', '-')}/{(y or {}).get('n', '-')}"
        lines.append(f"{n:<{width}}  {_fmt(vx):>9}  {_fmt(vy):>9}  {_fmt(d, sign=True):>9}  {proto} ({ns})")
    return "\n".join(lines)


def _fmt(v: Any, sign: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:+.4f}" if sign else f"{v:.4f}"
    return f"{v:+d}" if sign and isinstance(v, int) else str(v)


# ---- CLI ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe eval",
        description="Evaluate a Loupe checkpoint on a dataset in the Sample format and write metrics.json, "
                    "predictions.jsonl, report.md and plots. An interrupted run resumes where it stopped.",
        epilog="examples:\n  loupe eval --data data/quality/test.jsonl --out reports/tiny-quality\n"
               "  loupe eval --model ckpt/ --data kadid/test.jsonl --tasks quality.assess --limit 500 --out r/kadid\n"
               "  loupe eval --compare reports/a reports/b",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="M", help=MODEL_HELP)
    p.add_argument("--data", metavar="JSONL", type=Path, help="a Sample JSONL, e.g. DATASET/test.jsonl")
    p.add_argument("--tasks", nargs="+", metavar="TASK",
                   help=f"only these tasks (full names or prefixes quality/forgery): {', '.join(TASKS)}")
    p.add_argument("--limit", type=int, metavar="N", help="at most N samples (the first N of the selection)")
    p.add_argument("--out", metavar="REPORT_DIR", type=Path, help="report folder (created; resumed if it holds a run)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="generations per batch (default: 8)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto: the GPU if there is one, else the CPU)")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default: 160)")
    p.add_argument("--evidence-guidance", type=float, metavar="S", help=GUIDANCE_HELP)
    p.add_argument("--lm-precision", choices=lm_precision.CHOICES, default="fp32",
                   help="weights of the language model while answering: fp32 (default here, so that a model "
                        "card's numbers come back exactly), auto or fp16: the fbgemm-packed fp16 weights that "
                        "ask, caption, demo and serve use on a CPU (assistant/lm_precision.py); compare the "
                        "two to see what they change")
    p.add_argument("--restart", action="store_true", help="discard the predictions already in REPORT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--judge-base-url", metavar="URL", help="OpenAI-compatible endpoint for the optional LLM judge")
    p.add_argument("--judge-model", metavar="NAME", help="judge model name (with --judge-base-url)")
    p.add_argument("--judge-api-key-env", default="LOUPE_JUDGE_API_KEY", metavar="VAR",
                   help="environment variable holding the judge's API key (default: LOUPE_JUDGE_API_KEY)")
    p.add_argument("--compare", nargs=2, metavar=("R1", "R2"), help="print two reports side by side and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.compare:
            print(compare_reports(*args.compare))
            return 0
        problems = []
        if args.data is None:
            problems.append("--data JSONL is required")
        if args.out is None:
            problems.append("--out REPORT_DIR is required")
        if bool(args.judge_base_url) != bool(args.judge_model):
            problems.append("--judge-base-url and --judge-model go together")
        if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
            problems.append("--batch-size and --limit must be positive")
        if problems:
            print("loupe eval: " + "; ".join(problems), file=sys.stderr)
            return 2
        if not args.data.is_file():
            print(f"loupe eval: {args.data}: no such dataset file; build one with `loupe build-data`", file=sys.stderr)
            return 2
        assistant = Assistant.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens,
                                              evidence_guidance=args.evidence_guidance,
                                              lm_precision=args.lm_precision)
        judge = make_judge(args.judge_base_url, args.judge_model, args.judge_api_key_env) if args.judge_model else None
        result = evaluate(assistant, args.data, tasks=args.tasks, limit=args.limit, out_dir=args.out,
                          progress=not args.no_progress, batch_size=args.batch_size, judge=judge,
                          restart=args.restart)
    except (EvalError, FileNotFoundError, RuntimeError, ValueError, SampleError) as exc:
        print(f"loupe eval: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/metrics.json, report.md, predictions.jsonl and plots "
          f"({result['details']['counts']['records']} samples, model {result['model']})")
    for name in ("quality.srcc", "quality.category_accuracy", "quality.rating_accuracy", "compare.accuracy",
                 "forgery.accuracy", "forgery.pixel_f1@0.5", "calibration.ece"):
        if name in result["metrics"]:
            print(f"  {name:<28} {_fmt(result['metrics'][name]['value'])}")
    return 0
