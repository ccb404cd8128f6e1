"""``loupe build-data quality``: pristine images -> quality instruction data for every quality task.

The recipe follows DepictQA-Wild's DQ-495K (12 categories, 35 functions, 5 severities, single and
two-distortion images, ~5% clean, assessment and A/B comparison, brief and detailed, with and
without a reference) and goes beyond it: the labels come from the generator and every text is read
back and checked against them (``labellers.base.check_text``).

How a dataset is made (all deterministic given ``--seed``):

* Work is cut into **units**. A unit is one random view (crop + rescale) of one source photo and
  yields ``UNIT_SAMPLES`` samples with ids ``q-<unit*UNIT_SAMPLES + k>``. Consecutive units form a
  **block** of ``VIEWS_PER_BLOCK`` views of the same photo, so a photo is loaded once per block.
* A block's split comes from the split of its source photo (``sources.split_by_source``: whole
  photos per split, so no photo is in two splits); which pool part (photos, stamps, procedural) a
  block draws from follows ``--mix``.
* Each unit renders up to three distorted versions of its view: X, a partner Y with the same
  distortions at other severities, and a partner Z with other distortions (or none). Single-image
  tasks use a distorted one, or the pristine view itself with probability ``clean_rate`` (5%);
  A/B tasks use a pair whose better image is certain (``pair_better``) and
  the order is swapped at random, so A is better half the time.

Rating rule (``distortions.rating_for``): effective severity = the worst severity, plus one when a
second distortion is obvious or worse (capped at 5); 0 (clean) -> excellent, 1 -> good, 2 -> fair,
3-4 -> poor, 5 -> bad.

Meta of every sample: ``distortions`` and ``rating`` (of image A for A/B tasks), ``clean``,
``source``, ``source_photo`` (the split key), ``labeller``, ``detail``, ``reference``, and for A/B
tasks ``better``, ``distortions_A/B``, ``rating_A/B``.

Resume: ids already in the JSONL files are skipped; a unit is rebuilt only if some of its samples
are missing, and being deterministic it rewrites identical images. Samples dropped by the
``openai`` labeller are listed in ``dropped.jsonl`` so they are not retried on resume.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loupe_vlm.prompts import DISTORTIONS, SEVERITIES, Sample, category_of, image_roles_for, training_question, user_content

from . import distortions as D
from .captions import caption
from .labellers.base import ImageTruth, LabelJob
from .labellers.template import TemplateLabeller
from .sources import (PHOTO_SOURCES, SPLITS, SourceImage, builtin_pool, describe_pool, encode_png, from_folders,
                      from_manifest, random_view, split_by_source)
from .writer import DatasetWriter

log = logging.getLogger(__name__)

UNIT_SAMPLES = 6
VIEWS_PER_BLOCK = 4  # 24 samples per photo draw: loads amortised, yet val/test see many photos
# task key -> (task id, detailed?)
TASK_KEYS = {
    "identify": ("quality.identify", False),
    "assess_brief": ("quality.assess", False),
    "assess_detailed": ("quality.assess", True),
    "rate": ("quality.rate", False),
    "compare": ("quality.compare", True),
}
TASK_ALIASES = {"quality.identify": ["identify"], "identify": ["identify"],
                "quality.assess": ["assess_brief", "assess_detailed"], "assess": ["assess_brief", "assess_detailed"],
                "quality.assess.brief": ["assess_brief"], "assess_brief": ["assess_brief"],
                "quality.assess.detailed": ["assess_detailed"], "assess_detailed": ["assess_detailed"],
                "quality.rate": ["rate"], "rate": ["rate"], "quality.compare": ["compare"], "compare": ["compare"]}
DEFAULT_MIX = {"photos": 0.5, "stamps": 0.25, "procedural": 0.25}


@dataclass
class BuildConfig:
    """Settings of one build; every field maps to a command-line flag."""

    out: str
    n: int = 2000
    seed: int = 0
    image_size: int = 448
    """Side of the square views, in px."""
    tasks: list[str] = field(default_factory=lambda: list(TASK_KEYS))
    """Task keys (``identify``, ``assess_brief``, ``assess_detailed``, ``rate``, ``compare``), equally weighted."""
    images: list[str] = field(default_factory=list)
    """Folders/globs of pristine images; empty = the built-in pool."""
    manifest: str | None = None
    licence: str = "unknown (user-supplied)"
    """Licence note for --images folders, kept in the card."""
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    """Share of blocks per built-in pool part."""
    clean_rate: float = 0.05
    multi_rate: float = 0.3
    reference_rate: float = 0.4
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    workers: int = 1
    labeller: str = "template"
    base_url: str | None = None
    model: str = "gpt-4o"
    max_concurrency: int = 4
    overwrite: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append("--n must be at least 1")
        if self.image_size < 32:
            problems.append("--image-size must be at least 32")
        bad = [t for t in self.tasks if t not in TASK_KEYS]
        if bad:
            problems.append(f"--tasks: unknown {bad}; choose from {', '.join(TASK_KEYS)}")
        if self.labeller not in ("template", "openai"):
            problems.append("--labeller must be template or openai")
        if self.labeller == "openai" and not self.base_url and not os.environ.get("OPENAI_API_KEY"):
            problems.append("--labeller openai needs --base-url or OPENAI_API_KEY")
        for name in ("clean_rate", "multi_rate", "reference_rate"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"--{name.replace('_', '-')} must be within 0..1")
        if problems:
            raise ValueError("invalid quality build settings: " + "; ".join(problems))


# ---- the pool, shared by worker processes -------------------------------------------------------

@dataclass
class Pool:
    """Sources per split and pool part."""

    parts: dict[str, dict[str, list[SourceImage]]]  # split -> part -> sources
    weights: dict[str, float]
    described: dict[str, dict[str, int]]


def _part_of(src: SourceImage) -> str:
    if src.source.startswith("procedural"):
        return "procedural"
    if src.source == "stamps":
        return "stamps"
    if src.source in PHOTO_SOURCES:  # registry samples and the Debian photo packages
        return "photos"
    return "user"


def make_pool(cfg: BuildConfig) -> Pool:
    """The sources to draw from, split by photo."""
    if cfg.images or cfg.manifest:
        sources = (from_folders(cfg.images, licence=cfg.licence) if cfg.images else []) + (from_manifest(cfg.manifest) if cfg.manifest
                                                                       else [])
        weights = {"user": 1.0}
    else:
        include = [p for p, w in cfg.mix.items() if w > 0]
        sources = builtin_pool(include)
        weights = {p: w for p, w in cfg.mix.items() if w > 0}
    if not sources:
        raise ValueError("no pristine images found: pass --images DIR, or install the built-in pool "
                         "(make system-deps for opencv-doc and Tux Paint stamps)")
    splits = split_by_source(sources, cfg.fractions, cfg.seed)
    parts: dict[str, dict[str, list[SourceImage]]] = {}
    for split, srcs in splits.items():
        parts[split] = {}
        for s in srcs:
            parts[split].setdefault(_part_of(s), []).append(s)
    return Pool(parts, weights, describe_pool(sources))


_POOL: Pool | None = None
_CFG: BuildConfig | None = None
_CACHE: dict[str, np.ndarray] = {}


def _init_worker(cfg: BuildConfig, pool: Pool) -> None:
    global _POOL, _CFG
    import cv2
    cv2.setNumThreads(1)  # one core per worker: parallelism comes from processes
    _POOL, _CFG = pool, cfg
    _CACHE.clear()


def _load(src: SourceImage) -> np.ndarray:
    img = _CACHE.get(src.id)
    if img is None:
        if len(_CACHE) >= 32:  # all registry photos fit; procedural scenes come and go
            _CACHE.pop(next(iter(_CACHE)))
        img = _CACHE[src.id] = src.load()
    return img


def _drawn_split(cfg: BuildConfig, pool: Pool, block: int, rng: np.random.Generator) -> str:
    fr = np.asarray(cfg.fractions, np.float64)
    avail = [s for s in SPLITS if pool.parts.get(s)]
    probs = np.array([fr[SPLITS.index(s)] for s in avail])
    return avail[int(rng.choice(len(avail), p=probs / probs.sum()))] if probs.sum() > 0 else avail[0]


def _forced_splits(cfg: BuildConfig, pool: Pool) -> dict[int, str]:
    """Blocks whose split is set so that every split asked for (fraction > 0, photos available) gets at
    least one block, when the build has enough blocks: a small ``--n`` would otherwise leave val or
    test empty by chance. Only the last train blocks are moved; large builds, where every split is
    drawn anyway, are unchanged."""
    n_blocks = -(-((cfg.n + UNIT_SAMPLES - 1) // UNIT_SAMPLES) // VIEWS_PER_BLOCK)
    wanted = [s for s, f in zip(SPLITS, cfg.fractions) if f > 0 and pool.parts.get(s)]
    key = (cfg.seed, cfg.n, tuple(cfg.fractions), tuple(wanted), id(pool))
    if key in _FORCED:
        return _FORCED[key]
    if n_blocks < len(wanted):
        return {}
    drawn = [_drawn_split(cfg, pool, b, np.random.default_rng([cfg.seed, 11, b])) for b in range(n_blocks)]
    missing = [s for s in wanted if s not in drawn]
    forced: dict[int, str] = {}
    for b in reversed(range(n_blocks)):
        if not missing:
            break
        if drawn[b] == "train" and drawn.count("train") - len(forced) > 1:
            forced[b] = missing.pop()
    _FORCED.clear()
    _FORCED[key] = forced
    return forced


_FORCED: dict[tuple, dict[int, str]] = {}


def _block_choice(cfg: BuildConfig, pool: Pool, block: int) -> tuple[str, SourceImage]:
    rng = np.random.default_rng([cfg.seed, 11, block])
    split = _drawn_split(cfg, pool, block, rng)
    split = _forced_splits(cfg, pool).get(block, split)
    parts = [p for p in pool.weights if pool.parts[split].get(p)]
    if not parts:
        parts = list(pool.parts[split])
    w = np.array([pool.weights.get(p, 1.0) for p in parts])
    part = parts[int(rng.choice(len(parts), p=w / w.sum()))]
    srcs = pool.parts[split][part]
    return split, srcs[int(rng.integers(len(srcs)))]


# ---- ground truth ---------------------------------------------------------------------------------

Spec = list[tuple[str, int]]


def _truth(spec: Spec) -> ImageTruth:
    ds = [{"name": n, "category": category_of(n), "severity": int(l)} for n, l in D.ordered(spec)]
    return ImageTruth(ds, D.rating_for([l for _, l in spec]))


def _random_spec(rng: np.random.Generator, cfg: BuildConfig) -> Spec:
    r = rng.random()
    if r < cfg.clean_rate:
        return []
    if r < cfg.clean_rate + cfg.multi_rate:
        a, b = D.sample_pair(rng)
        return [(a, int(rng.integers(1, 6))), (b, int(rng.integers(1, 6)))]
    return [(D.sample_distortion(rng), int(rng.integers(1, 6)))]


def pair_better(x: Spec, y: Spec) -> str | None:
    """Which of two versions of the same view is certainly better ("x"/"y"), or None when unsure.

    Same distortions: the one no worse in every severity and better in one. One clean: the clean
    one. Otherwise the effective severities must differ by at least 2, so calibration noise between
    functions cannot flip the answer.
    """
    dx, dy = dict(x), dict(y)
    if set(dx) == set(dy) and dx:
        if all(dx[k] <= dy[k] for k in dx) and dx != dy:
            return "x"
        if all(dy[k] <= dx[k] for k in dx) and dx != dy:
            return "y"
        return None
    if not dx and dy:
        return "x"
    if not dy and dx:
        return "y"
    ex, ey = D.effective_severity(list(dx.values())), D.effective_severity(list(dy.values()))
    if abs(ex - ey) >= 2:
        return "x" if ex < ey else "y"
    return None


def _partners(x: Spec, rng: np.random.Generator, cfg: BuildConfig) -> tuple[Spec, Spec]:
    # Y: same distortions, one severity moved
    if x:
        y = list(x)
        i = int(rng.integers(len(y)))
        name, lvl = y[i]
        y[i] = (name, int(rng.choice([l for l in range(1, 6) if l != lvl])))
    else:
        y = [(D.sample_distortion(rng), int(rng.integers(1, 6)))]
    # Z: other distortions whose effect clearly differs, else a clean version
    for _ in range(10):
        z = _random_spec(rng, cfg)
        if z and {n for n, _ in z} != {n for n, _ in x} and pair_better(x, z) is not None:
            return y, z
    return y, ([] if x else [(D.sample_distortion(rng), int(rng.integers(3, 6)))])


# ---- one unit -------------------------------------------------------------------------------------

def sample_id(index: int) -> str:
    return f"q-{index:07d}"


def build_unit(unit: int, cfg: BuildConfig | None = None, pool: Pool | None = None,
               labeller: Any = None) -> list[dict[str, Any]]:
    """The samples of one unit: ``[{"split", "sample" (Sample), "files" {rel: png bytes}, "job"}]``.

    Deterministic in (seed, unit). Texts are worded by the template labeller here; another
    labeller rewords them later from ``job``.
    """
    cfg = cfg or _CFG
    pool = pool or _POOL
    assert cfg is not None and pool is not None
    labeller = labeller or TemplateLabeller(cfg.seed)
    split, src = _block_choice(cfg, pool, unit // VIEWS_PER_BLOCK)
    rng = np.random.default_rng([cfg.seed, 13, unit])
    qrng = random.Random(f"{cfg.seed}:q:{unit}")
    view = random_view(_load(src), rng, cfg.image_size)
    x = _random_spec(rng, cfg)
    y, z = _partners(x, rng, cfg)
    specs = {"x": x, "y": y, "z": z, "ref": []}
    rendered: dict[str, np.ndarray] = {}

    def image(key: str) -> np.ndarray:
        if key not in rendered:
            rendered[key] = view if key == "ref" else D.apply_many(view, specs[key],
                                                                  np.random.default_rng([cfg.seed, 17, unit, ord(key)]))
        return rendered[key]

    content = caption(src)
    weights = list(cfg.tasks)
    out = []
    used: set[tuple] = set()
    first = unit * UNIT_SAMPLES
    for k in range(UNIT_SAMPLES):
        idx = first + k
        if idx >= cfg.n:
            break
        for _ in range(6):  # avoid repeating the same (task, images, reference) in one unit
            key = weights[int(rng.integers(len(weights)))]
            task, detail = TASK_KEYS[key]
            reference = bool(rng.random() < cfg.reference_rate)
            if task in ("quality.rate", "quality.compare"):
                pairs = [(a, b) for a, b in (("x", "y"), ("x", "z"), ("y", "z")) if pair_better(specs[a], specs[b])]
                a, b = pairs[int(rng.integers(len(pairs)))]
                if rng.random() < 0.5:
                    a, b = b, a
                combo: tuple = (key, a, b, reference)
            else:
                # clean single images at exactly clean_rate: the pristine view itself; otherwise a
                # distorted version (X may be clean too, but that one serves the A/B pairs)
                distorted = [k for k in ("x", "y", "z") if specs[k]]
                a = "ref" if rng.random() < cfg.clean_rate or not distorted else \
                    distorted[int(rng.integers(len(distorted)))]
                b = None
                combo = (key, a, reference)
            if combo not in used:
                break
        used.add(combo)
        ta = _truth(specs[a])
        tb = _truth(specs[b]) if b else None
        better = None
        if b:
            better = "A" if pair_better(specs[a], specs[b]) == "x" else "B"
        roles = image_roles_for(task, reference)
        keys = {"reference": "ref", "A": a, "B": b}
        rel = {r: f"images/{unit:07d}-{keys[r]}.png" for r in roles}
        job = LabelJob(task=task, detail=detail, reference=reference, content=content, a=ta, b=tb, better=better,
                       key=sample_id(idx))
        text = labeller.label(job)
        question = training_question(task, detail, reference, qrng)
        meta: dict[str, Any] = {
            "distortions": ta.distortions, "rating": ta.rating, "clean": ta.clean,
            "source": src.id, "source_photo": src.group, "labeller": labeller.name,
            "detail": "detailed" if detail else "brief", "reference": reference,
        }
        if b:
            meta.update({"better": better, "distortions_A": ta.distortions, "distortions_B": tb.distortions,
                         "rating_A": ta.rating, "rating_B": tb.rating, "clean": ta.clean and tb.clean})
        sample = Sample(id=sample_id(idx), task=task, images=[rel[r] for r in roles], image_roles=roles,
                        messages=[{"role": "user", "content": user_content(roles, question)},
                                  {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                        meta=meta)
        out.append({"split": split, "sample": sample, "roles": {r: keys[r] for r in roles}, "job": job})
    files = {}
    for rec in out:
        for r, key in rec["roles"].items():
            files[f"images/{unit:07d}-{key}.png"] = key
    encoded = {path: encode_png(image(key)) for path, key in sorted(files.items())}
    for rec in out:
        rec["files"] = {p: encoded[p] for p in rec["sample"].images}
        rec["job"].images = {r: encoded[p] for r, p in zip(rec["sample"].image_roles, rec["sample"].images)}
    return out


def _unit_worker(unit: int) -> tuple[int, list[dict[str, Any]]]:
    return unit, build_unit(unit)


# ---- the build -----------------------------------------------------------------------------------

def _dropped_ids(out: Path) -> set[str]:
    path = out / "dropped.jsonl"
    if not path.is_file():
        return set()
    ids = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            ids.add(json.loads(line)["id"])
        except (json.JSONDecodeError, KeyError):
            continue
    return ids


def _check_settings(out: Path, cfg: BuildConfig) -> None:
    """Refuse to resume a dataset made with other settings (only --n, --workers and concurrency may change)."""
    settings = {"image_size": cfg.image_size, "tasks": sorted(cfg.tasks), "images": cfg.images,
                "manifest": cfg.manifest, "mix": cfg.mix, "clean_rate": cfg.clean_rate, "multi_rate": cfg.multi_rate,
                "reference_rate": cfg.reference_rate, "fractions": list(cfg.fractions), "model": cfg.model
                if cfg.labeller == "openai" else None}
    path = out / ".quality.json"
    if cfg.overwrite:
        path.unlink(missing_ok=True)
        (out / "dropped.jsonl").unlink(missing_ok=True)
    if path.is_file():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if previous.get(k) != settings[k])
        if changed:
            raise ValueError(f"{out}: was built with other settings ({', '.join(changed)}: "
                             f"{ {k: previous.get(k) for k in changed} }); resume with the same flags, "
                             f"choose another --out, or pass --overwrite")
    else:
        path.write_text(json.dumps(settings) + "\n", encoding="utf-8")


def build(cfg: BuildConfig, progress: bool = True) -> dict[str, Any]:
    """Build (or resume) the dataset in ``cfg.out``; returns a summary with counts and timing."""
    t0 = time.perf_counter()
    pool = make_pool(cfg)
    relabel = None
    labeller_name = TemplateLabeller.name
    if cfg.labeller == "openai":
        from .labellers.openai_quality import OpenAIQualityLabeller
        relabel = OpenAIQualityLabeller.from_config(cfg)
        labeller_name = relabel.name
    writer = DatasetWriter(cfg.out, builder="quality", seed=cfg.seed, labeller=labeller_name,
                           overwrite=cfg.overwrite)
    out = Path(cfg.out)
    _check_settings(out, cfg)
    done = writer.done_ids() | _dropped_ids(out)
    n_units = (cfg.n + UNIT_SAMPLES - 1) // UNIT_SAMPLES
    todo = [u for u in range(n_units)
            if any(sample_id(i) not in done for i in range(u * UNIT_SAMPLES, min(cfg.n, (u + 1) * UNIT_SAMPLES)))]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.n, initial=len(done & {sample_id(i) for i in range(cfg.n)}), unit="sample",
                   desc="quality", dynamic_ncols=True, file=sys.stderr)
    written = dropped = 0
    drop_reasons: Counter = Counter()
    dropped_fh = (out / "dropped.jsonl").open("a", encoding="utf-8") if relabel else None

    def consume(records: list[dict[str, Any]]) -> None:
        nonlocal written, dropped
        records = [r for r in records if r["sample"].id not in done]
        if not records:
            return
        if relabel is not None:
            texts = relabel.label_many([r["job"] for r in records])
        batch = []
        for i, rec in enumerate(records):
            sample = rec["sample"]
            if relabel is not None:
                text, why = texts[i]
                if text is None:
                    dropped += 1
                    drop_reasons[why.split(" (")[0] if why else "unknown"] += 1
                    dropped_fh.write(json.dumps({"id": sample.id, "reason": why}) + "\n")
                    dropped_fh.flush()
                    continue
                sample.messages[-1]["content"][0]["text"] = text
                sample.meta["labeller"] = relabel.name
            batch.append((rec["split"], sample, rec["files"], {}))
        writer.write_many(batch)
        written += len(batch)
        if bar:
            bar.update(len(records))

    # the openai labeller gets several units at once, so its thread pool has enough requests in flight
    batch_units = max(1, (4 * cfg.max_concurrency) // UNIT_SAMPLES) if relabel is not None else 1
    pending: list[dict[str, Any]] = []

    def feed(records: list[dict[str, Any]], last: bool = False) -> None:
        pending.extend(records)
        if len(pending) >= batch_units * UNIT_SAMPLES or last:
            consume(pending[:])
            pending.clear()

    t_units = time.perf_counter()
    try:
        if cfg.workers <= 1:
            _init_worker(cfg, pool)
            for u in todo:
                feed(build_unit(u))
        else:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, pool)) as procs:
                for _, records in procs.imap(_unit_worker, todo, chunksize=VIEWS_PER_BLOCK):
                    feed(records)
        feed([], last=True)
    finally:
        if bar:
            bar.close()
        if dropped_fh:
            dropped_fh.close()
    t_card = time.perf_counter()
    seconds_units = t_card - t_units
    sections = card_sections(writer, cfg, pool, relabel, dropped_total=len(_dropped_ids(out)),
                             drop_reasons=drop_reasons)
    writer.finish(sections, title="Loupe quality instruction data")
    seconds = time.perf_counter() - t0
    return {"written": written, "dropped": dropped, "seconds": seconds, "counts": writer.counts(),
            "setup_s": t_units - t0, "units_s": seconds_units, "card_s": time.perf_counter() - t_card,
            "samples_per_s": (written + dropped) / seconds_units if seconds_units > 0 else 0.0}


def card_sections(writer: DatasetWriter, cfg: BuildConfig, pool: Pool, relabel: Any, dropped_total: int,
                  drop_reasons: Counter) -> dict[str, Any]:
    """Counts per task, category, severity, rating and source, read back from the written files."""
    per_task: Counter = Counter()
    per_cat: Counter = Counter()
    per_fn: Counter = Counter()
    per_sev: Counter = Counter()
    per_rating: Counter = Counter()
    per_source: Counter = Counter()
    flags: Counter = Counter()
    photos: dict[str, set] = {s: set() for s in SPLITS}
    for split in SPLITS:
        for s in writer.samples(split):
            m = s.meta
            per_task[f"{s.task} ({m.get('detail')}, {'with' if m.get('reference') else 'no'} reference)"] += 1
            dists = m.get("distortions", []) + (m.get("distortions_B", []) if "better" in m else [])
            for d in dists:
                per_cat[d["category"]] += 1
                per_fn[d["name"]] += 1
                per_sev[SEVERITIES.terms[d["severity"] - 1].id] += 1
            per_rating[m.get("rating")] += 1
            per_source[m.get("source", "?").split(":")[0] + (":" + m["source"].split(":")[1]
                                                               if m.get("source", "").startswith("procedural") else "")] += 1
            photos[split].add(m.get("source_photo"))
            flags["clean image (A)" if not m.get("distortions") else
                  ("two distortions (A)" if len(m["distortions"]) > 1 else "one distortion (A)")] += 1
            if "better" in m:
                flags[f"A/B pairs where {m['better']} is better"] += 1
    overlap = set.intersection(*[p for p in photos.values() if p]) if all(photos.values()) else set()
    sources = {k: dict(v, **{"samples": per_source.get(k, 0)}) for k, v in pool.described.items()}
    labeller = {"labeller": relabel.name if relabel else TemplateLabeller.name}
    if relabel is not None:
        labeller.update(relabel.stats())
        labeller["dropped (all runs)"] = dropped_total
        labeller.update({f"dropped: {k}": v for k, v in drop_reasons.items()})
    return {
        "Recipe": (f"seed {cfg.seed}; views {cfg.image_size}x{cfg.image_size} px (PNG); clean rate {cfg.clean_rate}, "
                   f"two-distortion rate {cfg.multi_rate}, reference rate {cfg.reference_rate}; split fractions "
                   f"{cfg.fractions} by source photo; tasks {', '.join(cfg.tasks)}. Rating rule: effective severity "
                   f"= worst severity, +1 if a second one is obvious or worse; 0 excellent, 1 good, 2 fair, 3 poor, "
                   f"4 poor, 5 bad. Every text was read back with prompts.parsing and matches its ground truth."),
        "Samples per task": dict(sorted(per_task.items())),
        "Distortions per category": {c: per_cat.get(c, 0) for c in sorted(per_cat)},
        "Distortions per function": {d.id: per_fn.get(d.id, 0) for d in DISTORTIONS},
        "Distortions per severity": {s.id: per_sev.get(s.id, 0) for s in SEVERITIES},
        "Ratings (image A)": dict(sorted(per_rating.items(), key=lambda kv: str(kv[0]))),
        "Image kinds and A/B balance": dict(sorted(flags.items())),
        "Sources (pool size and samples drawn)": sources,
        "Source photos per split": {s: len(photos[s]) for s in SPLITS} | {"shared by all splits": len(overlap)},
        "Origins and licences": sorted({f"{s.source}: {s.origin} - {s.licence}" for parts in pool.parts.values()
                                        for srcs in parts.values() for s in srcs}),
        "Labeller": labeller,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="loupe build-data quality",
                                 description="Pristine images -> training, validation and test data for every "
                                             "quality task (identify, assess brief/detailed, rate, compare), "
                                             "with and without a reference. Re-running resumes.",
                                 epilog="Example: loupe build-data quality --out data/quality --n 100000 --workers 8")
    ap.add_argument("--out", required=True, help="dataset folder to write (resumed if it exists)")
    ap.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    ap.add_argument("--images", nargs="*", default=[], help="folders or globs of pristine images "
                    "(default: the built-in pool: registry photos, procedural scenes, Tux Paint stamp scenes)")
    ap.add_argument("--manifest", help="JSONL manifest of pristine images ({path, group, origin, licence})")
    ap.add_argument("--licence", default="unknown (user-supplied)", help="licence note of the --images folders, "
                    "kept in the dataset card")
    ap.add_argument("--tasks", nargs="*", default=["all"], help="tasks to build: identify, assess (brief and "
                    "detailed), assess_brief, assess_detailed, rate, compare, or quality.* ids (default all)")
    ap.add_argument("--labeller", choices=["template", "openai"], default="template")
    ap.add_argument("--base-url", help="OpenAI-compatible endpoint for --labeller openai")
    ap.add_argument("--model", default="gpt-4o", help="model name for --labeller openai")
    ap.add_argument("--concurrency", type=int, default=4, help="parallel requests for --labeller openai")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=448, help="view side in px (default 448)")
    ap.add_argument("--mix", default="photos=0.5,stamps=0.25,procedural=0.25",
                    help="share of built-in pool parts, e.g. photos=1 for photos only")
    ap.add_argument("--clean-rate", type=float, default=0.05)
    ap.add_argument("--multi-rate", type=float, default=0.3)
    ap.add_argument("--reference-rate", type=float, default=0.4)
    ap.add_argument("--overwrite", action="store_true", help="delete an existing dataset in --out first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.image_size < 224:
        log.warning("--image-size %d: distortion ladders are calibrated from 224 px up; below that, blur, "
                    "jitter and sharpening are relatively stronger", args.image_size)
    tasks: list[str] = []
    for t in args.tasks:
        if t == "all":
            tasks += list(TASK_KEYS)
        elif t in TASK_ALIASES:
            tasks += TASK_ALIASES[t]
        else:
            ap.error(f"--tasks: unknown task {t!r}; choose from {', '.join(sorted(TASK_ALIASES))}")
    try:
        mix = {k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(",") if kv)}
    except ValueError:
        ap.error(f"--mix: expected name=weight pairs separated by commas, got {args.mix!r}")
    try:
        cfg = BuildConfig(out=args.out, n=args.n, seed=args.seed, image_size=args.image_size,
                          tasks=list(dict.fromkeys(tasks)), images=args.images, manifest=args.manifest,
                          licence=args.licence, mix=mix,
                          clean_rate=args.clean_rate, multi_rate=args.multi_rate,
                          reference_rate=args.reference_rate, workers=args.workers, labeller=args.labeller,
                          base_url=args.base_url, model=args.model, max_concurrency=args.concurrency,
                          overwrite=args.overwrite)
        summary = build(cfg, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loupe build-data quality: {exc}", file=sys.stderr)
        return 2
    c = summary["counts"]
    print(f"wrote {summary['written']} samples in {summary['seconds']:.1f} s ({summary['samples_per_s']:.1f} "
          f"samples/s while building; setup {summary['setup_s']:.1f} s, card {summary['card_s']:.1f} s); "
          f"dataset now train {c['train']}, val {c['val']}, "
          f"test {c['test']}; dropped {summary['dropped']}; card: {Path(args.out) / 'card.md'}")
    return 0
