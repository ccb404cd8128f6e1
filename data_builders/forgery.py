"""``loupe build-data forgery``: tamper synthesis -> ``forgery.detect`` instruction data with masks.

For each sample index the builder draws (deterministically from ``--seed`` and the index) a
pristine view of a source photo, and either leaves it authentic (about half the data) or forges it
with one of the manipulations of ``data_builders.tamper``. The same global post-processing
(JPEG, resize, blur, noise) is drawn for both. The answer is worded from the ground truth by the
template labeller (``data_builders.forgery_text``) or by an OpenAI-compatible model whose reply is
kept only when it agrees with the facts.

Splits are by source photo: ``sources.split_by_source`` assigns whole photo groups to
train/val/test, and a sample's target *and* donor photos (and object cut-outs) come from its own
split's pool, so no photo content crosses splits.

Output: a dataset folder (DESIGN.md) with ``images/f-XXXXXX.png``, one ``masks/f-XXXXXX-K.png``
per region (0/255, the image's size), ``{train,val,test}.jsonl`` and ``card.md``. Runs resume.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import multiprocessing as mp
import os
import random
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from loupe_vlm.prompts import (MANIPULATION_DOMAIN, MANIPULATIONS, MASK_TOKEN, Sample, image_roles_for, training_question,
                     user_content)
from loupe_vlm.prompts.parsing import count_mask_tokens, parse_locations, parse_manipulation, parse_verdict

from . import forgery_text
from . import tamper as T
from .sources import (SPLITS, SourceImage, builtin_pool, encode_png, from_folders, load_rgba, random_view,
                      split_by_source, tuxpaint_stamps)

log = logging.getLogger(__name__)

TASK = "forgery.detect"
SYNTH_MANIPULATIONS = ("splice", "copy_move", "removal", "aigc_edit")  # face_swap: omitted, see the card
# The forgery pool leaves out the quality builder's stamp scenes: they are composites, and calling
# them authentic would contradict the object splices. Procedural scenes are capped (each costs
# ~0.1 s to render) and cached per process.
DEFAULT_POOL = ("photos", "procedural")
DEFAULT_PROCEDURAL = 48
P_OBJECT_SPLICE = 0.4  # share of splices that paste a real object cut-out (when stamps exist)
P_TWO_REGIONS = 0.25  # share of splices and removals with two regions
P_DETAILED = 0.5
P_PROCEDURAL = 0.3  # at most this share of targets and donors are procedural scenes when photos exist

AIGC_CARD_NOTE = (
    "`aigc_edit` here is an imitation of generative inpainting's *low-level traces*, made without any "
    "generative model: a region's content is either regenerated through a lossy down/up-sampling "
    "\"decoder\" with edge-preserving smoothing, or inpainted away and given synthetic 1/f texture; then it "
    "gets new, spatially correlated grain with a different spectrum and a slight colour shift, and is "
    "blended in with a soft inner seam. It imitates the noise/texture and sharpness mismatch and the soft "
    "seam of tools such as Stable Diffusion inpainting. It does **not** imitate their semantics (no new "
    "objects or plausible scene content are imagined), the spectral fingerprints of real VAE decoders or "
    "diffusion upsamplers, or whole-image regeneration; a model trained on it should be checked on real "
    "AIGC-edited sets (e.g. FakeShield's AIGC-Editing) before any claim is made.")
FACE_SWAP_NOTE = ("`face_swap` is **omitted**: the built-in pool has no face photos or face detector to "
                  "make honest face swaps from. Import a deepfake set to cover it.")


# ---- configuration -------------------------------------------------------------------------------

@dataclass
class BuildConfig:
    """Settings of one forgery build (the CLI maps onto these fields)."""

    out: Path
    """Dataset folder to write (resumed when it holds a build with the same seed and labeller)."""
    n: int
    """Number of samples (authentic + tampered)."""
    images: list[str] = field(default_factory=list)
    """Folders/globs of pristine photos; empty: the built-in pool."""
    manipulations: tuple[str, ...] = SYNTH_MANIPULATIONS
    """Manipulations to synthesise, drawn uniformly."""
    post: tuple[str, ...] = T.POST_OPS
    """Global post-processing operations to draw from (empty: none)."""
    labeller: str = "template"
    """``template`` (offline) or ``openai``."""
    seed: int = 0
    size: int = 512
    """Side of the square views, in pixels."""
    authentic: float = 0.5
    """Share of authentic images."""
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    workers: int = 1
    overwrite: bool = False
    procedural: int = DEFAULT_PROCEDURAL
    """How many procedural scenes join the built-in photos (0: photos only)."""
    stamps: bool = True
    """Use Tux Paint cut-outs for object splices (skipped when the package is absent)."""
    openai_model: str = "gpt-4o-mini"
    openai_base_url: str | None = None
    openai_workers: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.n < 1:
            problems.append(f"--n must be >= 1 (got {self.n})")
        bad = [m for m in self.manipulations if m not in SYNTH_MANIPULATIONS]
        if bad:
            hint = " (face_swap is not synthesised; see the card)" if "face_swap" in bad else ""
            problems.append(f"--manipulations: unknown {bad}; choose from {', '.join(SYNTH_MANIPULATIONS)}{hint}")
        if not self.manipulations and self.authentic < 1:
            problems.append("--manipulations is empty but --authentic < 1")
        bad = [p for p in self.post if p not in T.POST_OPS]
        if bad:
            problems.append(f"--post: unknown {bad}; choose from {', '.join(T.POST_OPS)}")
        if self.labeller not in ("template", "openai"):
            problems.append(f"--labeller must be template or openai (got {self.labeller!r})")
        if not 0 <= self.authentic <= 1:
            problems.append(f"--authentic must be in [0, 1] (got {self.authentic})")
        if self.size < 64:
            problems.append(f"--size must be >= 64 (got {self.size})")
        if problems:
            raise ValueError("bad forgery build settings: " + "; ".join(problems))


# ---- per-process context -------------------------------------------------------------------------

@dataclass
class _Context:
    cfg: BuildConfig
    pools: dict[str, list[SourceImage]]
    stamps: dict[str, list[str]]
    split_of: list[str]
    unreadable: dict[str, str] = field(default_factory=dict)
    cache: "OrderedDict[str, np.ndarray]" = field(default_factory=OrderedDict)
    cache_size: int = 96

    def load(self, src: SourceImage) -> np.ndarray:
        img = self.cache.get(src.id)
        if img is None:
            img = src.load()
            # Views are at most the short side and then downscaled to cfg.size; keeping sources at
            # <= 2x that saves most of the cropping/resizing time without upscaling any view.
            short = min(img.shape[:2])
            if short > 2 * self.cfg.size:
                f = 2 * self.cfg.size / short
                img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
            self.cache[src.id] = img
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(src.id)
        return img

    def load_stamp(self, path: str) -> np.ndarray:
        key = "stamp:" + path
        img = self.cache.get(key)
        if img is None:
            img = load_rgba(path)
            self.cache[key] = img
            if len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return img


_CTX: _Context | None = None


def _stable_split(key: str, fractions: tuple[float, float, float], seed: int) -> str:
    """A split for ``key`` from a hash: stable whatever the order or number of other keys."""
    u = int(hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    total = sum(fractions)
    if u < fractions[0] / total:
        return "train"
    return "val" if u < (fractions[0] + fractions[1]) / total else "test"


def make_context(cfg: BuildConfig) -> _Context:
    """Sources split by photo group, stamps split by file, and each index's split."""
    unreadable: dict[str, str] = {}
    if cfg.images:
        sources = []
        for src in from_folders(cfg.images):
            # A header check up front (cheap) keeps bad files out of the pool, so they cannot fail
            # samples at random; a file that passes it but is truncated still fails only its samples.
            path = src.path or ""
            if os.path.getsize(path) == 0 or not (path.endswith(".gz") or cv2.haveImageReader(path)):
                unreadable[path] = "not an image OpenCV can read"
                log.warning("%s: not an image OpenCV can read; left out of the pool", path)
            else:
                sources.append(src)
        if not sources:
            raise ValueError(f"no readable images found under {cfg.images}; check --images")
    else:
        sources = builtin_pool(("photos",))
        if cfg.procedural > 0:
            procedural = builtin_pool(("procedural",))
            order = np.random.default_rng([cfg.seed, 7]).permutation(len(procedural))
            sources += [procedural[i] for i in sorted(order[:cfg.procedural])]
        if not sources:
            raise ValueError("the built-in pool is empty; install opencv-doc (make system-deps) or pass --images")
    pools = split_by_source(sources, cfg.fractions, cfg.seed)
    for split in SPLITS:
        if not pools[split]:  # a tiny folder: borrow so the split can exist (noted in the card)
            log.warning("no source photo for the %s split; it borrows the train photos", split)
            pools[split] = pools["train"] or sources
    stamps = {s: [] for s in SPLITS}
    if cfg.stamps:
        for p in tuxpaint_stamps():
            stamps[_stable_split(p, cfg.fractions, cfg.seed)].append(p)
    # Each index's split comes from a hash of (seed, index), not from n: a run resumed with a larger
    # --n keeps every sample it already wrote.
    split_of = [_stable_split(f"index:{i}", cfg.fractions, cfg.seed) for i in range(cfg.n)]
    return _Context(cfg, pools, stamps, split_of, unreadable)


def _init_worker(ctx: _Context) -> None:
    global _CTX
    _CTX = ctx
    cv2.setNumThreads(1)  # one core per worker; OpenCV's own threads would oversubscribe


# ---- one sample ----------------------------------------------------------------------------------

@dataclass
class Made:
    """One built sample before writing: the record, its encoded files and (for relabelling) the arrays."""

    split: str
    sample: Sample
    files: dict[str, bytes]
    image: np.ndarray | None = None
    masks: list[np.ndarray] | None = None
    error: str | None = None


def sample_id(index: int) -> str:
    return f"f-{index:06d}"


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _pick_source(rng: np.random.Generator, pool: Sequence[SourceImage]) -> SourceImage:
    """A source from ``pool``: real photos first, procedural scenes for at most ``P_PROCEDURAL`` of draws."""
    photos = [s for s in pool if not s.source.startswith("procedural")]
    scenes = [s for s in pool if s.source.startswith("procedural")]
    if photos and scenes:
        return _pick(rng, scenes if rng.random() < P_PROCEDURAL else photos)
    return _pick(rng, pool)


def _forge(ctx: _Context, split: str, img: np.ndarray, src: SourceImage, manip: str,
           rng: np.random.Generator) -> T.TamperResult:
    cfg = ctx.cfg
    pool = ctx.pools[split]
    if manip == "splice":
        stamps = ctx.stamps[split]
        if stamps and rng.random() < P_OBJECT_SPLICE:
            path = _pick(rng, stamps)
            res = T.splice_object(img, ctx.load_stamp(path), rng)
            res.params["donor"] = "stamp:" + Path(path).stem
            return res
        others = [s for s in pool if s.group != src.group] or pool
        donor_src = _pick_source(rng, others)
        donor = random_view(ctx.load(donor_src), rng, cfg.size)
        res = T.splice(img, donor, rng, regions=2 if rng.random() < P_TWO_REGIONS else 1)
        res.params["donor"] = donor_src.id
        return res
    if manip == "copy_move":
        return T.copy_move(img, rng)
    if manip == "removal":
        alpha = None
        stamps = ctx.stamps[split]
        if stamps and rng.random() < 0.25:  # object-shaped holes, as when an object is erased
            alpha = ctx.load_stamp(_pick(rng, stamps))[..., 3]
        return T.removal(img, rng, regions=2 if rng.random() < P_TWO_REGIONS else 1, object_alpha=alpha)
    if manip == "aigc_edit":
        return T.aigc_edit(img, rng)
    raise ValueError(f"unknown manipulation {manip!r}")


def build_one(ctx: _Context, index: int, keep_arrays: bool = False) -> Made:
    """Build sample ``index`` (deterministic given the seed and the index)."""
    cfg = ctx.cfg
    sid = sample_id(index)
    split = ctx.split_of[index]
    rng = np.random.default_rng([cfg.seed, index])
    text_rng = random.Random(f"{cfg.seed}:{index}")
    src = _pick_source(rng, ctx.pools[split])
    img = random_view(ctx.load(src), rng, cfg.size)
    tampered = bool(cfg.manipulations) and rng.random() >= cfg.authentic
    result: T.TamperResult | None = None
    if tampered:
        manip = str(_pick(rng, cfg.manipulations))
        for _attempt in range(4):
            try:
                result = _forge(ctx, split, img, src, manip, rng)
                break
            except T.TamperError as exc:
                log.debug("%s: %s attempt failed: %s", sid, manip, exc)
        if result is None:
            raise T.TamperError(f"{sid}: {manip} failed 4 times on {src.id}")
        image, masks = result.image, result.masks
    else:
        image, masks = img, []
    image, masks, post = T.post_process(image, masks, rng, cfg.post)
    masks = [m for m in masks if m.any()]
    if tampered and not masks:
        raise T.TamperError(f"{sid}: the region vanished in post-processing")
    meta: dict[str, Any] = {
        "tampered": tampered,
        "manipulation": result.manipulation if result else None,
        "domain": MANIPULATION_DOMAIN[result.manipulation] if result else None,
        "regions": [forgery_text.region_facts(m) for m in masks],
        "cues": list(result.cues) if result else ["consistent"],
        "post": post,
        "source": src.id,
        "source_photo": src.group,
        "labeller": forgery_text.LABELLER_ID,
    }
    if result:
        meta["tamper"] = result.params
    detail = text_rng.random() < P_DETAILED
    meta["detail"] = "detailed" if detail else "brief"
    h, w = image.shape[:2]
    text = forgery_text.answer(meta, detail, text_rng, size=(w, h))
    question = training_question(TASK, detail, False, text_rng)
    image_rel = f"images/{sid}.png"
    mask_rels = [f"masks/{sid}-{k}.png" for k in range(len(masks))]
    roles = image_roles_for(TASK)
    sample = Sample(id=sid, task=TASK, images=[image_rel], image_roles=roles,
                    messages=[{"role": "user", "content": user_content(roles, question)},
                              {"role": "assistant", "content": [{"type": "text", "text": text}]}],
                    masks=mask_rels, meta=meta)
    files = {image_rel: encode_png(image)}
    files.update({rel: encode_mask_png(m) for rel, m in zip(mask_rels, masks)})
    return Made(split, sample, files, image if keep_arrays else None, masks if keep_arrays else None)


def encode_mask_png(mask: np.ndarray) -> bytes:
    """An 8-bit grey PNG of a 0/255 mask: no filter + run-length deflate (5x faster and 30x smaller than
    photo settings on binary masks; still an ordinary PNG for any reader)."""
    ok, buf = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER,
                                          cv2.IMWRITE_PNG_FILTER_NONE, cv2.IMWRITE_PNG_STRATEGY,
                                          cv2.IMWRITE_PNG_STRATEGY_RLE])
    if not ok:
        raise ValueError("OpenCV could not encode a mask as PNG")
    return buf.tobytes()


def _work(args: tuple[int, bool]) -> Made:
    index, keep = args
    assert _CTX is not None
    try:
        return build_one(_CTX, index, keep)
    except (T.TamperError, ValueError, OSError, cv2.error) as exc:
        # A bad source image or an unlucky draw: reported and counted, the run goes on.
        return Made("", Sample(sample_id(index), TASK, [], [], []), {}, error=f"{type(exc).__name__}: {exc}")


# ---- the OpenAI labeller -------------------------------------------------------------------------

def overlay(image: np.ndarray, masks: Sequence[np.ndarray], alpha: float = 0.35) -> np.ndarray:
    """The image with each mask tinted red and outlined (for labellers and contact sheets)."""
    out = image.copy()
    for m in masks:
        sel = m > 127
        out[sel] = (out[sel] * (1 - alpha) + np.array([255, 0, 0]) * alpha).astype(np.uint8)
        contours, _ = cv2.findContours(sel.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (255, 0, 0), max(1, image.shape[0] // 256))
    return out


def agrees(text: str, meta: dict[str, Any]) -> str | None:
    """Why a worded answer disagrees with the ground truth, or None when it agrees.

    Checks the verdict, the number of mask tokens, that every region's location is named, and that
    no other manipulation is named first.
    """
    verdict = "tampered" if meta.get("tampered") else "authentic"
    if parse_verdict(text) != verdict:
        return f"verdict: {parse_verdict(text)!r} != {verdict!r}"
    n = len(meta.get("regions") or [])
    if count_mask_tokens(text) != n:
        return f"mask tokens: {count_mask_tokens(text)} for {n} region(s)"
    named = Counter(parse_locations(text))
    want = Counter(r["location"] for r in meta.get("regions") or [])
    missing = want - named
    if missing:
        return f"locations: not named {sorted(missing)}"
    manip = parse_manipulation(text)
    if manip is not None and manip != meta.get("manipulation"):
        return f"manipulation: {manip!r} != {meta.get('manipulation')!r}"
    return None


class ForgeryOpenAILabeller:
    """Words forgery facts through an OpenAI-compatible model; keeps only replies that agree with them."""

    def __init__(self, client: Any, attempts: int = 2):
        self.client = client
        self.attempts = attempts
        self.accepted = 0
        self.rejected: Counter = Counter()
        self.fallbacks = 0

    @property
    def id(self) -> str:
        from loupe_vlm.prompts.forgery_labeller import FORGERY_LABELLER_VERSION
        return f"openai:{self.client.model}@{FORGERY_LABELLER_VERSION}"

    def messages(self, made: Made) -> list[dict[str, Any]]:
        from loupe_vlm.prompts import forgery_labeller as P

        from .labellers.openai_client import image_part
        meta = made.sample.meta
        post = ", ".join(f"{p['op']}" + (f" (quality {p['quality']})" if p["op"] == "jpeg" else "")
                         for p in meta["post"]) or "none"
        style = P.DETAILED_STYLE if meta.get("detail") == "detailed" else P.BRIEF_STYLE
        system = P.SYSTEM_PROMPT.format(mask_token=MASK_TOKEN, style=style)
        if meta["tampered"]:
            from loupe_vlm.prompts import CUES, DOMAINS, LOCATIONS
            regions = "\n".join(P.FACTS_REGION.format(index=i + 1, location=LOCATIONS[r["location"]].text,
                                                      area=max(1, round(100 * r["area"])))
                                for i, r in enumerate(meta["regions"]))
            facts = P.FACTS_TAMPERED.format(
                manipulation=MANIPULATIONS[meta["manipulation"]].text, domain=DOMAINS[meta["domain"]].text,
                regions=regions, cues="; ".join(CUES[c].text for c in meta["cues"]) or "not recorded", post=post)
        else:
            facts = P.FACTS_AUTHENTIC.format(post=post)
        assert made.image is not None and made.masks is not None
        return [{"role": "system", "content": system},
                {"role": "user", "content": [image_part(overlay(made.image, made.masks)),
                                             {"type": "text", "text": facts}]}]

    def relabel(self, made: Made) -> Made:
        """Replace the template answer with the model's when it agrees; else keep the template one."""
        msgs = self.messages(made)
        for variant in range(self.attempts):
            text = self.client.complete(msgs, variant=variant).strip()
            why = agrees(text, made.sample.meta)
            if why is None:
                made.sample.messages[-1]["content"][0]["text"] = text
                made.sample.meta["labeller"] = self.id
                self.accepted += 1
                return made
            key = why.split(":")[0]
            self.rejected[key] += 1
            made.sample.meta.setdefault("labeller_rejected", []).append(key)
            log.debug("%s: reply rejected (%s): %r", made.sample.id, why, text)
        self.fallbacks += 1
        return made


# ---- the build -----------------------------------------------------------------------------------

def _iter_made(ctx: _Context, todo: list[int], keep: bool) -> Iterator[Made]:
    cfg = ctx.cfg
    if cfg.workers <= 1:
        _init_worker(ctx)
        for i in todo:
            yield _work((i, keep))
        return
    mpctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with mpctx.Pool(cfg.workers, initializer=_init_worker, initargs=(ctx,)) as pool:
        yield from pool.imap(_work, [(i, keep) for i in todo], chunksize=4)


def build(cfg: BuildConfig) -> dict[str, Any]:
    """Build (or resume) the dataset; returns a summary (counts, rate, failures, card path)."""
    from .writer import DatasetWriter

    t0 = time.perf_counter()
    ctx = make_context(cfg)
    labeller = None
    labeller_id = forgery_text.LABELLER_ID
    if cfg.labeller == "openai":
        from .labellers.openai_client import OpenAILabeller
        client = OpenAILabeller(cfg.openai_base_url, cfg.openai_model, cache_dir=Path(cfg.out) / ".labeller_cache",
                                max_workers=cfg.openai_workers, seed=cfg.seed)
        labeller = ForgeryOpenAILabeller(client)
        labeller_id = labeller.id
    writer = DatasetWriter(cfg.out, builder="forgery", seed=cfg.seed, labeller=labeller_id, overwrite=cfg.overwrite)
    done = writer.done_ids()
    todo = [i for i in range(cfg.n) if sample_id(i) not in done]
    failures: list[str] = []
    batch: list[Made] = []

    def flush() -> None:
        if labeller is not None and batch:
            results = labeller.client.map(batch, labeller.relabel)
            for made, res in zip(batch, results):
                if isinstance(res, Exception):
                    log.warning("%s: labeller failed (%s); keeping the template answer", made.sample.id, res)
                    labeller.fallbacks += 1
        for made in batch:
            writer.write(made.split, made.sample, {k: v for k, v in made.files.items() if k.startswith("images/")},
                         {k: v for k, v in made.files.items() if k.startswith("masks/")})
        batch.clear()

    with tqdm(total=len(todo), desc="forgery", unit="sample", disable=None) as bar:
        for made in _iter_made(ctx, todo, keep=labeller is not None):
            bar.update(1)
            if made.error:
                failures.append(f"{made.sample.id}: {made.error}")
                log.warning("%s", failures[-1])
                continue
            batch.append(made)
            if len(batch) >= (32 if labeller else 1):
                flush()
        flush()
    seconds = time.perf_counter() - t0
    samples = [(split, s) for split in SPLITS for s in writer.samples(split)]
    card = writer.finish(card_sections(cfg, ctx, samples, failures, labeller), title="Loupe forgery dataset")
    return {"written": len(todo) - len(failures), "total": len(samples), "failures": failures,
            "seconds": seconds, "rate": (len(todo) - len(failures)) / max(seconds, 1e-9), "card": str(card)}


def card_sections(cfg: BuildConfig, ctx: _Context, samples: list[tuple[str, Sample]], failures: list[str],
                  labeller: ForgeryOpenAILabeller | None) -> dict[str, Any]:
    """The card's sections: counts per manipulation, domain, post-processing, shape/method, cues, sources."""
    by_manip: dict[str, Counter] = {}
    post, domains, shapes, cues, n_regions = Counter(), Counter(), Counter(), Counter(), Counter()
    photos_per_split = {s: len({x.group for x in ctx.pools[s]}) for s in SPLITS}
    for split, s in samples:
        m = s.meta
        key = m.get("manipulation") or "authentic"
        by_manip.setdefault(key, Counter())["samples"] += 1
        by_manip[key][split] += 1
        by_manip[key]["regions"] += len(m.get("regions") or [])
        domains[m.get("domain") or "none (authentic)"] += 1
        post.update(p["op"] for p in m.get("post") or [])
        if not m.get("post"):
            post["none"] += 1
        for r in (m.get("tamper") or {}).get("regions", []):
            shapes[f"{key}: {r.get('shape')}" + (f" / {r['method']}" if "method" in r else "")
                   + (f" / {r['mode']}" if "mode" in r else "")] += 1
        cues.update(m.get("cues") or [])
        if m.get("tampered"):
            n_regions[len(m.get("regions") or [])] += 1
    total = max(len(samples), 1)
    pool = "folders " + ", ".join(cfg.images) if cfg.images else "built-in " + "+".join(DEFAULT_POOL)
    manip_table = {k: {"samples": v["samples"], "share": f"{100 * v['samples'] / total:.1f}%",
                       "regions": v["regions"], **{sp: v[sp] for sp in SPLITS}} for k, v in sorted(by_manip.items())}
    sections: dict[str, Any] = {
        "Task": f"`{TASK}`: the answer opens with the verdict, then the manipulation, each region's location "
                f"(3x3 grid), area and box followed by its own `{MASK_TOKEN}`, then the evidence. Masks are binary "
                "PNGs (255 = changed) at the image's size, one per region, in token order. Authentic answers give "
                "reasons and hold no mask token.",
        "Samples per manipulation": manip_table,
        "Samples per domain": dict(domains),
        "Post-processing operations (whole image, authentic images too)": dict(post),
        "Tampered samples per region count": {f"{k} region(s)": v for k, v in sorted(n_regions.items())},
        "Shapes and methods": dict(sorted(shapes.items())),
        "Cues stated as evidence": dict(cues),
        "Sources": [f"pool: {pool}"
                    + (f" ({cfg.procedural} procedural scenes)" if not cfg.images else ""),
                    f"photo groups per split: {photos_per_split} (target, donor and cut-outs of a sample all come "
                    "from its split)",
                    f"object cut-outs (Tux Paint stamps) per split: { {s: len(v) for s, v in ctx.stamps.items()} }",
                    f"view size: {cfg.size} px; authentic share asked: {cfg.authentic}"],
        "Origins and licences": sorted({f"{s.source}: {s.origin} - {s.licence}" for srcs in ctx.pools.values()
                                        for s in srcs}),
        "What the synthesis imitates": [
            "splice: donor regions (blobs, polygons, regions cut along strong edges or colour segments) and real "
            "object cut-outs with their exact alpha; colour matching or illumination change; hard, feathered or "
            "Poisson borders; donor blur/noise/JPEG history",
            "copy_move: translation, scale, rotation and flip within the photo (the mask marks the pasted copy)",
            "removal: OpenCV Telea / Navier-Stokes inpainting and a patch-based fill",
            AIGC_CARD_NOTE, FACE_SWAP_NOTE],
        "Unreadable source images (left out)": [f"{p}: {r}" for p, r in sorted(ctx.unreadable.items())] or "none",
        "Example answers": [f"`{s.id}` ({s.meta.get('manipulation') or 'authentic'}, {s.meta.get('detail')}): "
                            f"{s.answer()}" for s in _examples(samples)],
        "Build failures": failures[:50] + ([f"... and {len(failures) - 50} more"] if len(failures) > 50 else [])
        if failures else "none",
    }
    if labeller is not None:
        # Counted from the records, so a resumed build reports all of its samples.
        rejected = Counter(r for _, s in samples for r in s.meta.get("labeller_rejected", []))
        sections["OpenAI labeller"] = {
            "answers kept from the model": sum(1 for _, s in samples if s.meta["labeller"].startswith("openai:")),
            "template answers (every reply disagreed, or the request failed)":
                sum(1 for _, s in samples if not s.meta["labeller"].startswith("openai:")),
            **{f"rejected replies ({k} disagreed)": v for k, v in sorted(rejected.items())},
            **{f"this run: {k}": v for k, v in labeller.client.stats.as_dict().items()}}
    return sections


def _examples(samples: list[tuple[str, Sample]]) -> list[Sample]:
    """The first brief and the first detailed answer of each kind (for the card)."""
    seen: dict[tuple[str, str], Sample] = {}
    for _, s in samples:
        key = (s.meta.get("manipulation") or "authentic", str(s.meta.get("detail")))
        seen.setdefault(key, s)
    return [seen[k] for k in sorted(seen)]


# ---- contact sheet -------------------------------------------------------------------------------

def forgery_contact_sheet(dataset: str | Path, out_png: str | Path, n: int = 24, cols: int = 6,
                          thumb: int = 192, split: str | None = None, seed: int = 0) -> Path:
    """A PNG grid of dataset examples with their masks tinted red and a caption (manipulation, regions).

    Picks up to ``n`` samples, tampered ones of each manipulation first, then authentic ones.
    """
    from loupe_vlm.prompts import load_jsonl
    from .sources import load_rgb, save_png

    dataset = Path(dataset)
    samples: list[Sample] = []
    for sp in ([split] if split else SPLITS):
        path = dataset / f"{sp}.jsonl"
        if path.is_file():
            samples += load_jsonl(path)
    if not samples:
        raise FileNotFoundError(f"{dataset}: no samples found; build one with `loupe build-data forgery`")
    rng = random.Random(seed)
    rng.shuffle(samples)
    groups: dict[str, list[Sample]] = {}
    for s in samples:
        groups.setdefault(s.meta.get("manipulation") or "authentic", []).append(s)
    picked: list[Sample] = []
    while len(picked) < n and any(groups.values()):  # round-robin over manipulations
        for key in sorted(groups):
            if groups[key] and len(picked) < n:
                picked.append(groups[key].pop())
    rows = (len(picked) + cols - 1) // cols
    cap = 34
    sheet = np.full((rows * (thumb + cap), cols * thumb, 3), 255, np.uint8)
    for k, s in enumerate(picked):
        img = load_rgb(dataset / s.images[0])
        masks = [cv2.imread(str(dataset / p), cv2.IMREAD_GRAYSCALE) for p in s.masks]
        vis = overlay(img, [m for m in masks if m is not None])
        vis = cv2.resize(vis, (thumb, thumb), interpolation=cv2.INTER_AREA)
        r, c = divmod(k, cols)
        y, x = r * (thumb + cap), c * thumb
        sheet[y:y + thumb, x:x + thumb] = vis
        m = s.meta
        line1 = m.get("manipulation") or "authentic"
        line2 = ", ".join(reg["location"] for reg in m.get("regions") or []) or \
            ("+".join(p["op"] for p in m.get("post") or []) or "no post")
        for j, line in enumerate((line1, line2)):
            cv2.putText(sheet, line[:28], (x + 4, y + thumb + 13 + 15 * j), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                        (0, 0, 0), 1, cv2.LINE_AA)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    save_png(out_png, sheet)
    return out_png


# ---- CLI -----------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe build-data forgery",
        description="Synthesise forgery.detect instruction data: splice, copy-move, removal and AIGC-edit-like "
                    "tampering of pristine photos (about half left authentic), exact masks, answers worded "
                    "from the ground truth.",
        epilog="Example: loupe build-data forgery --out data/forgery --n 1000 --workers 2 "
               "--contact-sheet data/forgery/sheet.png")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write or resume")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--images", nargs="+", default=[], metavar="DIR",
                   help="folders or globs of pristine photos (default: the built-in pool)")
    p.add_argument("--manipulations", nargs="+", default=list(SYNTH_MANIPULATIONS),
                   help=f"manipulations to synthesise (default: {' '.join(SYNTH_MANIPULATIONS)})")
    p.add_argument("--post", nargs="*", default=list(T.POST_OPS),
                   help=f"global post-processing to draw from; give none for no post-processing "
                        f"(default: {' '.join(T.POST_OPS)})")
    p.add_argument("--labeller", choices=("template", "openai"), default="template",
                   help="template (offline) or openai (an OpenAI-compatible endpoint; OPENAI_API_KEY)")
    p.add_argument("--openai-model", default="gpt-4o-mini", help="model for --labeller openai")
    p.add_argument("--openai-base-url", default=None, help="endpoint for --labeller openai (default: OpenAI's)")
    p.add_argument("--openai-workers", type=int, default=4, help="concurrent requests for --labeller openai")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same dataset)")
    p.add_argument("--size", type=int, default=512, help="side of the square images in pixels (default 512)")
    p.add_argument("--authentic", type=float, default=0.5, help="share of authentic images (default 0.5)")
    p.add_argument("--split", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="split fractions by source photo (default 0.8 0.1 0.1)")
    p.add_argument("--procedural", type=int, default=DEFAULT_PROCEDURAL,
                   help=f"procedural scenes added to the built-in photos (default {DEFAULT_PROCEDURAL})")
    p.add_argument("--no-stamps", action="store_true", help="no Tux Paint object cut-outs")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="remove an existing dataset in --out first")
    p.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                   help="also write a contact sheet of examples with mask overlays")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        cfg = BuildConfig(out=args.out, n=args.n, images=args.images, manipulations=tuple(args.manipulations),
                          post=tuple(args.post), labeller=args.labeller, seed=args.seed, size=args.size,
                          authentic=args.authentic, fractions=tuple(args.split), workers=args.workers,
                          overwrite=args.overwrite, procedural=args.procedural, stamps=not args.no_stamps,
                          openai_model=args.openai_model, openai_base_url=args.openai_base_url,
                          openai_workers=args.openai_workers)
        summary = build(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"loupe build-data forgery: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %d samples in %.1f s (%.1f samples/s); %d failed; card: %s", summary["written"],
             summary["seconds"], summary["rate"], len(summary["failures"]), summary["card"])
    if args.contact_sheet:
        path = forgery_contact_sheet(args.out, args.contact_sheet, seed=args.seed)
        log.info("contact sheet: %s", path)
    return 1 if summary["failures"] and summary["written"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
