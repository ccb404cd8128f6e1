"""DatasetWriter: atomic files, fsynced lines, resume after a kill, refusal of mismatched settings."""

from __future__ import annotations

import numpy as np
import pytest

from loupe_vlm.data_builders.writer import DatasetWriter
from loupe_vlm.prompts import Sample, SampleError, load_jsonl, user_content


def _sample(i: int) -> Sample:
    return Sample(id=f"t-{i}", task="quality.assess", images=[f"images/{i}.png"], image_roles=["A"],
                  messages=[{"role": "user", "content": user_content(["A"], "How is it?")},
                            {"role": "assistant", "content": [{"type": "text", "text": "It is fine."}]}],
                  meta={"rating": "good"})


def _img(i: int) -> np.ndarray:
    return np.full((8, 8, 3), i, np.uint8)


def test_write_resume_and_truncated_line(tmp_path):
    w = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    for i in range(3):
        w.write("train", _sample(i), {f"images/{i}.png": _img(i)})
    w.write("val", _sample(3), {"images/3.png": _img(3)})
    w.close()
    with (tmp_path / "train.jsonl").open("a") as fh:  # a kill in the middle of a line
        fh.write('{"id": "t-4", "task": "quality.as')
    w = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    assert w.done_ids() == {"t-0", "t-1", "t-2", "t-3"}
    assert w.counts() == {"train": 3, "val": 1, "test": 0}
    w.write("train", _sample(4), {"images/4.png": _img(4)})
    with pytest.raises(ValueError, match="already written"):
        w.write("train", _sample(4), {"images/4.png": _img(4)})
    card = w.finish({"Things": {"a": 1}, "List": ["x"]}).read_text()
    assert "| train | 4 |" in card and "## Things" in card and "- x" in card
    rows = load_jsonl(tmp_path / "train.jsonl", check_files=True)
    assert [s.id for s in rows] == ["t-0", "t-1", "t-2", "t-4"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_resume_removes_the_temp_file_of_a_run_killed_mid_write(tmp_path):
    w = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    w.write("train", _sample(0), {"images/0.png": _img(0)})
    w.close()
    stale = [tmp_path / "images" / ".1.png.9029.140442343525248.tmp", tmp_path / "masks" / "sub" / ".m.png.1.2.tmp"]
    for f in stale:  # what a SIGKILL between write_bytes and os.replace leaves
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"half a png")
    keep = tmp_path / "images" / "0.png"
    DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1").close()
    assert not any(f.exists() for f in stale) and keep.is_file()


def test_refuses_other_settings_unless_overwrite(tmp_path):
    w = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    w.write("train", _sample(0), {"images/0.png": _img(0)})
    w.close()
    with pytest.raises(ValueError, match="--overwrite"):
        DatasetWriter(tmp_path, builder="quality", seed=2, labeller="template@1")
    w = DatasetWriter(tmp_path, builder="quality", seed=2, labeller="template@1", overwrite=True)
    assert w.done_ids() == set() and not (tmp_path / "images" / "0.png").exists()
    w.close()


def test_invalid_sample_is_not_written(tmp_path):
    w = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    with pytest.raises(SampleError, match="not found"):
        w.write("train", _sample(0), {})  # its image file was never written
    with pytest.raises(ValueError, match="inside the dataset folder"):
        w.write("train", _sample(1), {"../escape.png": _img(1)})
    with pytest.raises(ValueError, match="unknown split"):
        w.write("dev", _sample(2), {"images/2.png": _img(2)})
    w.close()
    assert (tmp_path / "train.jsonl").read_text() == ""


def test_a_second_writer_on_the_same_folder_is_refused_until_the_first_closes(tmp_path):
    first = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    first.write("train", _sample(0), {"images/0.png": _img(0)})
    with pytest.raises(ValueError, match="another build is writing"):
        DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    first.close()
    second = DatasetWriter(tmp_path, builder="quality", seed=1, labeller="template@1")
    assert second.done_ids() == {"t-0"}
    second.close()
    assert len(load_jsonl(tmp_path / "train.jsonl")) == 1
