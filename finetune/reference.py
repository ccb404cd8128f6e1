"""``loupe train reference``: fit a checkpoint's full-reference model (``assistant/reference.py``).

    loupe train reference --checkpoint CKPT --data DATA/quality/train.jsonl --val DATA/quality/val.jsonl

It reads every quality record of ``--data`` that comes with a reference image and labels its judged image
(or a comparison's A and B) with ``meta.distortions`` (``distortions_A`` / ``distortions_B``), measures the
pair's full-reference features and fits the category, rating, severity and quality readings. With ``--val`` it
prints how they do on that split's pairs: category accuracy (one distortion, by severity), clean called
clean, severity within one level, the SRCC of the quality reading against ``loupe eval``'s MOS, and the
share of comparisons with a reference whose better image it names. It writes ``CKPT/reference.safetensors``,
which the assistant then reads wherever a question gives a reference (``--dry-run`` writes nothing). No
language model runs: about 0.1 s a pair on 2 cores. Fit on a training split; a test split is refused
unless ``--allow-test``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from loupe_vlm.assistant.processing import load_image
from loupe_vlm.assistant.reference import (CLASSES, FEATURES, RATING_IDS, REFERENCE_FILE, ReadingModel, ReferenceError,
                                           ReferenceModel, labels_of, pairs_of, reference_features)
from loupe_vlm.prompts import rating_value
from loupe_vlm.prompts.sample import SampleError, iter_jsonl

from . import metrics as M
from .calibrate import CalibrationError, _refuse_test_split

RATING_VALUES = np.array([rating_value(r) for r in RATING_IDS], dtype=float)


def quality_samples(data: Path) -> list:
    """The quality records of a JSONL; bad lines are skipped, and the first five named on stderr."""
    errors: list[SampleError] = []
    samples = [s for _, s in iter_jsonl(data, errors=errors, check_files=True) if s.task.startswith("quality.")]
    for err in errors[:5]:
        print(f"skipped: {err}", file=sys.stderr)
    if len(errors) > 5:
        print(f"... and {len(errors) - 5} more bad lines skipped", file=sys.stderr)
    return samples


def read_pairs(data: Path, progress: bool = True) -> tuple[np.ndarray, list[tuple], list[tuple]]:
    """Features (N, F) of the distinct labelled (reference, image) pairs of a JSONL, their labels
    (``labels_of``), and its comparisons with a reference as (row of A, row of B, truth "A"/"B")."""
    from tqdm import tqdm

    samples = quality_samples(data)
    rows: dict[tuple[str, str], int] = {}
    feats, labels, comparisons = [], [], []
    for s in tqdm(samples, desc=f"reference pairs of {data.name}", disable=not progress, dynamic_ncols=True):
        found: dict[int, int] = {}
        for ref, img, dists, rating in pairs_of(s):
            key = (s.images[ref], s.images[img])
            if key not in rows:
                try:
                    f = reference_features(np.asarray(load_image(data.parent / key[0]).convert("RGB")),
                                           np.asarray(load_image(data.parent / key[1]).convert("RGB")))
                except (OSError, ValueError) as exc:
                    print(f"{data}: {s.id}: skipped ({exc})", file=sys.stderr)
                    continue
                rows[key] = len(feats)
                feats.append(f)
                labels.append(labels_of(dists, rating))
            found[img] = rows[key]
        roles = list(s.image_roles)
        better = (s.meta or {}).get("better")
        if s.task in ("quality.compare", "quality.rate") and better in ("A", "B") and \
                roles.index("A") in found and roles.index("B") in found:
            comparisons.append((found[roles.index("A")], found[roles.index("B")], better))
    return np.asarray(feats, dtype=np.float64).reshape(-1, len(FEATURES)), labels, comparisons


def figures(model: ReferenceModel, feats: np.ndarray, labels: list[tuple], comparisons: list[tuple]) -> dict:
    """How the model reads labelled pairs (see the module's docstring)."""
    cues = model.predict(feats)
    clean = CLASSES.index("clean")
    out: dict[str, tuple[float | None, int]] = {}
    for name, keep in (("category, severity 1", lambda c, s: c is not None and c != clean and s == 1),
                       ("category, severity >= 2", lambda c, s: c is not None and c != clean and s >= 2),
                       ("clean called clean", lambda c, s: c == clean)):
        hits = [CLASSES.index(cue.category) == c for cue, (c, s, _, _) in zip(cues, labels) if keep(c, s)]
        out[name] = (M.safe_div(sum(hits), len(hits)), len(hits))
    sev = [abs(cue.severity - s) <= 1 for cue, (c, s, _, _) in zip(cues, labels) if s > 0]
    out["severity within 1"] = (M.safe_div(sum(sev), len(sev)), len(sev))
    rated = [int(np.argmax(cue.p_rating)) == r for cue, (_, _, _, r) in zip(cues, labels) if r is not None]
    out["rating"] = (M.safe_div(sum(rated), len(rated)), len(rated))
    c = M.correlation([cue.mos for cue in cues], [m for _, _, m, _ in labels])
    out["quality SRCC"] = (c["srcc"], c["n"])
    # the score an answer reports: the expectation over the rating words (here, the reading's own)
    c = M.correlation([float(cue.p_rating @ RATING_VALUES) for cue in cues], [m for _, _, m, _ in labels])
    out["rating-score SRCC"] = (c["srcc"], c["n"])
    ab = [(cues[a].mos_raw >= cues[b].mos_raw) == (t == "A") for a, b, t in comparisons]
    out["comparisons"] = (M.safe_div(sum(ab), len(ab)), len(ab))
    return out


def reading_parser(prog: str, doc: str, data_help: str) -> argparse.ArgumentParser:
    """The command line of a reading-model fit (``loupe train reference`` and ``noreference``)."""
    p = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0].strip(),
                                epilog=doc.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, type=Path, metavar="CKPT", help="the Loupe checkpoint folder")
    p.add_argument("--data", required=True, type=Path, metavar="JSONL", help=data_help)
    p.add_argument("--val", type=Path, metavar="JSONL", help="a validation split to report the fit's figures on")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dry-run", action="store_true", help="print the figures, write nothing")
    p.add_argument("--allow-test", action="store_true", help="accept a test split as --data (not advised)")
    return p


def check_inputs(args: argparse.Namespace) -> None:
    """Refuse a folder that is not a checkpoint and a test split given as ``--data`` (``CalibrationError``)."""
    if not (args.checkpoint / "loupe_config.json").is_file():
        raise CalibrationError(f"{args.checkpoint}: not a Loupe checkpoint folder (no loupe_config.json)")
    _refuse_test_split(str(args.data), "--data", args.allow_test)


def figures_line(name: str, fig: dict) -> str:
    """One printed line of ``figures``' output (figures with no items left out)."""
    parts = [f"{k} {'-' if v is None else f'{v:.3f}'} (n={n})" for k, (v, n) in fig.items() if n]
    return f"  {name}: " + "; ".join(parts)


def write_model(model: ReadingModel, checkpoint: Path, name: str) -> Path:
    """Save ``model`` as ``checkpoint/name``, atomically (a temporary file renamed over it)."""
    target = checkpoint / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=checkpoint)
    os.close(fd)
    model.save(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def main(argv: list[str] | None = None) -> int:
    args = reading_parser("loupe train reference", __doc__,
                          "quality records with reference images to fit on (a training split)").parse_args(argv)
    try:
        check_inputs(args)
        feats, labels, _ = read_pairs(args.data, progress=not args.no_progress)
        model = ReferenceModel.fit(feats, [lab[0] for lab in labels], [lab[1] for lab in labels],
                                   [lab[2] for lab in labels], [lab[3] for lab in labels])
        print(f"fitted on {len(feats)} reference pairs from {args.data}")
        shown = [("train", (feats, labels, []))]
        if args.val is not None:
            shown.append(("val", read_pairs(args.val, progress=not args.no_progress)))
    except (CalibrationError, ReferenceError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"loupe train reference: {exc}", file=sys.stderr)
        return 2
    for name, (f, lab, comp) in shown:
        if len(f) == 0:
            print(f"  {name}: no pairs with a reference")
            continue
        print(figures_line(name, figures(model, f, lab, comp)))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    print(f"wrote {write_model(model, args.checkpoint, REFERENCE_FILE)}")
    return 0
