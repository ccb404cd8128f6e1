"""``loupe caption``: describe, rate or check many images, one JSON line per item, resumable.

Pipeline: inputs (files, folders, globs, or a ``--manifest``) become ``Item``s with stable ids (the
path relative to its root) -> ``--shard i/N`` keeps the ids whose hash falls in this shard -> ids
already in ``--out`` are skipped -> the rest are sorted by image size so a batch pads little ->
a thread pool decodes the next batches' images while the model generates the current one ->
``Assistant.run`` answers each batch -> masks are saved, then the batch's lines are appended,
flushed and fsynced. A kill (even SIGKILL) loses at most the batch in flight; the restart cuts a
torn last line and goes on. ``loupe caption merge OUT SHARDS...`` joins the shard outputs.

Why a thread pool and not a torch ``DataLoader``: the background work is file reads and Pillow
decodes, which release the GIL, and it is small next to generation. Worker processes would pickle
every decoded image back to the main process, fork a process that holds torch's thread pools, and
add nothing a size-sorted list of batches needs (no sampler, no collate: ``Assistant.run`` collates).
"""

from __future__ import annotations

import argparse
import csv
import glob
import hashlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from . import lm_precision
from .inference import GUIDANCE_HELP, MODEL_HELP, SCHEMA_TASK, Assistant, Request, Result, error_result
from .processing import ImageError, load_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
TASK_CHOICES = ("quality", "compare", "forgery", "auto")
# In --task auto each image gets two records, ids suffixed with these (see README: loupe caption).
AUTO_SUFFIXES = {"quality": "#quality", "forgery": "#forgery"}
CSV_FIELDS = ("id", "task", "images", "reference", "text", "confidence", "rating", "score", "distortions",
              "better", "comparison_probability", "tampered", "forgery_probability", "manipulation", "area",
              "mask", "error_type", "error_message", "model", "seconds")


# --------------------------------------------------------------------------------------------------
# Items: what to run, with stable ids
# --------------------------------------------------------------------------------------------------

@dataclass
class Item:
    """One record to produce: a template task over image paths (roles in order)."""

    id: str
    task: str  # a template task, e.g. "quality.assess"
    paths: list[Path]  # image files, in role order
    roles: list[str]
    names: list[str]  # how each image is named in the record
    detail: bool = False
    error: dict[str, str] | None = None  # refused before running (bad manifest row, path outside roots)
    size: tuple[int, int] | None = field(default=None, compare=False)  # (W, H) of the last image (B in a pair), for grouping

    @property
    def n_jobs(self) -> int:
        """Generations this item costs (comparisons run both orders)."""
        return 2 if self.task in ("quality.rate", "quality.compare") else 1


def template_task(task: str, detail: bool) -> str:
    """--task name -> template task."""
    if task == "compare":
        return "quality.compare" if detail else "quality.rate"
    return {"quality": "quality.assess", "forgery": "forgery.detect"}[task]


def _is_glob(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def _glob_root(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard: ids are relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def collect_paths(inputs: Iterable[str], extensions: Iterable[str]) -> tuple[list[tuple[Path, Path]], list[str]]:
    """Expand files, folders (recursively) and globs into (path, root) pairs, sorted and deduplicated.

    Folders and globs keep only files with one of ``extensions``; a file named directly is always
    kept (if it is not an image it becomes an error record). Returns the pairs and the inputs that
    matched nothing."""
    exts = {"." + e.lower().lstrip(".") for e in extensions}
    found: list[tuple[Path, Path]] = []
    unmatched: list[str] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            hits = [(Path(d) / f, path) for d, _, files in os.walk(path) for f in files
                    if Path(f).suffix.lower() in exts]
        elif path.exists() or path.is_symlink():
            hits = [(path, path.parent)]
        elif _is_glob(arg):
            root = _glob_root(arg)
            hits = [(Path(p), root) for p in glob.glob(arg, recursive=True)
                    if Path(p).is_file() and Path(p).suffix.lower() in exts]
        else:
            hits = [(path, path.parent)]  # a missing file: reported as an error record, the run goes on
        if not hits:
            unmatched.append(arg)
        found += sorted(hits)
    seen: set[str] = set()
    unique = []
    for p, root in found:
        key = os.path.abspath(p)
        if key not in seen:
            seen.add(key)
            unique.append((p, root))
    return unique, unmatched


def path_id(path: Path, root: Path) -> str:
    """The item id: the path relative to its root, with forward slashes (stable across runs and OSes)."""
    return Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root))).as_posix()


def _unique_ids(items: list[Item]) -> list[Item]:
    """Give a repeated id a ``~2``, ``~3``... suffix, in input order (so it is stable across runs)."""
    counts: Counter[str] = Counter()
    for it in items:
        counts[it.id] += 1
        if counts[it.id] > 1:
            new = f"{it.id}~{counts[it.id]}"
            logger.warning("id %r is used twice; the second is written as %r", it.id, new)
            it.id = new
    return items


def items_from_paths(pairs: list[tuple[Path, Path]], task: str, detail: bool) -> list[Item]:
    """One item per image (two in --task auto); comparisons need a manifest."""
    items = []
    for path, root in pairs:
        pid = path_id(path, root)
        tasks = ["quality", "forgery"] if task == "auto" else [task]
        for t in tasks:
            iid = pid + (AUTO_SUFFIXES[t] if task == "auto" else "")
            items.append(Item(iid, template_task(t, detail), [path], ["A"], [str(path)], detail))
    return items


# ---- manifests -----------------------------------------------------------------------------------

def read_manifest(path: Path) -> list[tuple[int, dict[str, Any] | None, str | None]]:
    """Rows of a .jsonl or .csv manifest as (line number, row or None, problem or None).

    CSV columns: ``images`` (several paths separated by ``;``) or ``image``; optional ``id``,
    ``reference``, ``task``."""
    rows: list[tuple[int, dict[str, Any] | None, str | None]] = []
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            for n, row in enumerate(csv.DictReader(fh), start=2):
                imgs = row.get("images") or row.get("image") or ""
                out: dict[str, Any] = {"images": [s.strip() for s in imgs.split(";") if s.strip()]}
                for key in ("id", "reference", "task"):
                    if row.get(key):
                        out[key] = row[key].strip()
                rows.append((n, out, None))
        return rows
    with path.open(encoding="utf-8") as fh:
        return list(json_lines(fh))


def json_lines(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, JSON object or None, problem or None) for each non-blank line."""
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, None, f"not valid JSON ({exc.msg})"
            continue
        yield (n, obj, None) if isinstance(obj, dict) else (n, None, "not a JSON object")


def resolve_in_roots(raw: str, roots: list[Path]) -> tuple[Path, Path]:
    """Resolve a manifest path inside the allowed roots; returns (real path, the root holding it).

    A relative path is tried under each root in turn (the first that exists wins); an absolute one
    must lie inside a root. Symlinks and ``..`` are resolved first, so a link or a path that leads
    out of every root is refused: ``ImageError(kind="outside_root")``."""
    real_roots = [r.resolve() for r in roots]

    def owner(p: Path) -> Path | None:
        return next((r for r in real_roots if p == r or r in p.parents), None)

    raw_path = Path(raw)
    candidates = [raw_path.resolve()] if raw_path.is_absolute() else [(r / raw_path).resolve() for r in real_roots]
    inside = [(c, owner(c)) for c in candidates if owner(c) is not None]
    if not inside:
        raise ImageError(raw, "outside_root", "resolves outside the allowed roots "
                         f"({', '.join(map(str, roots))}) and is refused; move the file under a root or "
                         "add its folder with --root")
    return next(((c, r) for c, r in inside if c.exists()), inside[0])  # type: ignore[return-value]


def items_from_manifest(path: Path, roots: list[Path], default_task: str, detail: bool) -> list[Item]:
    """Items from a manifest. A bad row or a path outside the roots becomes an error item."""
    items = []
    for line_no, row, problem in read_manifest(path):
        where = f"{path}:{line_no}"
        row = row or {}
        row_id = str(row["id"]) if row.get("id") not in (None, "") else None
        problem = problem or _row_problem(row)
        raws = [str(p) for p in row.get("images") or []] if problem is None else []
        ref = row.get("reference") if problem is None else None
        task = (row.get("task") if problem is None else None) or default_task
        if task == "auto" and len(raws) == 2:
            task = "compare"
        tasks = ["quality", "forgery"] if task == "auto" else [task]
        names = ([str(ref)] if ref else []) + raws
        resolved: list[tuple[Path, Path]] = []
        refused = None
        if problem is None:
            try:
                resolved = [resolve_in_roots(r, roots) for r in names]
            except ImageError as exc:
                refused = {"type": exc.kind, "message": f"{where}: {exc}"}
        ids = [path_id(p, root) for p, root in resolved][1 if ref else 0:] or raws
        base = row_id or (_join_ids(ids) if ids else f"{path.name}:{line_no}")
        for t in tasks:
            tt = t if "." in t else template_task(t, detail)
            iid = base + (AUTO_SUFFIXES[t] if task == "auto" else "")
            roles = (["reference"] if ref else []) + (["A", "B"] if tt in ("quality.rate", "quality.compare") else ["A"])
            error = refused
            if problem is not None:
                error = {"type": "bad_row", "message": f"{where}: {problem}"}
            elif error is None and (bad := _task_problem(tt, len(raws), bool(ref))):
                error = {"type": "bad_row", "message": f"{where}: {bad}"}
            if error is not None:
                items.append(Item(iid, tt, [], [], names, error=dict(error)))
            else:
                items.append(Item(iid, tt, [p for p, _ in resolved], roles, names, detail))
    return items


def _join_ids(ids: list[str]) -> str:
    return "|".join(ids)


def _row_problem(row: dict[str, Any]) -> str | None:
    images = row.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        return 'needs "images": a list of one or two paths'
    task = row.get("task")
    known = set(TASK_CHOICES) | set(SCHEMA_TASK) - {"chat"}
    if task is not None and task not in known:
        return f"unknown task {task!r}; use one of {', '.join(TASK_CHOICES)}"
    return None


def _task_problem(task: str, n_images: int, reference: bool) -> str | None:
    want = 2 if task in ("quality.rate", "quality.compare") else 1
    if n_images != want:
        return f"task {task} takes {want} image(s) in \"images\", got {n_images}"
    if reference and task == "forgery.detect":
        return "forgery detection takes no reference image"
    return None


# --------------------------------------------------------------------------------------------------
# Sharding, ordering, resuming
# --------------------------------------------------------------------------------------------------

def parse_shard(text: str) -> tuple[int, int]:
    """"i/N" (0-based i) -> (i, N)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
        raise argparse.ArgumentTypeError(f"--shard wants i/N with 0 <= i < N, got {text!r}")
    return int(m[1]), int(m[2])


def shard_of(item_id: str, n_shards: int) -> int:
    """Stable shard of an id: a hash of the id (not Python's salted ``hash``), so every worker agrees."""
    return int.from_bytes(hashlib.sha1(item_id.encode("utf-8")).digest()[:8], "big") % n_shards


def _base_id(item_id: str) -> str:
    """The image part of an id: auto's two records of one image go to the same shard."""
    for suffix in AUTO_SUFFIXES.values():
        if item_id.endswith(suffix):
            return item_id[: -len(suffix)]
    return item_id


def read_done(out: Path) -> dict[str, dict[str, Any]]:
    """Records already in ``out`` by id. A torn last line (a kill mid-write) is cut off the file."""
    done: dict[str, dict[str, Any]] = {}
    if not out.exists():
        return done
    with out.open("rb+") as fh:
        data = fh.read()
        good_end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn line
        if good_end < len(data):
            logger.warning("%s: cutting a torn last line (%d bytes) left by an interrupted run", out,
                           len(data) - good_end)
            fh.truncate(good_end)
    for n, rec, problem in json_lines(data[:good_end].decode("utf-8", errors="replace").splitlines()):
        if rec is None or "id" not in rec:
            logger.warning("%s:%d: %s; ignored (its item will be redone)", out, n, problem or "no id")
            continue
        done[str(rec["id"])] = rec
    return done


def probe_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from the file header without decoding pixels; None if Pillow cannot read it."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception:  # noqa: BLE001 - any failure here only means "sort it first"; loading reports it
        return None


def make_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Group items into batches of at most ``batch_size`` generations, similar sizes together.

    Items whose header cannot be read come first in batches of their own (they fail at load,
    cost no generation and should not take slots in a real batch)."""
    broken = [it for it in items if it.size is None]
    ok = sorted((it for it in items if it.size is not None),
                key=lambda it: (it.task, len(it.paths), it.size[1], it.size[0], it.id))
    batches: list[list[Item]] = [broken[i:i + batch_size] for i in range(0, len(broken), batch_size)]
    current: list[Item] = []
    jobs = 0
    for it in ok:
        if current and (jobs + it.n_jobs > batch_size or current[-1].task != it.task):
            batches.append(current)
            current, jobs = [], 0
        current.append(it)
        jobs += it.n_jobs
    if current:
        batches.append(current)
    return batches


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------

Loaded = list[Any]  # per image: a PIL image or the exception that loading raised


def _load_batch(batch: list[Item], max_pixels: int) -> list[Loaded]:
    cache: dict[Path, Any] = {}  # --task auto asks for the same image twice in a row
    out = []
    for it in batch:
        imgs = []
        for p in it.paths:
            if p not in cache:
                try:
                    cache[p] = load_image(p, max_pixels)
                except (ImageError, OSError, ValueError) as exc:
                    cache[p] = exc
            imgs.append(cache[p])
        out.append(imgs)
    return out


def prefetch(batches: list[list[Item]], pool: ThreadPoolExecutor, max_pixels: int,
             depth: int = 2) -> Iterator[tuple[list[Item], list[Loaded]]]:
    """Yield (batch, decoded images), decoding up to ``depth`` batches ahead in ``pool``."""
    pending: deque[tuple[list[Item], Future]] = deque()
    it = iter(batches)

    def submit() -> None:
        nxt = next(it, None)
        if nxt is not None:
            pending.append((nxt, pool.submit(_load_batch, nxt, max_pixels)))

    for _ in range(depth):
        submit()
    while pending:
        batch, fut = pending.popleft()
        submit()
        yield batch, fut.result()


def _split_roles(res: Any, item: Item) -> None:
    """Error results keep all names in ``images``; move the reference to ``reference`` as answers do."""
    if res.error is not None and "reference" in item.roles:
        i = item.roles.index("reference")
        res.reference = item.names[i]
        res.images = [n for n, r in zip(item.names, item.roles) if r != "reference"]


def answer_batch(assistant: Assistant, batch: list[Item], loaded: list[Loaded], batch_size: int) -> list[Any]:
    """Results for one batch, in order. Load failures and refused items become error results; if
    generation itself fails, each item is retried alone so one bad item cannot sink the batch."""
    results: list[Any] = [None] * len(batch)
    runnable: list[tuple[int, Request]] = []
    for k, (it, imgs) in enumerate(zip(batch, loaded)):
        if it.error is not None:
            results[k] = Result(task=it.task, images=it.names, error=dict(it.error), id=it.id, model=assistant.name)
            continue
        failed = next((x for x in imgs if isinstance(x, BaseException)), None)
        if failed is not None:
            results[k] = error_result(it.task, it.names, failed, it.id, assistant.name)
            continue
        runnable.append((k, Request(it.task, imgs, it.roles, detail=it.detail, id=it.id, names=it.names)))
    if runnable:
        try:
            outs = assistant.run([r for _, r in runnable], batch_size=batch_size)
        except Exception:  # noqa: BLE001 - isolate the culprit below, then record it
            logger.exception("a batch failed; retrying its %d items one by one", len(runnable))
            outs = []
            for _, req in runnable:
                try:
                    outs += assistant.run([req], batch_size=1)
                except Exception as exc:  # noqa: BLE001 - one item's failure is its error record
                    outs.append(error_result(req.task, req.names or [], exc, req.id, assistant.name))
        for (k, _), res in zip(runnable, outs):
            results[k] = res
    for it, res in zip(batch, results):
        _split_roles(res, it)
    return results


def safe_mask_name(item_id: str) -> str:
    """A relative PNG path for an item's mask: the id's folders kept, odd characters replaced (then
    a short hash of the id is added, so two ids that differ only there keep apart)."""
    parts = [re.sub(r"[^A-Za-z0-9._#~+-]", "_", p) for p in item_id.split("/")]
    parts = [p if p not in ("", ".", "..") else "_" for p in parts]
    name = "/".join(parts)
    if name != item_id:
        name += "-" + hashlib.sha1(item_id.encode("utf-8")).hexdigest()[:8]
    return name + ".png"


def save_mask(mask: np.ndarray, path: Path) -> None:
    """A binary PNG (255 = tampered), written to a temporary name and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, format="PNG")
    os.replace(tmp, path)


def _record_path(path: Path, out: Path) -> str:
    """How a mask is named in a record: relative to the output file's folder when inside it."""
    try:
        return path.resolve().relative_to(out.resolve().parent).as_posix()
    except ValueError:
        return str(path.resolve())


@dataclass
class Summary:
    """What a run did (printed at the end, and returned to callers such as the benchmark)."""

    total: int = 0  # items in this shard
    skipped: int = 0  # already in --out
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    ok_before: int = 0
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return self.ok + sum(self.errors.values())


def caption_items(assistant: Assistant, items: list[Item], out: Path, *, batch_size: int = 8,
                  masks_dir: Path | None = None, workers: int = 2, overwrite: bool = False,
                  progress: bool = True) -> Summary:
    """Answer ``items`` with ``assistant`` and append their records to ``out`` (resuming by id)."""
    from tqdm.auto import tqdm

    summary = Summary(total=len(items))
    if overwrite and out.exists():
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out)
    clash = [it.id for it in items if it.id in done and done[it.id].get("task") not in
             (SCHEMA_TASK.get(it.task), None)]
    if clash:
        raise ValueError(f"{out} already holds records of another task for {len(clash)} item(s) "
                         f"(e.g. {clash[0]!r}); pass --overwrite to start again, or another --out")
    todo = [it for it in items if it.id not in done]
    summary.skipped = len(items) - len(todo)
    summary.ok_before = sum(1 for it in items if it.id in done and done[it.id].get("error") is None)
    if summary.skipped:
        logger.info("%s: %d of %d items already done; resuming", out, summary.skipped, len(items))
    t_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="loupe-load") as pool:
        for it, size in zip(todo, pool.map(lambda i: probe_size(i.paths[-1]) if i.paths and i.error is None
                                            else None, todo)):
            it.size = size
        batches = make_batches(todo, batch_size)
        bar = tqdm(total=len(todo), unit="img", desc="caption", disable=not progress, dynamic_ncols=True)
        with out.open("a", encoding="utf-8") as fh, bar:
            for batch, loaded in prefetch(batches, pool, assistant.processor.max_image_pixels):
                results = answer_batch(assistant, batch, loaded, batch_size)
                lines = []
                for it, res in zip(batch, results):
                    mask_path = None
                    if masks_dir is not None and res.forgery is not None and res.forgery.mask is not None:
                        target = masks_dir / safe_mask_name(it.id)
                        save_mask(res.forgery.mask, target)  # before the line, so a line never names a missing mask
                        mask_path = _record_path(target, out)
                    rec = res.to_record(mask_path)
                    rec["id"] = it.id
                    lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
                    if res.error is None:
                        summary.ok += 1
                    else:
                        summary.errors[res.error.get("type", "error")] += 1
                fh.write("".join(lines))
                fh.flush()
                os.fsync(fh.fileno())  # the batch survives a power cut, not just a kill
                bar.update(len(batch))
    summary.seconds = time.perf_counter() - t_start
    return summary


# --------------------------------------------------------------------------------------------------
# CSV and merge
# --------------------------------------------------------------------------------------------------

def flat_row(rec: dict[str, Any]) -> dict[str, Any]:
    """One record as a flat CSV row (lists joined with ``;``)."""
    q, c, f, e = (rec.get(k) or {} for k in ("quality", "comparison", "forgery", "error"))
    return {"id": rec.get("id"), "task": rec.get("task"), "images": ";".join(rec.get("images") or []),
            "reference": rec.get("reference"), "text": rec.get("text"), "confidence": rec.get("confidence"),
            "rating": q.get("rating"), "score": q.get("score"),
            "distortions": ";".join(f"{d.get('name')}:{d.get('severity')}" for d in q.get("distortions") or []),
            "better": c.get("better"), "comparison_probability": c.get("probability"),
            "tampered": f.get("tampered"), "forgery_probability": f.get("probability"),
            "manipulation": f.get("manipulation"), "area": f.get("area"), "mask": f.get("mask"),
            "error_type": e.get("type"), "error_message": e.get("message"), "model": rec.get("model"),
            "seconds": rec.get("seconds")}


def write_csv(records: Iterable[dict[str, Any]], path: Path) -> None:
    """Write the CSV view of ``records`` (rebuilt whole from the JSONL, so it always matches it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for rec in records:
            writer.writerow(flat_row(rec))
    os.replace(tmp, path)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal answers: everything but the timing."""
    return {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}


def merge(out: Path, shards: list[Path], csv_path: Path | None = None) -> dict[str, Any]:
    """Join shard outputs into ``out``: one line per id, sorted by id.

    A repeated id with the same answer is a duplicate and dropped; with a different answer it is a
    conflict: a successful record wins over an error record, otherwise the first file's wins, and
    the conflict is reported."""
    merged: dict[str, dict[str, Any]] = {}
    source: dict[str, Path] = {}
    duplicates, conflicts, bad_lines = 0, [], 0
    for shard in shards:
        with shard.open(encoding="utf-8") as fh:
            for n, rec, _ in json_lines(fh):
                if rec is None or "id" not in rec:
                    bad_lines += 1
                    logger.warning("%s:%d: not a result record; skipped", shard, n)
                    continue
                rid = str(rec["id"])
                if rid not in merged:
                    merged[rid], source[rid] = rec, shard
                elif _same(merged[rid], rec):
                    duplicates += 1
                else:
                    conflicts.append((rid, str(source[rid]), str(shard)))
                    if merged[rid].get("error") is not None and rec.get("error") is None:
                        merged[rid], source[rid] = rec, shard
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for rid in sorted(merged):
            fh.write(json.dumps(merged[rid], ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    if csv_path is not None:
        write_csv((merged[r] for r in sorted(merged)), csv_path)
    return {"records": len(merged), "duplicates": duplicates, "conflicts": conflicts, "bad_lines": bad_lines,
            "errors": Counter(r["error"].get("type", "error") for r in merged.values() if r.get("error"))}


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe caption",
        description="Describe, rate or check many images: one JSON line per item in DESIGN.md's result "
                    "schema, forgery masks as PNGs. Resumable: rerun the same command after a crash or a "
                    "kill and it skips what is done. Bad files become error records; the run goes on.",
        epilog="examples:\n"
               "  loupe caption photos/ --task quality --out r.jsonl --csv r.csv\n"
               "  loupe caption 'shots/**/*.jpg' --task forgery --masks-dir masks/ --out f.jsonl\n"
               "  loupe caption --manifest pairs.jsonl --task compare --out c.jsonl\n"
               "  loupe caption photos/ --task auto --out r.jsonl --shard 0/4   # one of 4 workers\n"
               "  accelerate launch -m loupe_vlm.cli caption photos/ --out r.jsonl  # one process per GPU\n"
               "  loupe caption merge all.jsonl r.shard*.jsonl --csv all.csv\n\n"
               "--task auto writes two records per image, ids suffixed #quality and #forgery.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders (searched recursively) or globs")
    p.add_argument("--manifest", type=Path, metavar="FILE",
                   help='a .jsonl or .csv of rows {"id"?, "images": [...], "reference"?, "task"?}')
    p.add_argument("--root", type=Path, action="append", metavar="DIR",
                   help="a folder manifest paths may point into (repeatable; default: the manifest's folder). "
                        "Paths resolving anywhere else are refused")
    p.add_argument("--task", choices=TASK_CHOICES, default="quality",
                   help="quality (rating, distortions), compare (A/B, manifest rows of two images), forgery "
                        "(verdict, mask), auto (quality and forgery for each image) (default: quality)")
    p.add_argument("--detail", action="store_true", help="detailed answers instead of brief ones")
    p.add_argument("--out", type=Path, required=True, metavar="JSONL", help="results, one JSON line per item")
    p.add_argument("--csv", type=Path, metavar="CSV", help="also write a flat CSV of all results (rebuilt at the end)")
    p.add_argument("--masks-dir", type=Path, metavar="DIR", help="save forgery masks here as PNGs named by item id")
    p.add_argument("--ext", default=",".join(IMAGE_EXTENSIONS),
                   help=f"extensions taken from folders and globs (default: {','.join(IMAGE_EXTENSIONS)})")
    p.add_argument("--model", metavar="M", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto; under "
                   "accelerate launch each process takes its own GPU)")
    p.add_argument("--batch-size", type=int, default=8, help="generations per batch (default: 8)")
    p.add_argument("--workers", type=int, default=2, help="image-decoding threads (default: 2)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's choice); use 1 per process when several shards "
                        "share a machine")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default: 160)")
    p.add_argument("--evidence-guidance", type=float, metavar="S", help=GUIDANCE_HELP)
    p.add_argument("--lm-precision", choices=lm_precision.CHOICES, default="auto", help=lm_precision.HELP)
    p.add_argument("--shard", type=parse_shard, metavar="i/N",
                   help="process only shard i of N (0-based; a stable hash of the id), e.g. a SLURM array task")
    p.add_argument("--overwrite", action="store_true", help="start fresh instead of resuming from --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def build_merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loupe caption merge",
                                description="Join shard outputs into one JSONL: one line per id, sorted by id; "
                                            "repeated ids are deduplicated and conflicting answers reported.")
    p.add_argument("out", type=Path, metavar="OUT", help="the merged JSONL to write")
    p.add_argument("shards", type=Path, nargs="+", metavar="SHARD", help="shard outputs (.jsonl)")
    p.add_argument("--csv", type=Path, metavar="CSV", help="also write the merged results as CSV")
    return p


def main_merge(argv: list[str]) -> int:
    args = build_merge_parser().parse_args(argv)
    missing = [str(s) for s in args.shards if not s.is_file()]
    if missing:
        print(f"loupe caption merge: no such file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.out.resolve() in {s.resolve() for s in args.shards}:
        print("loupe caption merge: OUT must not be one of the shard files", file=sys.stderr)
        return 2
    report = merge(args.out, args.shards, args.csv)
    print(f"merged {len(args.shards)} file(s) -> {args.out}: {report['records']} records, "
          f"{report['duplicates']} duplicate line(s) dropped, {len(report['conflicts'])} conflict(s)")
    if report["errors"]:
        print("  error records: " + ", ".join(f"{k} {v}" for k, v in report["errors"].most_common()))
    for rid, first, second in report["conflicts"][:20]:
        print(f"  conflict: {rid!r} differs between {first} and {second}")
    if report["bad_lines"]:
        print(f"  {report['bad_lines']} unreadable line(s) skipped")
    if args.csv:
        print(f"  csv: {args.csv}")
    return 0


def _distributed(device: str) -> tuple[int, int, str | None]:
    """(rank, world size, device) when started by ``accelerate launch``/torchrun, else (0, 1, None)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    import torch
    from accelerate import PartialState

    # without cpu=True accelerate sees a CPU-only multi-process launch as a single process
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=on_cpu)
    return state.process_index, state.num_processes, "cpu" if on_cpu else str(state.device)


def _shard_out(path: Path, i: int, n: int) -> Path:
    return path.with_name(f"{path.stem}.shard{i}-of-{n}{path.suffix}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return main_merge(argv[1:])
    args = build_parser().parse_args(argv)
    # load_image enforces its own pixel limit (a too_large error record); Pillow's warning is noise here
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    if not args.inputs and args.manifest is None:
        print("loupe caption: give image files, folders or globs, or --manifest FILE", file=sys.stderr)
        return 2
    if args.batch_size < 1:
        print("loupe caption: --batch-size must be at least 1", file=sys.stderr)
        return 2
    if args.task == "compare" and args.inputs:
        print("loupe caption: --task compare needs pairs; list them in a --manifest (rows with two images)",
              file=sys.stderr)
        return 2

    out, csv_path = args.out, args.csv
    shard, device = args.shard, args.device
    rank, world, dist_device = _distributed(args.device)
    if world > 1:
        if shard is not None:
            print("loupe caption: --shard and a multi-process launch both split the work; use one",
                  file=sys.stderr)
            return 2
        shard = (rank, world)
        device = dist_device if args.device == "auto" else device
        out = _shard_out(out, rank, world)  # each process appends to its own file
        csv_path = _shard_out(csv_path, rank, world) if csv_path else None

    # ---- items ----
    items: list[Item] = []
    pairs, unmatched = collect_paths(args.inputs, args.ext.split(","))
    for arg in unmatched:
        print(f"loupe caption: {arg!r} matched no image files", file=sys.stderr)
    items += items_from_paths(pairs, args.task, args.detail)
    if args.manifest is not None:
        if not args.manifest.is_file():
            print(f"loupe caption: manifest {args.manifest} not found", file=sys.stderr)
            return 2
        roots = args.root or [args.manifest.resolve().parent]
        try:
            items += items_from_manifest(args.manifest, roots, args.task, args.detail)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            print(f"loupe caption: cannot read manifest {args.manifest}: {exc}", file=sys.stderr)
            return 2
    items = _unique_ids(items)
    if not items:
        print("loupe caption: nothing to do (no inputs found)", file=sys.stderr)
        return 2
    if shard is not None:
        items = [it for it in items if shard_of(_base_id(it.id), shard[1]) == shard[0]]

    # ---- model ----
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        assistant = Assistant.from_pretrained(args.model, device=device, max_new_tokens=args.max_new_tokens,
                                              evidence_guidance=args.evidence_guidance,
                                              lm_precision=args.lm_precision)
    except (FileNotFoundError, RuntimeError, ValueError, OSError) as exc:
        print(f"loupe caption: {exc}", file=sys.stderr)
        return 2

    try:
        summary = caption_items(assistant, items, out, batch_size=args.batch_size, masks_dir=args.masks_dir,
                                workers=args.workers, overwrite=args.overwrite, progress=not args.no_progress)
    except ValueError as exc:
        print(f"loupe caption: {exc}", file=sys.stderr)
        return 2
    if csv_path is not None:
        write_csv(read_done(out).values(), csv_path)
    if world > 1:  # no barrier: a slow shard must not time out the others; merge waits for all instead
        from accelerate import PartialState

        PartialState().destroy_process_group()
    _print_summary(summary, out, csv_path, args.masks_dir, shard, world > 1)
    nothing = summary.processed > 0 and summary.ok == 0 and summary.ok_before == 0
    return 1 if nothing else 0


def _print_summary(s: Summary, out: Path, csv_path: Path | None, masks_dir: Path | None,
                   shard: tuple[int, int] | None, launched: bool) -> None:
    rate = s.processed / s.seconds if s.seconds > 0 else 0.0
    head = f"shard {shard[0]}/{shard[1]}: " if shard else ""
    print(f"{head}{s.total} item(s): {s.skipped} already done, {s.processed} processed now "
          f"({s.ok} ok, {sum(s.errors.values())} error(s)) in {s.seconds:.1f} s ({rate:.2f} items/s)")
    if s.errors:
        print("  errors by type: " + ", ".join(f"{k} {v}" for k, v in s.errors.most_common()))
    print(f"  results: {out}" + (f"\n  csv: {csv_path}" if csv_path else ""))
    print(f"  masks: {masks_dir}" if masks_dir else "  masks: not saved (pass --masks-dir DIR)")
    if shard:
        pattern = out.with_name(re.sub(r"\.shard\d+-of-", ".shard*-of-", out.name)) if launched else "SHARD_FILES..."
        print(f"  when every shard is done: loupe caption merge MERGED.jsonl {pattern}")
