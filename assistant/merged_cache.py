"""A cache of a LoRA checkpoint's language model with the LoRA already merged, for answering only.

Answering with a LoRA checkpoint (loupe-smol's ``adapter/``) means: import peft (which imports
bitsandbytes and torch.compile when they are installed), load the base, grow its embeddings, wrap it and
merge. Measured for ``loupe ask`` on loupe-smol: about 2 s of a 9 s start. After the first merge, the
merged model is written here once, as a plain transformers folder (safetensors), and later starts load it
the way a full checkpoint's ``base/`` is loaded, with no peft at all.

Only checkpoints over a packaged base are cached. The key covers everything the merged weights depend
on: the adapter's files, the Loupe config (``lm_layers``), the packaged base's own conversion record
(the GGUF's sha256) and the peft and transformers versions. The folder is written under a temporary name
and renamed when complete, so a killed write leaves no half folder in its place. It costs the merged LM's
size on disk (538 MB, 513 MiB, for loupe-smol). ``LOUPE_MERGED_CACHE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FORMAT = 1
FOLDER = "merged"
KEEP = 2  # merged copies kept per base (the newest): a retrained checkpoint's old copy is let go
RECENT_SECONDS = 300
"""A copy written or used this recently is never swept: another process may be loading it (three checkpoints
of one base evaluated at once used to lose the third's copy between its write and its load)."""


def enabled() -> bool:
    return os.environ.get("LOUPE_MERGED_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def cache_folder(checkpoint: Path, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Where the merged LM of ``checkpoint`` lives, or None when it is not cached: the cache is off, the
    checkpoint has no adapter or no config, or its base is not a packaged one. (This converts the packaged
    base if it is not converted yet, as loading it would.)"""
    from .packaged_bases import MARKER, is_packaged_base, resolve_packaged_base

    adapter, config_file = checkpoint / "adapter", checkpoint / "loupe_config.json"
    if not enabled() or not adapter.is_dir() or not config_file.is_file():
        return None
    config = config_file.read_bytes()
    try:
        base = json.loads(config).get("base")
    except (ValueError, AttributeError):
        return None  # the load that follows names the broken config
    if not isinstance(base, str) or not is_packaged_base(base):
        return None
    base_folder = resolve_packaged_base(base, cache_dir=cache_dir)
    digest = hashlib.sha256(f"loupe-merged {FORMAT} peft {_version('peft')} "
                            f"transformers {_version('transformers')}\n".encode())
    digest.update(config_file.name.encode() + b"\0" + config)
    for f in [base_folder / MARKER, *sorted(adapter.iterdir())]:
        if f.is_file():
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    root = Path(cache_dir).expanduser() / FOLDER if cache_dir is not None else merged_root()
    return root / f"{base}-{digest.hexdigest()[:16]}"


def merged_root() -> Path:
    """``<Loupe's cache>/merged`` (see ``packaged_bases.cache_root``)."""
    from .packaged_bases import cache_root

    return cache_root() / FOLDER


def is_complete(folder: Path | None) -> bool:
    return folder is not None and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def write(folder: Path, vlm: Any) -> bool:
    """Save the merged ``vlm`` at ``folder`` (temporary name, then one rename). An unwritable cache only
    logs a warning: the answer does not need the copy. Returns whether the copy is now there."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    except OSError as exc:
        log.warning("the merged-model cache %s is not writable (%s); loading stays at full cost", folder.parent, exc)
        return False
    try:
        vlm.save_pretrained(tmp, safe_serialization=True)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not is_complete(folder):  # another process's copy landed first: same key, same bytes
                raise
        _sweep(folder)
        return True
    except OSError as exc:
        log.warning("could not write the merged-model cache %s (%s)", folder, exc)
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sweep(kept: Path) -> None:
    """Delete all but the ``KEEP`` newest merged copies of ``kept``'s base (each is the LM's full size)."""
    base = kept.name.rsplit("-", 1)[0]
    copies = sorted((p for p in kept.parent.glob(f"{base}-*") if p.is_dir() and p.name.rsplit("-", 1)[0] == base),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    now = time.time()
    for old in copies[KEEP:]:
        if old != kept and now - old.stat().st_mtime > RECENT_SECONDS:
            shutil.rmtree(old, ignore_errors=True)
