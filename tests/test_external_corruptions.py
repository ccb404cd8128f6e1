"""benchmarks/external_corruptions.py: other code's corruptions of a quality dataset's held-out photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import load_benchmark

def _module():
    return load_benchmark("external_corruptions")


def _split(data: Path, name: str, photo: str, seed: int) -> None:
    """A one-record split whose reference view comes from ``photo``."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(data / f"{name}-ref.png")
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(data / f"{name}-x.png")
    record = {"id": name, "task": "quality.assess", "images": [f"{name}-ref.png", f"{name}-x.png"],
              "image_roles": ["reference", "A"], "messages": [
                  {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Fine."}]}],
              "meta": {"distortions": [], "source_photo": photo}}
    (data / f"{name}.jsonl").write_text(json.dumps(record) + "\n")


def test_the_validation_split_gets_its_own_files_beside_the_test_set(tmp_path):
    mod = _module()
    data, out = tmp_path / "quality", tmp_path / "external"
    data.mkdir()
    _split(data, "test", "pool:a", 0)
    _split(data, "val", "pool:b", 1)
    assert mod.main(["--data", str(data), "--out", str(out)]) == 0
    test_images = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert mod.main(["--data", str(data), "--out", str(out), "--split", "val"]) == 0
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    val = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    n = len(mod.CORRUPTIONS) + 1  # each photo clean and once per category
    assert len(test) == len(val) == n
    assert {r["meta"]["source_photo"] for r in test} == {"pool:a"}
    assert {r["meta"]["source_photo"] for r in val} == {"pool:b"}
    assert all(r["images"][0].startswith("images/val-") for r in val)
    # the validation run wrote beside the test set, not over it
    assert all((out / "images" / name).read_bytes() == blob for name, blob in test_images.items())
    assert "test.jsonl" in (out / "card.md").read_text() and "val.jsonl" in (out / "card-val.md").read_text()


def test_check_says_whether_the_split_has_reference_views_from_the_sources_and_writes_nothing(tmp_path, capsys):
    mod = _module()
    data = tmp_path / "quality"
    data.mkdir()
    _split(data, "test", "opencv-doc:leuvenA", 0)
    assert mod.main(["--data", str(data), "--sources", "opencv-doc", "palapeli-data", "--check"]) == 0
    assert "1 reference views" in capsys.readouterr().out
    assert mod.main(["--data", str(data), "--sources", "gcompris-qt-data", "--check"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quality"]


def test_without_check_out_is_required(tmp_path):
    data = tmp_path / "quality"
    data.mkdir()
    _split(data, "test", "pool:a", 0)
    with pytest.raises(SystemExit) as exc:
        _module().main(["--data", str(data)])
    assert exc.value.code == 2
