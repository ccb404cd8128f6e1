"""The quality builder end to end: validity, split purity, determinism, resume after a kill, CLI."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from loupe_vlm.data_builders.labellers.base import ImageTruth, LabelJob, check_text
from loupe_vlm.data_builders.quality import main
from loupe_vlm.data_builders.sources import OPENCV_DOC_DATA, PHOTO_SOURCES
from loupe_vlm.prompts import load_jsonl

ROOT = Path(__file__).resolve().parents[2]


def _build(out, images, n=48, seed=0, extra=()):
    argv = ["--out", str(out), "--n", str(n), "--images", str(images), "--image-size", "64", "--seed", str(seed),
            "--no-progress", *extra]
    assert main(argv) == 0


def _records(out):
    return {split: load_jsonl(Path(out) / f"{split}.jsonl", check_files=True) for split in ("train", "val", "test")}


def _digest(out):
    h = hashlib.sha256()
    for p in sorted(Path(out).rglob("*")):
        if p.is_file() and p.name not in ("card.md",):
            h.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _job(s):
    m = s.meta
    a = ImageTruth(m["distortions"], m["rating"])
    b = ImageTruth(m["distortions_B"], m["rating_B"]) if "better" in m else None
    return LabelJob(s.task, m["detail"] == "detailed", m["reference"], "", a, b, m.get("better"))


def test_build_is_valid_consistent_and_split_by_photo(tmp_path, image_folder):
    _build(tmp_path / "q", image_folder, n=90)
    recs = _records(tmp_path / "q")
    allrecs = [s for v in recs.values() for s in v]
    assert sorted(s.id for s in allrecs) == [f"q-{i:07d}" for i in range(90)]
    photos = {k: {s.meta["source_photo"] for s in v} for k, v in recs.items()}
    assert not photos["train"] & photos["val"] and not photos["train"] & photos["test"]
    assert not photos["val"] & photos["test"]
    for s in allrecs:
        assert "split" not in s.meta
        assert s.meta["labeller"] == "template@1" and s.meta["source_photo"]
        assert check_text(_job(s), s.answer()) is None, s.answer()
        assert s.image_roles[0] == "reference" if s.meta["reference"] else "reference" not in s.image_roles
    assert {s.task for s in allrecs} == {"quality.identify", "quality.assess", "quality.rate", "quality.compare"}
    card = (tmp_path / "q" / "card.md").read_text()
    for section in ("Samples per task", "Distortions per category", "Distortions per severity", "Sources",
                    "Origins and licences", "seed: `0`", "labeller: `template@1`"):
        assert section in card


def test_deterministic_per_seed(tmp_path, image_folder):
    _build(tmp_path / "a", image_folder, seed=3)
    _build(tmp_path / "b", image_folder, seed=3)
    _build(tmp_path / "c", image_folder, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_resume_after_truncation_gives_the_same_dataset(tmp_path, image_folder):
    _build(tmp_path / "full", image_folder)
    _build(tmp_path / "cut", image_folder)
    train = tmp_path / "cut" / "train.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    assert len(lines) > 12
    train.write_text("".join(lines[:-10]) + lines[-10][:25])  # lose 10 lines, leave half a line
    _build(tmp_path / "cut", image_folder)
    ids = [s.id for v in _records(tmp_path / "cut").values() for s in v]
    assert len(ids) == len(set(ids)) == 48
    # lines may be reordered; the set of records and every image file are what must match
    files = {p.relative_to(tmp_path / "full"): p.read_bytes() for p in (tmp_path / "full" / "images").rglob("*.png")}
    assert files and files == {p.relative_to(tmp_path / "cut"): p.read_bytes()
                               for p in (tmp_path / "cut" / "images").rglob("*.png")}
    full = {s.id: s.to_json() for v in _records(tmp_path / "full").values() for s in v}
    cut = {s.id: s.to_json() for v in _records(tmp_path / "cut").values() for s in v}
    assert full == cut


def test_killed_run_resumes_without_gaps_or_duplicates(tmp_path, image_folder):
    out = tmp_path / "k"
    cmd = [sys.executable, "-c", "import sys; from data_builders.quality import main; sys.exit(main(sys.argv[1:]))",
           "--out", str(out), "--n", "240", "--images", str(image_folder), "--image-size", "64", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        n = sum(p.read_text().count("\n") for p in out.glob("*.jsonl")) if out.is_dir() else 0
        if n >= 30:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sum(p.read_text().count("\n") for p in out.glob("*.jsonl"))
    assert 30 <= written < 240, "the run must be killed part-way"
    assert main(["--out", str(out), "--n", "240", "--images", str(image_folder), "--image-size", "64",
                 "--no-progress"]) == 0
    ids = [s.id for v in _records(out).values() for s in v]
    assert len(ids) == len(set(ids)) == 240
    assert not list(out.rglob("*.tmp"))


def test_task_selection_and_ab_balance(tmp_path, image_folder):
    _build(tmp_path / "r", image_folder, n=120, extra=["--tasks", "rate", "compare", "--licence", "CC0 test set"])
    assert "CC0 test set" in (tmp_path / "r" / "card.md").read_text()
    allrecs = [s for v in _records(tmp_path / "r").values() for s in v]
    assert {s.task for s in allrecs} == {"quality.rate", "quality.compare"}
    better = Counter(s.meta["better"] for s in allrecs)
    assert 0.3 < better["A"] / len(allrecs) < 0.7
    for s in allrecs:
        verdict = s.answer().split(".")[0]
        assert re.search(rf"\b[Ii]mage {s.meta['better']}\b", verdict), verdict  # the verdict names the winner


def test_resume_with_other_settings_is_refused(tmp_path, image_folder, capsys):
    _build(tmp_path / "s", image_folder, n=12)
    assert main(["--out", str(tmp_path / "s"), "--n", "12", "--images", str(image_folder), "--image-size", "96",
                 "--no-progress"]) == 2
    assert "image_size" in capsys.readouterr().err
    _build(tmp_path / "s", image_folder, n=24)  # only --n changed: resumes
    assert sum(len(v) for v in _records(tmp_path / "s").values()) == 24
    _build(tmp_path / "s", image_folder, n=6, extra=["--image-size", "80", "--overwrite"])
    assert sum(len(v) for v in _records(tmp_path / "s").values()) == 6


def test_cli_errors_are_helpful(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "x"), "--images", str(tmp_path / "none" / "*.png"), "--no-progress"]) == 2
    assert "check --images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--tasks", "dance"])


@pytest.mark.skipif(not OPENCV_DOC_DATA.is_dir(), reason="Debian opencv-doc not installed (make system-deps)")
def test_builtin_pool_build(tmp_path):
    assert main(["--out", str(tmp_path / "p"), "--n", "36", "--image-size", "64", "--no-progress"]) == 0
    sources = {s.meta["source"].split(":")[0] for v in _records(tmp_path / "p").values() for s in v}
    assert sources <= {"procedural", "stamps"} | set(PHOTO_SOURCES) and sources
    assert "opencv-doc" in (tmp_path / "p" / "card.md").read_text()


def test_worker_processes_give_the_same_dataset(tmp_path, image_folder):
    _build(tmp_path / "one", image_folder, n=60)
    _build(tmp_path / "two", image_folder, n=60, extra=["--workers", "2"])
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")


@pytest.mark.parametrize("n", [60, 200])
def test_small_builds_still_fill_every_split(tmp_path, image_folder, n):
    """--n 60 used to leave the test split empty by chance (and --n 200 the val split)."""
    _build(tmp_path / "q", image_folder, n=n)
    recs = _records(tmp_path / "q")
    assert all(recs[split] for split in ("train", "val", "test")), {k: len(v) for k, v in recs.items()}
    assert sum(len(v) for v in recs.values()) == n
