"""``loupe train calibrate``: fit a checkpoint's verdict temperature on a validation report.

    loupe eval --model CKPT --data DATA/forgery/val.jsonl --out runs/val-forgery
    loupe train calibrate --checkpoint CKPT --report runs/val-forgery          # writes CKPT/loupe_config.json
    loupe train calibrate --checkpoint CKPT --report runs/val-forgery --dry-run

The model reads P(tampered) at the answer's first verdict word. That probability can be badly calibrated:
loupe-smol's verdict ECE was 0.149. Temperature scaling (Guo et al., 2017) replaces it by
``sigmoid(logit(p) / T)``, with the one number T fitted by maximum likelihood on held-out answers. It keeps
which side of 0.5 every probability is on, so no verdict, text, mask or accuracy changes; only the
reported probability and the calibration figures do.

The records are the forgery answers of a ``loupe eval`` report folder (``predictions.jsonl``). The report
must be of this checkpoint: its ``model`` must match, before any ``+fp16lm`` suffix. Fit on a validation
split, not on the test split the figures are reported on: a report of a file named ``test*.jsonl`` is
refused unless ``--allow-test``. The fit is done on the LM's own logit: the report's probability is
undone with the temperature the checkpoint had when the report was made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from loupe_vlm.assistant.inference import checkpoint_id
from loupe_vlm.assistant.modeling import CheckpointError, LoupeConfig

from . import metrics as M

MIN_RECORDS = 20


class CalibrationError(ValueError):
    pass


def read_report(report: Path) -> tuple[list[float], list[bool], str, str]:
    """``(P(tampered), truth, model, data)`` of the forgery answers in a report folder."""
    preds = report / "predictions.jsonl"
    if not preds.is_file():
        raise CalibrationError(f"{report}: no predictions.jsonl; run loupe eval --out {report} first")
    state_file = report / "run.json"  # loupe eval's run state: which model on which data
    data = ""
    if state_file.is_file():
        try:
            data = str(json.loads(state_file.read_text()).get("data") or "")
        except (OSError, ValueError):
            data = ""
    probs, truth, models = [], [], set()
    with open(preds, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise CalibrationError(f"{preds}:{n}: not JSON ({exc}); delete the report and rerun loupe eval") from None
            if rec.get("sample_task") != "forgery.detect" or rec.get("error"):
                continue
            p = (rec.get("forgery") or {}).get("probability")
            y = (rec.get("gt") or {}).get("tampered")
            if p is None or y is None:
                continue
            probs.append(float(p))
            truth.append(bool(y))
            models.add(str(rec.get("model", "")))
    if len(models) > 1:
        raise CalibrationError(f"{preds}: answers of several models ({', '.join(sorted(models))})")
    return probs, truth, (models.pop() if models else ""), data


def _logits(probs: list[float], temperature: float) -> np.ndarray:
    p = np.clip(np.asarray(probs, float), 1e-12, 1 - 1e-12)
    return np.log(p / (1 - p)) * temperature


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    # log(1 + exp(-s)) for y, log(1 + exp(s)) for not y, written stably
    return float(np.mean(np.logaddexp(0.0, np.where(y, -s, s))))


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The T that minimises the mean negative log-likelihood of ``y`` under ``sigmoid(z / T)``."""
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda u: _nll(z, y, math.exp(u)), bounds=(math.log(0.05), math.log(20.0)),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def _verdict_ece(z: np.ndarray, y: np.ndarray, t: float) -> float:
    p = 1.0 / (1.0 + np.exp(-z / t))
    verdict = p >= 0.5
    return M.calibration(np.where(verdict, p, 1 - p).tolist(), (verdict == y).tolist())["ece"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe train calibrate", description=__doc__.split("\n\n")[0].strip(),
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT", help="the Loupe checkpoint folder")
    p.add_argument("--report", required=True, type=Path, metavar="DIR",
                   help="a loupe eval report folder of CKPT on a validation split")
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument("--allow-test", action="store_true", help="accept a report of a test split (not advised)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config_file = args.checkpoint / "loupe_config.json"
        config = LoupeConfig.load(config_file)
        probs, truth, model, data = read_report(args.report)
        own = checkpoint_id(args.checkpoint, config.name)
        if model.split("+", 1)[0] != own:
            raise CalibrationError(f"{args.report}: its answers are of model {model or '(none)'}, not of "
                                   f"{args.checkpoint} ({own}); run loupe eval with this checkpoint")
        if Path(data).name.startswith("test") and not args.allow_test:
            raise CalibrationError(f"{args.report}: is a report of {data}, a test split; fit on the validation "
                                   "split (val.jsonl) so that the test figures stay honest, or pass --allow-test")
        y = np.asarray(truth, bool)
        if len(y) < MIN_RECORDS or y.all() or not y.any():
            raise CalibrationError(f"{args.report}: {len(y)} forgery answers with a verdict probability, "
                                   f"{int(y.sum())} of them tampered; the fit needs at least {MIN_RECORDS} "
                                   "with both kinds")
    except (CalibrationError, CheckpointError, ValueError, OSError) as exc:
        print(f"loupe train calibrate: {exc}", file=sys.stderr)
        return 2
    z = _logits(probs, config.verdict_temperature)
    t = fit_temperature(z, y)
    print(f"{len(y)} forgery answers ({int(y.sum())} tampered) from {args.report}")
    print(f"verdict temperature: {config.verdict_temperature:.4g} -> {t:.4g}")
    for label, temp in (("before", config.verdict_temperature), ("after", t)):
        print(f"  {label:6s}  NLL {_nll(z, y, temp):.4f}   verdict ECE {_verdict_ece(z, y, temp):.4f}   (on these records)")
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    config.verdict_temperature = round(t, 4)
    config.check()
    fd, tmp = tempfile.mkstemp(prefix=".loupe_config.", dir=args.checkpoint)
    os.close(fd)
    config.save(Path(tmp))
    os.replace(tmp, config_file)
    print(f"wrote verdict_temperature = {config.verdict_temperature} to {config_file}")
    return 0
