"""The human-readable side of ``loupe eval``: report.md tables and plots (matplotlib, Agg backend).

``write_report(metrics, out_dir, root)`` reads metrics.json's dict and writes ``report.md`` and
``plots/*.png``: a confusion matrix of distortion categories, a reliability diagram, severity
predicted vs true, pixel-F1 by manipulation and a grid of the worst forgery cases with their true
and predicted masks. A plot whose data the run does not have is skipped and the report says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

logger = logging.getLogger(__name__)

SECTIONS = (("run", "Run"), ("quality", "Quality"), ("compare", "A/B comparison"), ("forgery", "Forgery"),
            ("explanations", "Explanations"), ("calibration", "Calibration"), ("cost", "Cost"))


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _save(fig: Any, path: Path, dpi: int = 100) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)  # figures are not freed otherwise; a long eval session would leak them
    return True


def _table(items: dict[str, dict]) -> list[str]:
    lines = ["| metric | value | n | protocol |", "|---|---:|---:|---|"]
    lines += [f"| `{name}` | {_fmt(m['value'])} | {m['n']} | {m['protocol']} |" for name, m in items.items()]
    return lines


def write_report(result: dict[str, Any], out_dir: str | Path, root: str | Path) -> Path:
    """Write report.md and the plots; returns report.md's path."""
    out, root = Path(out_dir), Path(root)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    metrics, details = result["metrics"], result["details"]
    lines = [f"# Loupe evaluation: {result.get('model')}", "",
             f"- dataset: `{result['dataset']['path']}` (card sha256 `{result['dataset'].get('card_sha256')}`)",
             f"- samples: {details['counts']['records']} ({details['counts']['by_task']}), "
             f"errors: {details['counts']['errors']}, "
             f"skipped dataset lines: {result['dataset'].get('skipped_lines', 0)}",
             "- every number names its protocol; numbers under different protocols are not comparable.", ""]
    for key, title in SECTIONS:
        items = {n: m for n, m in metrics.items() if n.split(".")[0].split("[")[0] == key
                 and ("[" not in n or key == "calibration")}
        if items:
            lines += [f"## {title}", ""] + _table(items) + [""]
    for kind in ("manipulation", "post"):
        rows = {n: m for n, m in metrics.items() if n.startswith(f"forgery[{kind}=")}
        if rows:
            lines += [f"## Forgery by {'post-processing' if kind == 'post' else 'manipulation'}", ""]
            lines += _breakdown(rows) + [""]
    lines += ["## Plots", ""]
    for name, title, fn in (("confusion.png", "Distortion categories: confusion matrix", _confusion),
                            ("reliability.png", "Reliability diagram", _reliability),
                            ("severity.png", "Severity: predicted vs true", _severity),
                            ("pixel_f1_by_manipulation.png", "Pixel-F1 @0.5 by manipulation", _pixel_by_manip),
                            ("worst_forgery.png", "Worst forgery cases (image, true mask, predicted mask)",
                             lambda d, m, p: _worst(d, p, out, root))):
        try:
            made = fn(details, metrics, plots / name)
        except (OSError, ValueError) as exc:  # a missing image must not cost the whole report
            logger.warning("plot %s failed: %s", name, exc)
            made = False
        lines.append(f"- {title}: " + (f"![{title}](plots/{name})" if made else "no data in this run"))
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _breakdown(rows: dict[str, dict]) -> list[str]:
    groups: dict[str, dict[str, Any]] = {}
    for name, m in rows.items():
        group, metric = name.split("]", 1)
        groups.setdefault(group.split("=", 1)[1], {})[metric.lstrip(".")] = m
    cols = ["accuracy", "f1", "balanced_accuracy", "auc", "pixel_f1@0.5", "pixel_iou@0.5", "pixel_f1_best_threshold"]
    lines = ["| group | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for g, ms in groups.items():
        n = ms.get("accuracy", {}).get("n", "-")
        lines.append(f"| {g} | {n} | " + " | ".join(_fmt(ms[c]["value"]) if c in ms else "-" for c in cols) + " |")
    lines.append("")
    lines.append("pixel columns: IMDL-BenCo per-image average at 0.5; `pixel_f1_best_threshold` is the optimistic "
                 "per-image oracle threshold.")
    return lines


def _confusion(details: dict, metrics: dict, path: Path) -> bool:
    conf = details.get("category_confusion")
    if not conf:
        return False
    m = np.asarray(conf["matrix"])
    keep_rows = m.sum(1) > 0  # only categories present in the ground truth
    keep_cols = np.r_[keep_rows, True] | (m.sum(0) > 0)
    m = m[keep_rows][:, keep_cols]
    rows = [c for c, k in zip(conf["labels"], keep_rows) if k]
    cols = [c for c, k in zip(conf["columns"], keep_cols) if k]
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(cols), 1 + 0.5 * len(rows)))
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted (first named category)")
    ax.set_ylabel("true")
    ax.set_title("single-distortion items")
    return _save(fig, path)


def _reliability(details: dict, metrics: dict, path: Path) -> bool:
    cal = details.get("calibration")
    if not cal or not cal["n"]:
        return False
    bins = [b for b in cal["bins"] if b["n"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    ax.bar(centres, [b["accuracy"] for b in bins], width=1 / len(cal["bins"]), alpha=0.7, edgecolor="k",
           label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C3", label="mean confidence")
    for c, b in zip(centres, bins):
        ax.text(c, 0.02, str(b["n"]), ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE = {cal['ece']:.3f} (n = {cal['n']})")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def _severity(details: dict, metrics: dict, path: Path) -> bool:
    pairs = details.get("severity_pairs")
    if not pairs:
        return False
    counts = np.zeros((5, 5), dtype=int)
    for t, p in pairs:
        counts[t - 1, p - 1] += 1
    fig, ax = plt.subplots(figsize=(4.2, 4))
    ax.imshow(counts, cmap="Oranges", origin="lower", extent=(0.5, 5.5, 0.5, 5.5))
    for i in range(5):
        for j in range(5):
            if counts[i, j]:
                ax.text(j + 1, i + 1, str(counts[i, j]), ha="center", va="center", fontsize=8)
    ax.plot([0.5, 5.5], [0.5, 5.5], "k--", lw=1)
    ax.set_xlabel("predicted severity (1 slight .. 5 catastrophic)")
    ax.set_ylabel("true severity")
    return _save(fig, path)


def _pixel_by_manip(details: dict, metrics: dict, path: Path) -> bool:
    rows = [(n.split("=", 1)[1].split("]")[0], m) for n, m in metrics.items()
            if n.startswith("forgery[manipulation=") and n.endswith("].pixel_f1@0.5")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(1.5 + 0.9 * len(rows), 3.5))
    ax.bar([g for g, _ in rows], [m["value"] for _, m in rows], color="C0")
    for i, (_, m) in enumerate(rows):
        ax.text(i, m["value"] + 0.01, f"{m['value']:.2f}\nn={m['n']}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("pixel-F1 @0.5 (per image, averaged)")
    return _save(fig, path)


def _worst(details: dict, path: Path, out: Path, root: Path, n: int = 6) -> bool:
    cases = details.get("forgery_cases") or []
    if not cases:
        return False
    cases = cases[:n]
    fig, axes = plt.subplots(len(cases), 3, figsize=(7.5, 2.4 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        img = Image.open(root / case["image"]).convert("RGB")
        truth = None
        for rel in case["truth_masks"]:
            m = np.asarray(Image.open(root / rel).convert("L")) > 127
            truth = m if truth is None else truth | m
        pred = (np.asarray(Image.open(out / case["pred_mask"]).convert("L")) > 127 if case.get("pred_mask")
                else np.zeros(img.size[::-1], bool))
        for ax, data, title in zip(row, (img, truth, pred),
                                   (case["id"], "true mask", f"predicted F1 {case['pixel_f1']:.2f} "
                                                             f"IoU {case['iou']:.2f}")):
            ax.imshow(data, cmap=None if data is img else "gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    return _save(fig, path, dpi=90)
