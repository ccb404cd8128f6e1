"""``DatasetWriter``: writes a Loupe dataset folder that survives a kill and resumes.

Layout (DESIGN.md's data contract): ``images/``, ``masks/``, ``train.jsonl``, ``val.jsonl``,
``test.jsonl``, ``card.md``. The order of each ``write`` makes it crash-safe:

1. every image and mask PNG is written to a temporary file and renamed into place (atomic);
2. only then is the JSONL line appended, flushed and fsynced.

So a line never names a missing file. On restart the writer reads the existing lines (a truncated
last line, left by a kill mid-write, is cut off), and ``done_ids()`` tells the builder which ids to
skip. A small ``.build.json`` records builder, seed and labeller; resuming with different ones is
refused, since the remaining samples would not match the finished ones.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from loupe_vlm.prompts import TAXONOMY_VERSION, TEMPLATE_VERSION, Sample, SampleError

from .sources import encode_png

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUILD_FILE = ".build.json"
LOCK_FILE = ".lock"


def _lock_folder(out_dir: Path) -> Any:
    """Hold an exclusive lock on ``out_dir/.lock`` for this writer's life, so a second build into the
    same folder stops at once instead of interleaving (and duplicating) samples. POSIX only; where
    ``fcntl`` does not exist the folder is not locked."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fh = (out_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ValueError(f"{out_dir}: another build is writing to this folder now; wait for it to finish, "
                         "stop it, or choose another --out") from None
    return fh


class DatasetWriter:
    """Append-only, resumable writer of a dataset folder.

    ``builder`` names the builder (``"quality"``, ``"forgery"``), ``seed`` and ``labeller`` go into
    the card and guard resumption. With ``overwrite`` an existing dataset in ``out_dir`` is removed.
    Thread-safe: several workers may call ``write``.
    """

    def __init__(self, out_dir: str | os.PathLike, *, builder: str, seed: int, labeller: str,
                 overwrite: bool = False, fsync: bool = True):
        self.out_dir = Path(out_dir)
        self.builder, self.seed, self.labeller = builder, seed, labeller
        self.fsync = fsync
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._counts = {s: 0 for s in SPLITS}
        identity = {"builder": builder, "seed": seed, "labeller": labeller}
        build_file = self.out_dir / BUILD_FILE
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fh = _lock_folder(self.out_dir)
        if overwrite:
            for name in [f"{s}.jsonl" for s in SPLITS] + ["card.md", BUILD_FILE]:
                (self.out_dir / name).unlink(missing_ok=True)
            for sub in ("images", "masks"):
                shutil.rmtree(self.out_dir / sub, ignore_errors=True)
        if build_file.is_file():
            previous = json.loads(build_file.read_text(encoding="utf-8"))
            if previous != identity:
                if self._lock_fh is not None:
                    self._lock_fh.close()
                raise ValueError(
                    f"{self.out_dir}: holds a dataset built with {previous}, not {identity}; resume with the "
                    f"same settings, choose another --out, or pass --overwrite")
        else:
            build_file.write_text(json.dumps(identity) + "\n", encoding="utf-8")
        (self.out_dir / "images").mkdir(exist_ok=True)
        # a run killed mid-file leaves its temp file (``_write_file``); the folder is locked, so no live
        # writer owns any of them now
        for sub in ("images", "masks"):
            for stale in (self.out_dir / sub).rglob(".*.tmp") if (self.out_dir / sub).is_dir() else ():
                stale.unlink(missing_ok=True)
        for split in SPLITS:
            self._recover(split)
        self._handles = {s: (self.out_dir / f"{s}.jsonl").open("a", encoding="utf-8") for s in SPLITS}
        if self._done:
            log.info("%s: resuming, %d samples already written", self.out_dir, len(self._done))

    # ---- resume ----------------------------------------------------------------------------------
    def _recover(self, split: str) -> None:
        path = self.out_dir / f"{split}.jsonl"
        if not path.is_file():
            return
        raw = path.read_bytes()
        good_end = 0
        pos = 0
        while pos < len(raw):
            nl = raw.find(b"\n", pos)
            if nl < 0:  # a kill mid-line: no newline, so the line was never completed
                break
            line = raw[pos:nl]
            if line.strip():
                try:
                    rec = json.loads(line)
                    sample_id = rec["id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s: dropping a malformed line at byte %d and everything after it", path, pos)
                    break
                self._done.add(sample_id)
                self._counts[split] += 1
            good_end = nl + 1
            pos = nl + 1
        if good_end < len(raw):
            log.warning("%s: cutting %d bytes of an incomplete last line", path, len(raw) - good_end)
            with path.open("r+b") as fh:
                fh.truncate(good_end)

    def done_ids(self) -> set[str]:
        """Ids already in the dataset (from earlier runs and this one)."""
        with self._lock:
            return set(self._done)

    def counts(self) -> dict[str, int]:
        """Samples per split so far."""
        with self._lock:
            return dict(self._counts)

    # ---- writing ---------------------------------------------------------------------------------
    def _write_file(self, rel: str, arr: np.ndarray | bytes) -> None:
        path = self.out_dir / rel
        if self.out_dir.resolve() not in path.resolve().parents:
            raise ValueError(f"{rel!r}: file paths must stay inside the dataset folder {self.out_dir}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(arr if isinstance(arr, bytes) else encode_png(arr))
        os.replace(tmp, path)

    def write(self, split: str, sample: Sample, images: Mapping[str, np.ndarray | bytes],
              masks: Mapping[str, np.ndarray | bytes] | None = None) -> None:
        """Write one sample; see ``write_many``."""
        self.write_many([(split, sample, images, masks or {})])

    def write_many(self, items: list[tuple[str, Sample, Mapping[str, np.ndarray | bytes],
                                           Mapping[str, np.ndarray | bytes]]]) -> None:
        """Write ``(split, sample, images, masks)`` items: every PNG first (temp file + rename), then
        the samples' lines in ``{split}.jsonl``, flushed and fsynced once for the batch.

        ``images``/``masks`` map relative paths (e.g. ``images/q-000001-A.png``) to uint8 arrays or
        to already-encoded PNG bytes (so worker processes can encode in parallel). Files shared by
        several samples may be passed again (rewritten atomically) or left out once written.
        The sample is validated against the files; a duplicate id raises.
        """
        for split, sample, _, _ in items:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        ids = [sample.id for _, sample, _, _ in items]
        with self._lock:
            dup = [i for i in ids if i in self._done] or [i for i in set(ids) if ids.count(i) > 1]
        if dup:
            raise ValueError(f"{self.out_dir}: sample id {dup[0]!r} is already written")
        written: set[str] = set()
        for _, sample, images, masks in items:
            for rel, arr in list(images.items()) + list((masks or {}).items()):
                if rel not in written:  # files shared by several samples of a batch are written once
                    self._write_file(rel, arr)
                    written.add(rel)
            try:
                sample.validate(self.out_dir)
            except SampleError as exc:
                raise SampleError(f"sample {sample.id!r}: {exc}") from None
        with self._lock:
            if any(i in self._done for i in ids):
                raise ValueError(f"{self.out_dir}: a sample of this batch was written meanwhile")
            touched = set()
            for split, sample, _, _ in items:
                self._handles[split].write(sample.to_json() + "\n")
                touched.add(split)
            for split in touched:  # one flush + fsync per batch: lines only after their files
                fh = self._handles[split]
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            for split, sample, _, _ in items:
                self._done.add(sample.id)
                self._counts[split] += 1

    def samples(self, split: str) -> list[Sample]:
        """Every sample written to ``split`` so far (this run and earlier ones)."""
        from loupe_vlm.prompts import load_jsonl
        path = self.out_dir / f"{split}.jsonl"
        with self._lock:
            self._handles[split].flush()
        return load_jsonl(path) if path.is_file() else []

    def close(self) -> None:
        for fh in self._handles.values():
            if not fh.closed:
                fh.close()
        if self._lock_fh is not None and not self._lock_fh.closed:
            self._lock_fh.close()  # closing the file releases the lock

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- card ------------------------------------------------------------------------------------
    def finish(self, card_sections: Mapping[str, Any] | None = None, title: str | None = None) -> Path:
        """Write ``card.md``: identity, versions, counts per split, then the caller's sections.

        A section's value may be markdown text, a mapping (rendered as a two-column table, or a
        multi-column table when its values are mappings) or a list (rendered as bullets).
        """
        for fh in self._handles.values():
            if not fh.closed:
                fh.flush()
        lines = [f"# {title or f'Loupe {self.builder} dataset'}", "",
                 f"- builder: `{self.builder}`", f"- seed: `{self.seed}`", f"- labeller: `{self.labeller}`",
                 f"- template version: `{TEMPLATE_VERSION}`", f"- taxonomy version: `{TAXONOMY_VERSION}`",
                 f"- Loupe version: `{_loupe_version()}`",
                 "", "## Samples per split", "", "| split | samples |", "|---|---|"]
        counts = self.counts()
        lines += [f"| {s} | {counts[s]} |" for s in SPLITS]
        lines.append(f"| total | {sum(counts.values())} |")
        for name, body in (card_sections or {}).items():
            lines += ["", f"## {name}", "", _render(body)]
        path = self.out_dir / "card.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
        os.replace(tmp, path)
        self.close()
        return path


def _loupe_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("loupe-vlm")
    except (ImportError, PackageNotFoundError):
        return "unknown (not installed)"


def _render(body: Any) -> str:
    if isinstance(body, str):
        return body
    if isinstance(body, Mapping):
        rows = list(body.items())
        if rows and all(isinstance(v, Mapping) for _, v in rows):
            cols: list[str] = []
            for _, v in rows:
                cols += [c for c in v if c not in cols]
            out = ["| | " + " | ".join(map(str, cols)) + " |", "|---" * (len(cols) + 1) + "|"]
            out += [f"| {k} | " + " | ".join(str(v.get(c, "")) for c in cols) + " |" for k, v in rows]
            return "\n".join(out)
        return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    if isinstance(body, (list, tuple)):
        return "\n".join(f"- {x}" for x in body)
    return str(body)
