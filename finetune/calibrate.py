"""``loupe train calibrate``: fit how a checkpoint reads P(tampered) on validation data: its temperature, or its tampering map's verdict (--map).

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

With ``--map`` it fits the other reading of the verdict instead (``LoupeConfig.verdict_map``): P(tampered)
= ``sigmoid(a * m + b + c * d)`` of m, the largest logit of the auxiliary heads' tampering map on each image
of a validation JSONL (``--data``) (for a checkpoint with a forensic network, ``assistant/forensic.py``: that
network's image-level logit), and d, the image's copy-move evidence (``assistant/duplication.py``: a
region found twice in the image; 0 where none), by maximum likelihood (a logistic regression). The model
then decides its verdicts by that probability, and its answers write them. ``--no-duplicates`` fits
``sigmoid(a * m + b)`` alone; so does a split where no image shows copy-move evidence. This runs the heads
and the copy-move search alone on each image (about 0.4 s an image on 2 cores), not the language model:

    loupe train calibrate --checkpoint CKPT --map --data DATA/forgery/val.jsonl
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
from loupe_vlm.assistant.forensic import FORENSIC_FILE
from loupe_vlm.assistant.modeling import CheckpointError, LoupeConfig, map_logit

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


def fit_map(m: np.ndarray, y: np.ndarray, d: np.ndarray | None = None) -> tuple[float, ...]:
    """The (a, b) that minimise the mean negative log-likelihood of ``y`` under ``sigmoid(a * m + b)``; with
    ``d`` (copy-move evidence), the (a, b, c) of ``sigmoid(a * m + b + c * d)``."""
    from scipy.optimize import minimize

    x = np.stack([m] if d is None else [m, d], axis=1).astype(float)
    mu = x.mean(axis=0)
    sd = x.std(axis=0)
    sd[sd == 0] = 1.0  # fitted on standardised features, so the optimiser sees a round problem
    u = (x - mu) / sd
    # the copy-move weight gets a weak standard-normal prior (on the standardised feature): where no authentic
    # image shows copy-move evidence, as can happen, its maximum-likelihood value is infinite
    def objective(w: np.ndarray) -> float:
        penalty = 0.0 if d is None else 0.5 * float(w[1]) ** 2 / len(y)
        return _nll(u @ w[:-1] + w[-1], y, 1.0) + penalty

    res = minimize(objective, np.zeros(x.shape[1] + 1), method="BFGS")
    w = res.x[:-1] / sd
    b = float(res.x[-1] - w @ mu)
    return (float(w[0]), b) if d is None else (float(w[0]), b, float(w[1]))


def map_logits(checkpoint: Path, data: Path, progress: bool = True, duplicates: bool = False
               ) -> tuple[list[float], list[bool], int, list[float]]:
    """The largest tampering-map logit of the judged image of each forgery record in ``data`` with a
    known verdict (or, where the checkpoint has a forensic network, that network's image-level logit), the
    truths, how many records were skipped (an unreadable image), and with ``duplicates`` each judged image's
    copy-move evidence (``duplication.strength``; else an empty list)."""
    import torch
    from tqdm import tqdm

    from loupe_vlm.assistant import duplication
    from loupe_vlm.assistant.forensic import forensic_maps, load_forensic_model
    from loupe_vlm.assistant.modeling import ExplainableVLM, map_strength
    from loupe_vlm.assistant.processing import LoupeProcessor, load_image
    from loupe_vlm.prompts.sample import iter_jsonl

    model, processor = ExplainableVLM.from_pretrained(checkpoint)
    model.eval()
    lp = LoupeProcessor.for_model(model, processor)
    forensic = load_forensic_model(checkpoint)  # where the checkpoint has one, its map is the one the verdict reads
    samples = [(n, s) for n, s in iter_jsonl(data, errors=[], check_files=True)
               if s.task == "forgery.detect" and isinstance((s.meta or {}).get("tampered"), bool)]
    m: list[float] = []
    y: list[bool] = []
    d: list[float] = []
    skipped = 0
    with torch.no_grad():
        for line, sample in tqdm(samples, desc="tampering maps", disable=not progress, dynamic_ncols=True):
            try:
                enc = lp.encode_sample(sample, data.parent, train=False)
                pil = (load_image(data.parent / sample.images[enc.mask_image], lp.max_image_pixels)
                       if duplicates or forensic is not None else None)
            except (OSError, ValueError) as exc:
                print(f"{data}:{line}: skipped ({exc})", file=sys.stderr)
                skipped += 1
                continue
            if forensic is not None:  # its image-level logit, which the assistant reads too
                m.append(forensic_maps(forensic, [pil])[0][1])
            else:
                aux = model.encode_lowlevel([enc.lowlevel_pixels[-1]]).aux[0]
                if aux is None:
                    raise CalibrationError(f"{checkpoint}: this model has no tampering map (auxiliary heads); "
                                           "calibrate its language model's verdict with --report instead")
                m.append(map_strength(aux[1]))
            y.append(bool(sample.meta["tampered"]))
            if duplicates:
                d.append(duplication.strength(duplication.find_duplicate(np.asarray(pil.convert("RGB")))))
    return m, y, skipped, d


def _map_summary(m: np.ndarray, y: np.ndarray, coef: tuple[float, ...], d: np.ndarray) -> str:
    z = map_logit(m, coef, d)
    c = M.binary_classification(y.tolist(), (z >= 0).tolist())  # both kinds are present (checked before)
    return (f"NLL {_nll(z, y, 1.0):.4f}   verdict ECE {_verdict_ece(z, y, 1.0):.4f}   "
            f"balanced accuracy {c['balanced_accuracy']:.3f}   authentic called authentic {c['specificity']:.3f}")


def _refuse_test_split(name: str, what: str, allow: bool) -> None:
    """The fit is made on validation data so that the test figures stay honest."""
    if Path(name).name.startswith("test") and not allow:
        raise CalibrationError(f"{what}: {name} is a test split; fit on the validation split (val.jsonl) so "
                               "that the test figures stay honest, or pass --allow-test")


def _save(config: LoupeConfig, config_file: Path) -> None:
    config.check()
    fd, tmp = tempfile.mkstemp(prefix=".loupe_config.", dir=config_file.parent)
    os.close(fd)
    config.save(Path(tmp))
    os.replace(tmp, config_file)


def main_map(args: argparse.Namespace, config: LoupeConfig, config_file: Path) -> int:
    try:
        if args.data is None:
            raise CalibrationError("--map reads the heads on a validation JSONL: give it with --data")
        _refuse_test_split(str(args.data), "--data", args.allow_test)
        m, truth, skipped, dups = map_logits(args.checkpoint, args.data, progress=not args.no_progress,
                                             duplicates=not args.no_duplicates)
        y = np.asarray(truth, bool)
        if len(y) < MIN_RECORDS or y.all() or not y.any():
            raise CalibrationError(f"{args.data}: {len(y)} forgery records with a known verdict, {int(y.sum())} "
                                   f"of them tampered; the fit needs at least {MIN_RECORDS} with both kinds")
    except (CalibrationError, CheckpointError, ValueError, OSError) as exc:
        print(f"loupe train calibrate: {exc}", file=sys.stderr)
        return 2
    mm = np.asarray(m, float)
    dd = np.asarray(dups, float) if dups else np.zeros_like(mm)
    coef = fit_map(mm, y, dd if dups and dd.any() else None)
    print(f"{len(y)} forgery records ({int(y.sum())} tampered, {skipped} skipped) from {args.data}")
    if dups:
        found = dd > 0
        print(f"  copy-move evidence on {int(found[y].sum())} of {int(y.sum())} tampered and "
              f"{int(found[~y].sum())} of {int((~y).sum())} authentic images")
    if config.verdict_map is not None and (len(config.verdict_map) == 2 or dups):  # its evidence term was read
        print(f"  before  {_map_summary(mm, y, tuple(config.verdict_map), dd)}   (verdict_map {config.verdict_map})")
    print(f"  after   {_map_summary(mm, y, coef, dd)}   (on these records)")
    reading = ("the forensic network's image-level logit" if (args.checkpoint / FORENSIC_FILE).is_file()
               else "max map logit")
    print(f"verdict_map: P(tampered) = sigmoid({coef[0]:.4g} * {reading} + {coef[1]:.4g}"
          + (f" + {coef[2]:.4g} * copy-move evidence)" if len(coef) > 2 else ")"))
    if coef[0] <= 0:
        print("loupe train calibrate: the fitted slope is not positive: on these records a stronger tampering map "
              "does not mean tampered, so the map cannot decide the verdicts; nothing written", file=sys.stderr)
        return 2
    if len(coef) > 2 and coef[2] <= 0:
        print("loupe train calibrate: the fitted weight of copy-move evidence is not positive: on these records "
              "it does not mean tampered; fit without it (--no-duplicates); nothing written", file=sys.stderr)
        return 2
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    config.verdict_map = [round(c, 4) for c in coef]
    _save(config, config_file)
    print(f"wrote verdict_map = {config.verdict_map} to {config_file}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe train calibrate", description=__doc__.split("\n\n")[0].strip(),
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT", help="the Loupe checkpoint folder")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="a loupe eval report folder of CKPT on a validation split (the temperature fit)")
    p.add_argument("--map", action="store_true",
                   help="fit the tampering map's verdict (verdict_map) on --data instead of the temperature")
    p.add_argument("--data", type=Path, metavar="JSONL", help="with --map: a validation JSONL of forgery records")
    p.add_argument("--no-duplicates", action="store_true",
                   help="with --map: fit the map alone, without the copy-move evidence term (assistant/duplication.py)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (--map)")
    p.add_argument("--dry-run", action="store_true", help="print the fit, write nothing")
    p.add_argument("--allow-test", action="store_true", help="accept a test split, as --report's data or as --data (not advised)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.map and args.report is None:
        parser.error("give --report (the verdict temperature) or --map --data JSONL (the tampering map's verdict)")
    try:
        config_file = args.checkpoint / "loupe_config.json"
        config = LoupeConfig.load(config_file)
        if args.map:
            return main_map(args, config, config_file)
        if config.verdict_map is not None:
            raise CalibrationError(f"{args.checkpoint}: its verdicts come from its tampering map (verdict_map "
                                   f"{config.verdict_map}), so a report's probabilities are not its language "
                                   "model's; refit the map with --map --data, or set verdict_map to null first")
        probs, truth, model, data = read_report(args.report)
        own = checkpoint_id(args.checkpoint, config.name)
        if model.split("+", 1)[0] != own:
            raise CalibrationError(f"{args.report}: its answers are of model {model or '(none)'}, not of "
                                   f"{args.checkpoint} ({own}); run loupe eval with this checkpoint")
        _refuse_test_split(data, str(args.report), args.allow_test)
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
    _save(config, config_file)
    print(f"wrote verdict_temperature = {config.verdict_temperature} to {config_file}")
    return 0
