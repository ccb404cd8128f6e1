"""benchmarks/ablation_table.py: the ablation table from eval reports and training logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

def _module():
    return load_benchmark("ablation_table")


def _report(folder: Path, metrics: dict[str, tuple[float, int]]) -> None:
    folder.mkdir(parents=True)
    folder.joinpath("metrics.json").write_text(json.dumps(
        {"metrics": {k: {"value": v, "n": n, "protocol": "p"} for k, (v, n) in metrics.items()}}))


def test_table_reads_each_arm_s_reports_and_log(tmp_path, capsys):
    mod = _module()
    _report(tmp_path / "full-ev-wider", {"quality.category_accuracy": (0.5, 40), "quality.srcc": (0.25, 30)})
    _report(tmp_path / "full-ev-forgery", {"forgery.balanced_accuracy": (0.75, 100)})
    _report(tmp_path / "no-branch-ev-wider", {"quality.category_accuracy": (0.125, 40), "quality.srcc": (0.5, 28)})
    (tmp_path / "full.train.log").write_text("step 60: val loss 3.0, token accuracy 0.5\n"
                                             "step 120: val loss 2.5000, token accuracy 0.700, mask IoU 0.1\n")
    (tmp_path / "no-branch.train.log").write_text("crashed before validating\n")
    (tmp_path / "full.probe-wider.txt").write_text("loaded 10 train / 20 test images in 1 s\nfinal after 0 steps (16 "
                                                   "images each): {'category_top1': 0.625, 'single_images': 8}\n")
    assert mod.main([str(tmp_path)]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line for line in capsys.readouterr().out.splitlines()}
    assert rows["validation loss at the end of stage 2 (heads' terms included)"].endswith("| 2.500 | – |")
    assert rows["wider-pool photos: distortion category (n=40)"].endswith("| 0.500 | 0.125 |")
    assert rows["… score SRCC"].endswith("| 0.250 (n=30) | 0.500 (n=28) |")  # n differs: given per cell
    assert rows["forgery: balanced accuracy (n=100)"].endswith("| 0.750 | – |")
    assert rows["heads alone, wider-pool photos: category top-1"].endswith("| 0.625 | – |")
    figs = mod.arm_figures(tmp_path, "full")
    assert figs["probe-wider:category_top1"] == (0.625, 8) and figs["probe-ext:category_top1"] is None
    assert figs["train:token_accuracy"] == (0.7, 0) and figs["ext:quality.category_accuracy"] is None


def test_a_folder_without_arms_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _module().main([str(tmp_path)])
    assert "no arm has a training log" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _module().main([str(tmp_path / "missing")])
    assert "run finetune/recipes/ablate-loupe-smol.sh first" in capsys.readouterr().err
