"""The table of an ablation run (``finetune/recipes/ablate-loupe-smol.sh``): one column per arm, from the
``metrics.json`` of its three ``loupe eval`` reports (OUT/ARM-ev-wider, -ev-ext, -ev-forgery), the last
validation line of its training log, and its heads' figures from ``benchmarks/lowlevel_probe.py``
(OUT/ARM.probe-wider.txt, -ext.txt: the dict on the probe's "final" line).

    python benchmarks/ablation_table.py runs/ablate-loupe-smol [--arms full lm-scratch ...] [--json]

A figure an arm has no value for (its eval did not run, or the metric has no n there) shows as "–".
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

ARMS = ("full", "lm-scratch", "no-branch", "no-wider", "random-encoder", "s1-no-wider", "s1-random-encoder",
        "s1-no-highpass")

# (report, metric, label) in table order
ROWS = (
    ("wider", "quality.category_accuracy", "wider-pool photos: distortion category"),
    ("wider", "quality.clean_accuracy", "… clean called clean"),
    ("wider", "quality.severity_within_1", "… severity within ±1"),
    ("wider", "quality.score_coverage", "… a rating in the assessment"),
    ("wider", "quality.srcc", "… score SRCC"),
    ("wider", "compare.accuracy", "… A/B accuracy"),
    ("wider", "compare.swap_consistency", "… A/B swap consistency"),
    ("wider", "explanations.repeated_4gram", "… answers repeating a 4-gram"),
    ("ext", "quality.category_accuracy", "other code's corruptions: distortion category"),
    ("ext", "quality.clean_accuracy", "… clean called clean"),
    ("forgery", "forgery.balanced_accuracy", "forgery: balanced accuracy"),
    ("forgery", "forgery[manipulation=authentic].accuracy", "… authentic called authentic"),
    ("forgery", "forgery.auc", "… AUC of P(tampered)"),
    ("forgery", "forgery.pixel_f1@0.5", "… pixel-F1 at 0.5"),
    ("forgery", "calibration[task=forgery.detect].verdict_ece", "… verdict ECE"),
    ("forgery", "explanations.text_matches_result", "… text agrees with the verdict"),
)

# (probe, key, label): the heads alone, by benchmarks/lowlevel_probe.py --checkpoint
PROBE_ROWS = (
    ("wider", "category_top1", "heads alone, wider-pool photos: category top-1"),
    ("wider", "clean_called_clean", "… clean called clean"),
    ("wider", "severity_mae", "… severity MAE (levels)"),
    ("wider", "tampered_auc", "… tampered AUC"),
    ("wider", "tampered_acc", "… tampered accuracy at 0.5"),
    ("wider", "pixel_f1", "… tampering map pixel-F1 at 0.5"),
    ("ext", "category_top1", "heads alone, other code's corruptions: category top-1"),
    ("ext", "clean_called_clean", "… clean called clean"),
)

VAL = re.compile(r"val loss ([0-9.]+), token accuracy ([0-9.]+)")
FINAL = re.compile(r"^final after .*?: (\{.*\})\s*$", re.M)


def probe_figures(out: Path, arm: str, probe: str) -> dict[str, float]:
    """The probe's final figures for ``arm`` (empty when it has none)."""
    path = out / f"{arm}.probe-{probe}.txt"
    hits = FINAL.findall(path.read_text(errors="replace")) if path.is_file() else []
    return ast.literal_eval(hits[-1]) if hits else {}


def arm_figures(out: Path, arm: str) -> dict[str, tuple[float, int] | None]:
    """(value, n) per ``report:metric``, plus ``train:val_loss`` and ``train:token_accuracy``."""
    figs: dict[str, tuple[float, int] | None] = {}
    for report in {r for r, _, _ in ROWS}:
        path = out / f"{arm}-ev-{report}" / "metrics.json"
        metrics = json.loads(path.read_text())["metrics"] if path.is_file() else {}
        for r, name, _ in ROWS:
            if r == report:
                m = metrics.get(name)
                figs[f"{r}:{name}"] = (m["value"], m["n"]) if m else None
    log = out / f"{arm}.train.log"
    # a stage-1 arm ("s1-...") runs one stage-2 step only to be saved: its validation line says nothing
    hits = VAL.findall(log.read_text(errors="replace")) if log.is_file() and not arm.startswith("s1-") else []
    figs["train:val_loss"] = (float(hits[-1][0]), 0) if hits else None
    figs["train:token_accuracy"] = (float(hits[-1][1]), 0) if hits else None
    for probe in {p for p, _, _ in PROBE_ROWS}:
        got = probe_figures(out, arm, probe)
        n = int(got.get("single_images", 0))
        for p, key, _ in PROBE_ROWS:
            if p == probe:
                v = got.get(key)
                figs[f"probe-{p}:{key}"] = (float(v), n) if isinstance(v, (int, float)) else None
    return figs


def table(out: Path, arms: list[str]) -> str:
    figs = {a: arm_figures(out, a) for a in arms}

    def cell(v: tuple[float, int] | None, with_n: bool) -> str:
        if v is None:
            return "–"
        return f"{v[0]:.3f}" + (f" (n={v[1]})" if with_n else "")

    lines = ["| | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    # the validation loss is the whole training loss: with heads it includes their auxiliary terms, so it
    # compares arms that have the same heads; the answer-token accuracy compares every arm
    for key, label in (("train:val_loss", "validation loss at the end of stage 2 (heads' terms included)"),
                       ("train:token_accuracy", "… answer-token accuracy")):
        lines.append(f"| {label} | " + " | ".join(cell(figs[a][key], False) for a in arms) + " |")
    rows = [(f"{r}:{n}", label) for r, n, label in ROWS] + [(f"probe-{p}:{k}", label) for p, k, label in PROBE_ROWS]
    for key, label in rows:
        if key.startswith("probe-"):
            vals = [figs[a][key] for a in arms]
            lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v[0]:.3f}" for v in vals) + " |")
            continue
        ns = {figs[a][key][1] for a in arms if figs[a][key] is not None}
        same_n = len(ns) == 1
        label = label + (f" (n={ns.pop()})" if same_n else "")
        lines.append(f"| {label} | " + " | ".join(cell(figs[a][key], not same_n) for a in arms) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the ablation folder (ablate-loupe-smol.sh's OUT)")
    ap.add_argument("--arms", nargs="+", default=None, help=f"arms, in column order (default: those of {ARMS} "
                    "that have a training log)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    args = ap.parse_args(argv)
    if not args.out.is_dir():
        ap.error(f"{args.out}: no such folder; run finetune/recipes/ablate-loupe-smol.sh first")
    arms = args.arms or [a for a in ARMS if (args.out / f"{a}.train.log").is_file()]
    if not arms:
        ap.error(f"{args.out}: no arm has a training log ({', '.join(a + '.train.log' for a in ARMS)})")
    if args.json:
        print(json.dumps({a: arm_figures(args.out, a) for a in arms}, indent=1))
    else:
        print(table(args.out, arms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
