"""``loupe train noreference``: fit a checkpoint's no-reference readings (``assistant/noreference.py``).

    loupe train noreference --checkpoint CKPT --data DATA/quality/train.jsonl --val DATA/quality/val.jsonl

It reads every labelled image of ``--data``'s quality records (a reference image is clean; the judged image,
or a comparison's A and B, is labelled by ``meta``), measures its statistics, runs the checkpoint's own
auxiliary heads on it, and fits the category, rating, severity and quality readings on both. With ``--val``
it prints how they do on that split, and how the heads alone do, by the same rules: category accuracy (one
distortion, by severity), clean called clean, severity within one level, the SRCC of the quality reading
against ``loupe eval``'s MOS, and the share of comparisons without a reference whose better image it names.
It writes ``CKPT/noreference.safetensors``, which the assistant then reads for every quality question without
a reference image (``--dry-run`` writes nothing). The readings depend on the heads: refit after the heads
change. Only the image encoder's low-level branch runs, about 0.15 s an image on 2 cores. Fit on a training
split; a test split is refused unless ``--allow-test``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from loupe_vlm.assistant.noreference import (FEATURES, HEADS_FEATURES, NOREFERENCE_FILE, NoReferenceModel,
                                             heads_logits, image_features, with_heads)
from loupe_vlm.assistant.processing import load_image, to_lowlevel_tensor
from loupe_vlm.assistant.reference import CLASSES, ReferenceCue, ReferenceError, labelled_images, labels_of

from .calibrate import CalibrationError
from .reference import check_inputs, figures, figures_line, quality_samples, reading_parser, write_model


def read_images(data: Path, model: object, progress: bool = True) -> tuple[np.ndarray, list[tuple], list[tuple]]:
    """Features (N, len(FEATURES)) of the distinct labelled images of a JSONL's quality records, their labels
    (``labels_of``), and its comparisons without a reference as (row of A, row of B, truth "A"/"B")."""
    from tqdm import tqdm

    samples = quality_samples(data)
    rows: dict[str, int] = {}
    feats, labels, comparisons = [], [], []
    for s in tqdm(samples, desc=f"labelled images of {data.name}", disable=not progress, dynamic_ncols=True):
        found: dict[int, int] = {}
        for i, dists, rating in labelled_images(s):
            key = s.images[i]
            if key not in rows:
                try:
                    img = load_image(data.parent / key)
                    pixels = to_lowlevel_tensor(img, model.config.lowlevel_max_side)  # as the assistant shows it
                    f = with_heads(image_features(np.asarray(img)), heads_logits(model, [pixels])[0])
                except (OSError, ValueError) as exc:
                    print(f"{data}: {s.id}: {key} skipped ({exc})", file=sys.stderr)
                    continue
                rows[key] = len(feats)
                feats.append(f)
                labels.append(labels_of(dists, rating))
            found[i] = rows[key]
        roles, better = list(s.image_roles), (s.meta or {}).get("better")
        if s.task in ("quality.compare", "quality.rate") and "reference" not in roles and better in ("A", "B") \
                and roles.index("A") in found and roles.index("B") in found:
            comparisons.append((found[roles.index("A")], found[roles.index("B")], better))
    return np.asarray(feats, dtype=np.float64).reshape(-1, len(FEATURES)), labels, comparisons


class HeadsAlone:
    """The heads' own reading of FEATURES, by the assistant's rules (``assistant/guidance.py``): a category
    where its sigmoid reaches CLEAN_BELOW (else clean), severity = 5 sigmoid, quality 5 - 0.8 severity. Printed
    beside the fitted model, so the gain is plain."""

    def predict(self, features: np.ndarray) -> list[ReferenceCue]:
        from loupe_vlm.assistant.guidance import CLEAN_BELOW

        logits = np.atleast_2d(features)[:, len(FEATURES) - len(HEADS_FEATURES):]
        p = 1 / (1 + np.exp(-logits))
        n = len(CLASSES) - 1
        out = []
        for row in p:
            cats = row[:n]
            clean = float(cats.max() < CLEAN_BELOW)
            sev = 5 * float(row[n])
            mos = 5 - 0.8 * sev
            ratings = np.full(5, 0.2)  # no rating reading: its figures are left out
            out.append(ReferenceCue(cats * (1 - clean), clean, sev, mos, ratings, mos))
        return out


def main(argv: list[str] | None = None) -> int:
    args = reading_parser("loupe train noreference", __doc__,
                          "quality records with labelled images to fit on (a training split)").parse_args(argv)
    try:
        check_inputs(args)
        if not args.data.is_file():
            raise FileNotFoundError(f"{args.data}: no such file; give a quality training split (train.jsonl)")
        from loupe_vlm.assistant.modeling import ExplainableVLM

        model, _ = ExplainableVLM.from_pretrained(args.checkpoint)
        model.eval()
        feats, labels, comps = read_images(args.data, model, progress=not args.no_progress)
        fitted = NoReferenceModel.fit(feats, [lab[0] for lab in labels], [lab[1] for lab in labels],
                                      [lab[2] for lab in labels], [lab[3] for lab in labels])
        print(f"fitted on {len(feats)} labelled images from {args.data}")
        shown = [("train", (feats, labels, comps))]
        if args.val is not None:
            shown.append(("val", read_images(args.val, model, progress=not args.no_progress)))
    except (CalibrationError, ReferenceError, FileNotFoundError, OSError, ValueError) as exc:
        print(f"loupe train noreference: {exc}", file=sys.stderr)
        return 2
    for name, (f, lab, comp) in shown:
        if len(f) == 0:
            print(f"  {name}: no labelled images")
            continue
        print(figures_line(name, figures(fitted, f, lab, comp)))
        heads = figures(HeadsAlone(), f, lab, comp)
        heads.pop("rating", None)
        heads.pop("rating-score SRCC", None)
        print(figures_line(f"{name}, the heads alone", heads))
    if args.dry_run:
        print("dry run: nothing written")
        return 0
    print(f"wrote {write_model(fitted, args.checkpoint, NOREFERENCE_FILE)}")
    return 0
