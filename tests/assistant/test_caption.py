"""`loupe caption` on the tiny checkpoint: bad files, kill + resume, shards + merge, manifests, batching."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe_vlm.assistant.caption import (Item, answer_batch, collect_paths, main, read_manifest, resolve_in_roots,
                               safe_mask_name, shard_of)
from loupe_vlm.assistant.inference import Result
from loupe_vlm.assistant.processing import ImageError
from tests.helpers import ASSETS

GOOD = ("noisy.png", "clean.png", "tampered.png")


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _copies(folder: Path, n: int, sizes: tuple[tuple[int, int], ...] = ((128, 96),)) -> list[str]:
    """``n`` small images cycling through the good assets (and sizes); returns their ids."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n):
        img = Image.open(ASSETS / GOOD[i % 3]).convert("RGB")
        size = sizes[i % len(sizes)]
        if img.size != size:
            img = img.resize(size)
        name = f"img_{i:02d}.png"
        img.save(folder / name)
        ids.append(name)
    return ids


def _run(folder: Path, out: Path, ckpt: Path, *extra: str) -> int:
    return main([str(folder), "--out", str(out), "--model", str(ckpt), "--device", "cpu", "--threads", "1",
                 "--no-progress", *extra])


def test_mixed_folder_gives_one_record_per_file(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(ASSETS / "noisy.png", folder / "noisy.png")
    shutil.copy(ASSETS / "clean.png", folder / "clean.png")
    shutil.copy(ASSETS / "tampered.png", folder / "sub" / "tampered.png")
    Image.open(ASSETS / "clean.png").convert("CMYK").save(folder / "cmyk.jpg")  # odd mode: converted, answered
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("not an image")
    (folder / "trunc.png").write_bytes((ASSETS / "noisy.png").read_bytes()[:2000])
    Image.new("1", (9000, 8000)).save(folder / "bomb.png")  # 72 MP in a few KB: over the pixel limit
    (folder / "notes.txt").write_text("skipped by the extension filter")
    out, masks, table = tmp_path / "r.jsonl", tmp_path / "masks", tmp_path / "r.csv"

    assert _run(folder, out, tiny_checkpoint, "--task", "forgery", "--masks-dir", str(masks), "--csv", str(table),
                "--batch-size", "4") == 0
    recs = {r["id"]: r for r in _records(out)}
    assert sorted(recs) == sorted(["noisy.png", "clean.png", "sub/tampered.png", "cmyk.jpg", "zero.png",
                                   "text.png", "trunc.png", "bomb.png"])
    errors = {i: r["error"]["type"] for i, r in recs.items() if r["error"]}
    assert errors == {"zero.png": "empty", "text.png": "not_image", "trunc.png": "truncated", "bomb.png": "too_large"}
    for i, r in recs.items():
        if r["error"]:
            assert i in r["error"]["message"] and r["text"] is None and r["forgery"] is None
        else:
            assert r["task"] == "forgery" and r["text"] and r["forgery"] is not None
    tampered = recs["sub/tampered.png"]["forgery"]
    assert tampered["tampered"] is True and tampered["mask"] == "masks/sub/tampered.png.png"
    mask = np.asarray(Image.open(tmp_path / tampered["mask"]))
    assert mask.shape == (96, 128) and set(np.unique(mask)) == {0, 255}
    assert recs["sub/tampered.png"]["forgery"]["probability"] > 0.5
    assert recs["clean.png"]["forgery"]["tampered"] is False and recs["clean.png"]["forgery"]["mask"] is None
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["id"] for r in rows) == sorted(recs)
    summary = capsys.readouterr().out
    assert "4 error(s)" in summary and "empty 1" in summary and str(out) in summary

    # the same command again resumes: nothing redone, nothing appended
    assert _run(folder, out, tiny_checkpoint, "--task", "forgery", "--masks-dir", str(masks)) == 0
    assert len(_records(out)) == 8 and "8 already done" in capsys.readouterr().out
    # ... but not into a file holding another task's answers
    assert _run(folder, out, tiny_checkpoint, "--task", "quality") == 2
    assert "another task" in capsys.readouterr().err

    # only broken files: nothing could be processed -> non-zero exit
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "zero.png").write_bytes(b"")
    assert _run(broken, tmp_path / "b.jsonl", tiny_checkpoint) == 1
    assert _records(tmp_path / "b.jsonl")[0]["error"]["type"] == "empty"


def test_sigkill_then_resume_gives_every_id_exactly_once(tiny_checkpoint, tmp_path):
    folder = tmp_path / "many"
    ids = _copies(folder, 24)
    out = tmp_path / "r.jsonl"
    # batch size 1 makes one line per step, so the kill lands mid-run; short answers keep the test quick
    args = [str(folder), "--task", "quality", "--out", str(out), "--model", str(tiny_checkpoint), "--device", "cpu",
            "--batch-size", "1", "--max-new-tokens", "3", "--threads", "1", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "loupe_vlm.cli", "caption", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while not (out.exists() and out.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no output line within the time limit"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = out.read_bytes().count(b"\n")
    assert proc.returncode == -signal.SIGKILL and 1 <= written < len(ids), written
    with out.open("a") as fh:  # what a kill in the middle of a write leaves behind
        fh.write('{"id": "img_99.png", "task": "qual')

    assert main(args) == 0  # restart with the same arguments
    resumed = _records(out)
    assert sorted(r["id"] for r in resumed) == sorted(ids)  # each id exactly once, none missing

    full = tmp_path / "full.jsonl"
    assert _run(folder, full, tiny_checkpoint, "--task", "quality", "--batch-size", "8", "--max-new-tokens", "3") == 0
    by_id = {r["id"]: r["text"] for r in _records(full)}
    assert sorted(by_id) == sorted(ids)
    assert all(r["text"] == by_id[r["id"]] for r in resumed)


def test_shards_are_disjoint_cover_everything_and_merge_restores_the_whole(tiny_checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    ids = _copies(folder, 5)
    full = tmp_path / "full.jsonl"
    short = ("--task", "auto", "--max-new-tokens", "6")  # ids and merging are under test, not answers
    assert _run(folder, full, tiny_checkpoint, *short, "--batch-size", "8") == 0
    expected = sorted(f"{i}#{t}" for i in ids for t in ("quality", "forgery"))
    assert sorted(r["id"] for r in _records(full)) == expected

    shards = []
    for k in range(3):
        shards.append(tmp_path / f"s{k}.jsonl")
        assert _run(folder, shards[-1], tiny_checkpoint, *short, "--shard", f"{k}/3") == 0
    with shards[0].open("a") as fh:  # --overwrite starts fresh: a stale line does not survive
        fh.write(json.dumps({"id": "stale", "task": "quality"}) + "\n")
    assert _run(folder, shards[0], tiny_checkpoint, *short, "--shard", "0/3", "--overwrite") == 0
    parts = [{r["id"] for r in _records(s)} for s in shards]
    assert "stale" not in parts[0]
    assert sum(map(len, parts)) == len(set().union(*parts)) == len(expected)  # disjoint and covering
    for part in parts:  # auto's two records of one image stay together
        assert {i.split("#")[0] for i in part} == {i.split("#")[0] for i in part if i.endswith("#forgery")}
    assert shard_of("img_00.png", 3) == shard_of("img_00.png", 3) == int(
        __import__("hashlib").sha1(b"img_00.png").hexdigest()[:16], 16) % 3

    # a duplicate shard file and one conflicting line: deduplicated, conflict reported
    odd = dict(_records(shards[0])[0], text="something else")
    (tmp_path / "odd.jsonl").write_text(json.dumps(odd) + "\n")
    merged = tmp_path / "merged.jsonl"
    assert main(["merge", str(merged), *map(str, shards), str(shards[1]), str(tmp_path / "odd.jsonl")]) == 0
    report = capsys.readouterr().out
    assert f"{len(expected)} records" in report and "1 conflict(s)" in report and odd["id"] in report
    strip = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [strip(r) for r in _records(merged)] == sorted((strip(r) for r in _records(full)), key=lambda r: r["id"])


def test_manifest_paths_outside_the_roots_are_refused(tiny_checkpoint, tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    shutil.copy(ASSETS / "noisy.png", root / "a.png")
    shutil.copy(ASSETS / "clean.png", root / "b.png")
    shutil.copy(ASSETS / "clean.png", outside / "secret.png")
    os.symlink(outside / "secret.png", root / "link.png")
    rows = [{"images": ["a.png"]}, {"images": ["../outside/secret.png"]}, {"images": [str(outside / "secret.png")]},
            {"images": ["link.png"]}, {"id": "pair", "images": ["a.png", "b.png"], "task": "compare"},
            {"images": []}]
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{not json\n")
    out = tmp_path / "r.jsonl"
    assert main(["--manifest", str(manifest), "--out", str(out), "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--threads", "1", "--no-progress"]) == 0
    recs = _records(out)
    assert len(recs) == len(rows) + 1
    by_id = {r["id"]: r for r in recs}
    assert by_id["a.png"]["error"] is None and by_id["a.png"]["quality"]["rating"] == "poor"
    pair = by_id["pair"]  # the tiny model never learnt A/B, so only the shape of the answer is checked
    assert pair["task"] == "compare" and pair["error"] is None and pair["images"] == ["a.png", "b.png"]
    assert set(pair["comparison"]) >= {"better", "probability", "p_a", "p_a_swapped", "consistent"}
    refused = [r for r in recs if r["error"] and r["error"]["type"] == "outside_root"]
    assert len(refused) == 3 and all("secret" in r["error"]["message"] or "link" in r["error"]["message"]
                                     for r in refused)
    assert sum(1 for r in recs if r["error"] and r["error"]["type"] == "bad_row") == 2

    # the resolver on its own: inside is fine, any way out is refused, a second root lets it in
    assert resolve_in_roots("a.png", [root]) == ((root / "a.png").resolve(), root.resolve())
    for raw in ("../outside/secret.png", str(outside / "secret.png"), "link.png", "/etc/passwd"):
        with pytest.raises(ImageError, match="outside the allowed roots"):
            resolve_in_roots(raw, [root])
    assert resolve_in_roots("link.png", [root, outside])[0] == (outside / "secret.png").resolve()


def test_csv_manifest_and_glob_inputs(tmp_path):
    (tmp_path / "m.csv").write_text("id,images,task\nx,a.png;b.png,compare\n,c.png,\n")
    rows = [r for _, r, _ in read_manifest(tmp_path / "m.csv")]
    assert rows == [{"images": ["a.png", "b.png"], "id": "x", "task": "compare"}, {"images": ["c.png"]}]
    _copies(tmp_path / "g" / "deep", 2)
    pairs, unmatched = collect_paths([str(tmp_path / "g" / "**" / "*.png"), str(tmp_path / "none*.png")], ["png"])
    assert [(p.name, r) for p, r in pairs] == [("img_00.png", tmp_path / "g"), ("img_01.png", tmp_path / "g")]
    assert unmatched == [str(tmp_path / "none*.png")]


def test_batched_output_equals_unbatched(tiny_checkpoint, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    # prompts of 29 and 32 tokens: the batch of 8 left-pads the shorter one; tampered.png gives a mask
    shutil.copy(ASSETS / "tampered.png", folder / "tampered.png")
    Image.open(ASSETS / "noisy.png").resize((200, 40)).save(folder / "noisy_wide.png")
    outs = []
    for bs in ("1", "8"):
        outs.append(tmp_path / bs / "r.jsonl")
        assert _run(folder, outs[-1], tiny_checkpoint, "--task", "auto", "--batch-size", bs,
                    "--masks-dir", str(tmp_path / bs / "masks")) == 0
    one, eight = ({r["id"]: {k: v for k, v in r.items() if k != "seconds"} for r in _records(o)} for o in outs)
    assert len(one) == 4 and one == eight
    assert one["tampered.png#forgery"]["forgery"]["mask"] == "masks/tampered.png#forgery.png"


class _FailingAssistant:
    """Stands in for the model: generation fails for any batch holding the item with id "bad"."""

    name = "stub"

    def run(self, requests, batch_size=8):
        if any(r.id == "bad" for r in requests):
            raise RuntimeError("boom")
        return [Result(task=r.task, images=r.names, text="fine", id=r.id) for r in requests]


def test_one_failing_item_does_not_sink_its_batch():
    items = [Item(i, "quality.assess", [Path(f"{i}.png")], ["A"], [f"{i}.png"]) for i in ("a", "bad", "c", "d")]
    loaded = [[object()], [object()], [object()], [ImageError("d.png", "truncated", "cut short")]]
    results = answer_batch(_FailingAssistant(), items, loaded, batch_size=8)
    assert [r.id for r in results] == ["a", "bad", "c", "d"]
    assert [r.text for r in results[::2]] == ["fine", "fine"]
    assert results[1].error["type"] == "RuntimeError" and results[3].error["type"] == "truncated"


def test_mask_names_stay_inside_and_apart():
    assert safe_mask_name("sub/a.png#forgery") == "sub/a.png#forgery.png"
    odd = [safe_mask_name(i) for i in ("../x y.png", "../x_y.png", "x y.png")]
    assert len(set(odd)) == 3 and not any(".." in n.split("/") for n in odd)


def test_missing_model_and_no_inputs_are_clear_errors(tmp_path, capsys):
    assert main([str(ASSETS), "--out", str(tmp_path / "r.jsonl"), "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err
    assert main([str(tmp_path / "none*.png"), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "matched no image files" in capsys.readouterr().err
