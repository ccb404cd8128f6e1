"""The merged-LM cache (``assistant/merged_cache.py``): its key, its writes, and that the default model
answers the same from it as from base plus adapter."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from loupe_vlm.assistant import inference, merged_cache
from loupe_vlm.assistant import packaged_bases as pb

EXAMPLES = Path(__file__).resolve().parents[2] / "demo" / "examples"


@pytest.fixture
def lora_checkpoint(tmp_path, monkeypatch):
    """A checkpoint folder with an adapter over a (stand-in) converted packaged base."""
    ckpt, base = tmp_path / "ckpt", tmp_path / "base"
    (ckpt / "adapter").mkdir(parents=True)
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"lora")
    (ckpt / "adapter" / "adapter_config.json").write_text("{}")
    (ckpt / "loupe_config.json").write_text(json.dumps({"base": pb.packaged_base_names()[0], "lm_layers": 12}))
    base.mkdir()
    (base / pb.MARKER).write_text(json.dumps({"sha256": "aa"}))
    monkeypatch.setattr(pb, "resolve_packaged_base", lambda name, cache_dir=None: base)
    monkeypatch.delenv("LOUPE_MERGED_CACHE", raising=False)
    return ckpt, base


def test_the_key_follows_everything_the_merged_weights_depend_on(lora_checkpoint, tmp_path, monkeypatch):
    ckpt, base = lora_checkpoint
    name = pb.packaged_base_names()[0]
    first = merged_cache.cache_folder(ckpt, cache_dir=tmp_path / "c")
    assert first.parent == tmp_path / "c" / "merged" and first.name.startswith(name + "-")
    assert merged_cache.cache_folder(ckpt, cache_dir=tmp_path / "c") == first  # stable
    seen = {first}
    for change in (lambda: (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"lora2"),
                   lambda: (ckpt / "loupe_config.json").write_text(json.dumps({"base": name, "lm_layers": 30})),
                   lambda: (base / pb.MARKER).write_text(json.dumps({"sha256": "bb"}))):
        change()
        key = merged_cache.cache_folder(ckpt, cache_dir=tmp_path / "c")
        assert key not in seen
        seen.add(key)
    monkeypatch.setattr(merged_cache, "_version", lambda dist: "99" if dist == "peft" else "1")
    assert merged_cache.cache_folder(ckpt, cache_dir=tmp_path / "c") not in seen


def test_no_cache_off_a_packaged_base_without_an_adapter_or_when_turned_off(lora_checkpoint, monkeypatch):
    ckpt, _ = lora_checkpoint
    name = pb.packaged_base_names()[0]
    assert merged_cache.cache_folder(ckpt) is not None
    monkeypatch.setenv("LOUPE_MERGED_CACHE", "0")
    assert merged_cache.cache_folder(ckpt) is None
    monkeypatch.delenv("LOUPE_MERGED_CACHE")
    (ckpt / "loupe_config.json").write_text(json.dumps({"base": "someone/some-vlm"}))
    assert merged_cache.cache_folder(ckpt) is None
    (ckpt / "loupe_config.json").write_text("{broken")
    assert merged_cache.cache_folder(ckpt) is None
    (ckpt / "loupe_config.json").write_text(json.dumps({"base": name}))
    shutil.rmtree(ckpt / "adapter")
    assert merged_cache.cache_folder(ckpt) is None


class _Saver:
    def __init__(self, fail: bool = False):
        self.fail = fail

    def save_pretrained(self, folder, safe_serialization):
        assert safe_serialization
        (Path(folder) / "config.json").write_text("{}")
        if self.fail:
            raise OSError("disk full")
        (Path(folder) / "model.safetensors").write_bytes(b"w")


def test_a_write_lands_whole_or_not_at_all_and_keeps_the_newest_two(tmp_path):
    root = tmp_path / "merged"
    assert not merged_cache.write(root / "smol-1111", _Saver(fail=True))
    assert not (root / "smol-1111").exists() and list(root.iterdir()) == []  # no half folder, no temp left
    for i, key in enumerate(("smol-aaaa", "smol-bbbb", "other-cccc", "smol-dddd")):
        assert merged_cache.write(root / key, _Saver())
        assert merged_cache.is_complete(root / key)
        os.utime(root / key, (1000 + i, 1000 + i))
    assert sorted(p.name for p in root.iterdir()) == ["other-cccc", "smol-bbbb", "smol-dddd"]


def test_an_unwritable_cache_only_warns(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert not merged_cache.write(blocker / "merged" / "smol-1", _Saver())
    assert "not writable" in caplog.text


def _default_base_missing() -> bool:
    base = json.loads((inference.DEFAULT_MODEL_DIR / "loupe_config.json").read_text())["base"]
    return pb.is_packaged_base(base) and importlib.util.find_spec(pb.get_packaged_base(base).import_name) is None


@pytest.mark.skipif(_default_base_missing(), reason="needs the packaged base (make install does it)")
def test_the_default_model_answers_the_same_from_the_merged_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(merged_cache, "merged_root", lambda: tmp_path / "merged")
    monkeypatch.delenv("LOUPE_MERGED_CACHE", raising=False)
    first = inference.Assistant.from_pretrained(lm_precision="fp32")  # base + adapter, merged, then written
    copies = list((tmp_path / "merged").iterdir())
    assert len(copies) == 1 and merged_cache.is_complete(copies[0])
    second = inference.Assistant.from_pretrained(lm_precision="fp32")  # from the copy
    vlm = second.model.vlm
    assert not hasattr(vlm, "peft_config")
    assert vlm.get_input_embeddings().weight is vlm.get_output_embeddings().weight
    assert first.name == second.name
    a, b = first.assess(EXAMPLES / "noisy.png"), second.assess(EXAMPLES / "noisy.png")
    assert a.text == b.text and a.quality.score == b.quality.score
    fa, fb = first.detect_forgery(EXAMPLES / "tampered.png"), second.detect_forgery(EXAMPLES / "tampered.png")
    assert fa.text == fb.text and fa.forgery.probability == fb.forgery.probability
    assert np.array_equal(fa.forgery.mask_probability, fb.forgery.mask_probability)
    # a damaged copy is dropped, the model merged again, and the copy rebuilt
    (copies[0] / "model.safetensors").write_bytes(b"not safetensors")
    third = inference.Assistant.from_pretrained(lm_precision="fp32")
    assert third.assess(EXAMPLES / "noisy.png").text == a.text
    assert merged_cache.is_complete(copies[0]) and (copies[0] / "model.safetensors").stat().st_size > 1000
    # another process lets the copy go between its write and its load: the merge in memory answers
    real_write = merged_cache.write

    def write_then_lose(folder, vlm):
        ok = real_write(folder, vlm)
        shutil.rmtree(folder)
        return ok

    shutil.rmtree(copies[0])
    monkeypatch.setattr(merged_cache, "write", write_then_lose)
    fourth = inference.Assistant.from_pretrained(lm_precision="fp32")
    assert fourth.assess(EXAMPLES / "noisy.png").text == a.text


def test_a_recent_copy_is_not_swept_another_process_may_be_loading_it(tmp_path):
    root = tmp_path / "merged"
    for key in ("smol-aaaa", "smol-bbbb", "smol-cccc"):  # all just written
        assert merged_cache.write(root / key, _Saver())
    assert sorted(p.name for p in root.iterdir()) == ["smol-aaaa", "smol-bbbb", "smol-cccc"]
    os.utime(root / "smol-aaaa", (1000, 1000))  # long unused: now it goes at the next write
    assert merged_cache.write(root / "smol-dddd", _Saver())
    assert sorted(p.name for p in root.iterdir()) == ["smol-bbbb", "smol-cccc", "smol-dddd"]
