"""The ``Assistant``: one-call analysis of images, with numbers read from token probabilities.

``Assistant.from_pretrained(path).assess(image)`` returns a typed ``Result`` carrying the fields of
DESIGN.md's result schema. Numbers are never parsed from digits and never invented:

* rating score: the expectation of 5..1 under the softmax over the five rating words, at the
  position where the answer writes its rating word (Q-Align's idea);
* P(tampered): softmax over {tampered, authentic} at the verdict position, or, in forgery answers of
  a model whose config sets ``verdict_map``, a logistic reading of its heads' tampering map, or of its
  forensic network's image-level logit where it ships one (``assistant/forensic.py``), with copy-move
  evidence (the answer then writes that verdict);
* P(A better): softmax over {A, B} at the verdict position, averaged over both orders of the pair;
* confidence: the mean probability of the answer's key tokens (verdict, rating, A/B, taxonomy words).

When the answer has no such position (e.g. no rating word), the number is ``None``.
Decoding is greedy. ``run`` is the batched core that ``loupe caption`` uses.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from loupe_vlm.prompts import (
    MANIPULATIONS,
    RATINGS,
    SEVERITIES,
    VERDICTS,
    DISTORTIONS,
    CATEGORIES,
    canonical_question,
    image_roles_for,
    rating_value,
    user_content,
)
from loupe_vlm.prompts.parsing import find_terms, parse_distortions, parse_manipulation, strip_mask_tokens

from . import duplication
from . import forensic as forensic_mod
from . import noreference as noreference_mod
from . import reference as reference_mod
from . import lm_precision as lm_precision_mod
from . import merged_cache
from .consistency import RatingProcessor, RepeatBan, VerdictProcessor, word_classes
from .guidance import COMPARE_TASKS, GUIDED_TASKS, EvidenceGuide, guidance_problem
from .modeling import ExplainableVLM, strength_verdict
from .processing import AUX_CATEGORIES, ImageError, LoupeProcessor, load_image, resize_logits

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "loupe-smol"
"""The embedded model every command uses without --model (``assistant/weights/<name>``, ``make <name>``)."""
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "weights" / DEFAULT_MODEL_NAME
MODEL_HELP = f"a Loupe checkpoint folder (default: the embedded {DEFAULT_MODEL_NAME})"
GUIDANCE_HELP = ("how strongly the image heads steer the distortion and severity words of identify and assess "
                 "answers and the A/B verdict of comparisons: 0 off, about 1-3 on (default: the model's own "
                 "setting)")

# Result schema "task" names for each template task.
SCHEMA_TASK = {"quality.assess": "quality", "quality.identify": "quality", "quality.rate": "compare",
               "quality.compare": "compare", "forgery.detect": "forgery", "chat": "chat"}


def default_model_path() -> Path:
    """The embedded default checkpoint (``DEFAULT_MODEL_NAME``); a clear error if it has not been built."""
    if not (DEFAULT_MODEL_DIR / "loupe_config.json").is_file():
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} is not in this checkout ({DEFAULT_MODEL_DIR}). Pass --model "
            f"PATH to a Loupe checkpoint, or build it with `make {DEFAULT_MODEL_NAME}`.")
    return DEFAULT_MODEL_DIR


VERDICT_TASKS = ("forgery.detect", "chat")
"""The tasks whose result reads P(tampered) at the answer's first verdict word."""

RATED_TASKS = ("quality.assess",)
"""Tasks whose answers close on a rating word (``consistency.RatingProcessor`` holds the end back until then)."""

REFERENCE_COMPARE_SLOPE = 4.0
"""A comparison with readings: P(A better) = sigmoid(REFERENCE_COMPARE_SLOPE * (quality of A - quality of B)),
both read against the reference image where one is given (``assistant/reference.py``), else from each image
alone (``assistant/noreference.py``), on the 1..5 scale: a quarter of a point reads as 0.73, one point as 0.98.
Set by hand, not fitted; on loupe-smol's quality validation split the readings name the better image of 97% of
the pairs with a reference and of the pairs without one."""

AB_PROBE_TOKENS = 12
"""How far the unguided first pass of a ``both_orders`` comparison writes: the builders' verdict sentences
name the image within their first six words ("The better one is image A.")."""

COPY_MOVE_NOTE = ("Part of the image also appears elsewhere in it ({pairs} matching keypoint pairs), a sign of "
                  "copy-move; the mask includes the copy.")
"""Added to a forgery answer judged tampered whose copy-move evidence counted (``assistant/duplication.py``):
the model's words do not know of it, and the mask has grown by the pasted copy. It names no verdict word
and no location, so the text still agrees with the result."""

NO_REPEAT_TOKENS = 4
"""A quality answer (identify, assess, compare, rate) never writes the same run of this many tokens twice
(``consistency.RepeatBan``); the comparisons' "… makes the picture look flat … makes the picture look
etched" was the commonest repeat."""


def checkpoint_id(path: Path, name: str) -> str:
    """A result's ``model``: the checkpoint's name and a digest of its config, heads, reading models
    (full-reference, no-reference) and forensic network where it has them (before any ``+fp16lm`` /
    ``+guidance`` suffix), so predictions say which weights and settings made them."""
    digest = hashlib.sha256()
    for f in ("loupe_config.json", "heads.safetensors"):
        digest.update((Path(path) / f).read_bytes())
    for f in (reference_mod.REFERENCE_FILE, noreference_mod.NOREFERENCE_FILE, forensic_mod.FORENSIC_FILE):
        if (Path(path) / f).is_file():
            digest.update((Path(path) / f).read_bytes())
    return f"{name}@{digest.hexdigest()[:10]}"


def temper(p: float, temperature: float) -> float:
    """``sigmoid(logit(p) / temperature)``: temperature scaling of a two-way probability. It keeps which
    side of 0.5 ``p`` is on, so a verdict read as P >= 0.5 never changes; T > 1 moves p towards 0.5."""
    if temperature == 1.0:
        return p
    p = min(max(p, 1e-12), 1 - 1e-12)
    return 1.0 / (1.0 + math.exp(-math.log(p / (1 - p)) / temperature))


def merge_lora(vlm: Any) -> Any:
    """``merge_and_unload`` of a peft LoRA model, its weights copied out of the safetensors file first.

    The base's weights are views of its memory-mapped safetensors file, and peft adds the update in place,
    so every 4 KiB page is copied on its first write, one page fault at a time: loupe-smol's merge took
    1.35 s so, and 0.41 s with a clone first, which copies each matrix in one go. The sums, hence the bits,
    are the same (``tests/assistant/test_inference.py``). Every
    parameter is cloned, not only the LoRA targets, so no tensor is left on the file's mapping and its
    pages are let go. ``.data`` is replaced on the same Parameter, so a tied embedding stays tied.
    Quantised weights (not floating point) are left as they are.
    """
    seen: set[int] = set()
    for param in vlm.parameters():  # each Parameter object once (a tied one is yielded once)
        if param.dtype.is_floating_point and param.device.type == "cpu" and id(param) not in seen:
            seen.add(id(param))
            param.data = param.data.clone()
    return vlm.merge_and_unload()


@dataclass
class Request:
    """One analysis to run: a template task (or "chat") over images in role order."""

    task: str
    images: list[Any]
    roles: list[str]
    question: str | None = None
    detail: bool = False
    id: str | None = None
    messages: list[dict] | None = None  # for "chat": prior turns (content parts, images as {"type": "image"})
    names: list[str] | None = None  # how images are named in the result (paths)


@dataclass
class Quality:
    rating: str | None
    score: float | None  # 1 (bad) .. 5 (excellent); expectation over the rating words
    distortions: list[dict]
    rating_probabilities: dict[str, float] | None = None


@dataclass
class Comparison:
    better: str | None  # "A" or "B"
    probability: float | None  # P(better is better), both orders averaged
    p_a: float | None = None  # P(A better) as asked
    p_a_swapped: float | None = None  # P(A better) from the swapped pair
    consistent: bool | None = None  # both orders agree


@dataclass
class Forgery:
    tampered: bool | None
    probability: float | None  # P(tampered)
    manipulation: str | None
    area: float | None  # fraction of the image in the mask
    mask: np.ndarray | None = field(default=None, repr=False)  # bool HxW at the image's size
    regions: int = 0
    # float HxW in [0, 1]: max over regions of P(pixel manipulated); ``mask`` is this > 0.5.
    # Kept so evaluation can report threshold-free / best-threshold localisation figures.
    mask_probability: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Result:
    """One answer. ``to_record()`` gives DESIGN.md's result schema."""

    task: str
    images: list[str]
    text: str = ""
    raw_text: str = ""
    reference: str | None = None
    confidence: float | None = None
    quality: Quality | None = None
    comparison: Comparison | None = None
    forgery: Forgery | None = None
    error: dict[str, str] | None = None
    model: str | None = None
    seconds: float | None = None
    id: str | None = None

    def to_record(self, mask_path: str | None = None) -> dict[str, Any]:
        """The JSON-serialisable record; ``mask_path`` is where the caller saved the forgery mask."""
        rec: dict[str, Any] = {"id": self.id, "task": SCHEMA_TASK.get(self.task, self.task), "images": self.images,
                               "reference": self.reference, "text": None, "confidence": None, "quality": None,
                               "comparison": None, "forgery": None, "error": self.error, "model": self.model,
                               "seconds": None if self.seconds is None else round(self.seconds, 4)}
        if self.error is not None:
            return rec
        rec["text"] = self.text
        rec["confidence"] = _r(self.confidence)
        if self.quality is not None:
            q = self.quality
            rec["quality"] = {"rating": q.rating, "score": _r(q.score), "distortions": q.distortions}
        if self.comparison is not None:
            c = self.comparison
            rec["comparison"] = {"better": c.better, "probability": _r(c.probability), "p_a": _r(c.p_a),
                                 "p_a_swapped": _r(c.p_a_swapped), "consistent": c.consistent}
        if self.forgery is not None:
            f = self.forgery
            rec["forgery"] = {"tampered": f.tampered, "probability": _r(f.probability), "mask": mask_path,
                              "manipulation": f.manipulation, "area": _r(f.area), "regions": f.regions}
        return rec


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 4)


def error_result(task: str, images: list[str], exc: BaseException, id: str | None = None,
                 model: str | None = None) -> Result:
    """A failed item: only ``error`` (type and message) is filled."""
    kind = getattr(exc, "kind", None) or type(exc).__name__
    return Result(task=task, images=images, error={"type": kind, "message": str(exc)}, id=id, model=model)


def _order_average(p1: float | None, p2: float | None) -> float | None:
    """P(A better) of a comparison from its readings in the order asked and swapped (already turned back to
    P(A better)): their mean, the one there is, or None."""
    ps = [p for p in (p1, p2) if p is not None]
    return sum(ps) / len(ps) if ps else None


def _written_p_a(probe: tuple[float | None, float | None] | None) -> float | None:
    """The P(A better) that a ``both_orders`` comparison's answer is guided by: 1 or 0, for the verdict of
    the two orders' average, so that asking with the pair either way names the same image."""
    if probe is None:
        return None
    return float(_order_average(*probe) >= 0.5)


def _given_readings(cues: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The guide's ``given`` readings (``ExplainableVLM.guide_processor``) of a batch from each row's full-reference
    ``ReferenceCue`` or None (NaN rows: the heads' readings stay)."""
    nan = float("nan")
    n_cat, n_rating = len(AUX_CATEGORIES), len(reference_mod.RATING_IDS)
    p_cat = torch.full((len(cues), n_cat), nan)
    level = torch.full((len(cues),), nan)
    p_rating = torch.full((len(cues), n_rating), nan)
    for b, c in enumerate(cues):
        if c is not None:
            p_cat[b] = torch.as_tensor(c.p_category, dtype=torch.float32)
            level[b] = c.severity
            p_rating[b] = torch.as_tensor(c.p_rating, dtype=torch.float32)
    return {"p_category": p_cat, "level": level, "p_rating": p_rating}


class _KeyWords:
    """First-token ids of the words whose probabilities we read, grouped by what they mean.

    Each key (e.g. "tampered") may have several phrasings ("tampered", "manipulated", "edited");
    P(key) at a position is the softmax over all the groups' ids, summed within the group. A first
    token shared by two groups is ambiguous and left out; the canonical words must stay distinct.
    """

    def __init__(self, tokenizer: Any, words: dict[str, Sequence[str]]):
        first: dict[str, list[int]] = {}
        for key, phrasings in words.items():
            ids = []
            for word in phrasings:
                enc = tokenizer.encode(" " + word, add_special_tokens=False)
                if enc:
                    ids.append(enc[0])
            first[key] = ids
        owners: dict[int, set[str]] = {}
        for key, ids in first.items():
            for i in ids:
                owners.setdefault(i, set()).add(key)
        self.groups = {key: sorted({i for i in ids if len(owners[i]) == 1}) for key, ids in first.items()}
        for key, ids in first.items():
            if not ids or ids[0] not in self.groups[key]:
                raise ValueError(f"the canonical word for {key!r} shares its first token with another of "
                                 f"{list(words)}; their probabilities cannot be told apart in this tokenizer")
        self.keys = list(self.groups)
        self.all_ids = [i for key in self.keys for i in self.groups[key]]
        self._id_set = set(self.all_ids)

    def first_position(self, tokens: list[int], last: bool = False) -> int | None:
        hits = [i for i, t in enumerate(tokens) if t in self._id_set]
        return (hits[-1] if last else hits[0]) if hits else None

    def probabilities(self, logits: torch.Tensor) -> dict[str, float]:
        """Softmax over these words' ids at one position's raw logits (V,), summed per key."""
        p = torch.softmax(logits[torch.tensor(self.all_ids, device=logits.device)].float(), dim=0)
        out, k = {}, 0
        for key in self.keys:
            n = len(self.groups[key])
            out[key] = float(p[k:k + n].sum())
            k += n
        return out


def _names(req: Request) -> list[str]:
    """How a request's images are named in its result: given names, else the paths."""
    return req.names or [str(x) if isinstance(x, (str, Path)) else "<image>" for x in req.images]


class _PieceStreamer:
    """A transformers generation streamer (``put``/``end``) that turns the new tokens of one answer into text
    pieces on a queue, decoding the whole answer so far and sending what it adds (mask tokens removed, held
    back while a multi-byte character is incomplete). transformers' ``TextIteratorStreamer`` decodes word by
    word and would show the mask token; this one follows the Assistant's own text exactly."""

    def __init__(self, tokenizer: Any, stop_ids: set[int], out: "queue.Queue[str | None]"):
        self.tokenizer, self.stop_ids, self.out = tokenizer, stop_ids, out
        self.tokens: list[int] = []
        self.sent = ""
        self.prompt_seen = False
        self.stopped = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate first puts the prompt
            self.prompt_seen = True
            return
        for t in value.flatten().tolist():
            if self.stopped or t in self.stop_ids:
                self.stopped = True
                return
            self.tokens.append(t)
        text = strip_mask_tokens(self.tokenizer.decode(self.tokens, skip_special_tokens=False))
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return
        if len(text) > len(self.sent):
            self.out.put(text[len(self.sent):])
            self.sent = text

    def end(self) -> None:
        pass


class Assistant:
    """Explainable image analysis with one model. Build it with ``Assistant.from_pretrained``."""

    def __init__(self, model: ExplainableVLM, processor: Any, name: str = "loupe", max_new_tokens: int = 160,
                 evidence_guidance: float | None = None, reference_model: Any = None, noreference_model: Any = None,
                 forensic: Any = None):
        self.model = model.eval()
        self.processor = LoupeProcessor.for_model(model, processor)
        self.tokenizer = self.processor.tokenizer
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.ratings = _KeyWords(self.tokenizer, {r.id: r.phrasings for r in RATINGS})
        self.verdicts = _KeyWords(self.tokenizer, {v.id: v.phrasings for v in VERDICTS})
        self.ab = _KeyWords(self.tokenizer, {"A": ["A"], "B": ["B"]})
        self.eos_ids = {i for i in (model.vlm.generation_config.eos_token_id, self.tokenizer.pad_token_id)
                        if isinstance(i, int)}
        self.evidence_guidance = (model.config.evidence_guidance if evidence_guidance is None
                                  else float(evidence_guidance))
        if (problem := guidance_problem(self.evidence_guidance)) is not None:
            raise ValueError(f"evidence guidance: {problem}")
        # a model without auxiliary heads has nothing to guide by: generate then leaves every row alone
        self.guide = EvidenceGuide(self.tokenizer, AUX_CATEGORIES) if self.evidence_guidance else None
        self._keep_forgery: list[int] | None = None  # _forgery_keep(), built on first use (~0.2 s)
        self._word_class: torch.Tensor | None = None  # _word_classes(), built on first use (~0.3 s)
        # full-reference readings (assistant/reference.py), used where a question gives a reference image, and
        # no-reference ones (assistant/noreference.py), used where it does not
        self.reference_model = reference_model
        self.noreference_model = noreference_model
        # the forensic network (assistant/forensic.py): where a checkpoint has one, forgery questions read their
        # tampering map (verdict, pasted copy, mask) from it instead of the auxiliary heads
        self.forensic = forensic

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, *, device: str = "cpu", dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False, max_new_tokens: int = 160,
                        evidence_guidance: float | None = None, lm_precision: str = "auto") -> "Assistant":
        """Load a Loupe checkpoint folder (``None``: the embedded default model, ``DEFAULT_MODEL_NAME``).
        ``evidence_guidance``: None keeps the checkpoint's own setting (see ``assistant/guidance.py``).
        ``lm_precision``: ``auto``, ``fp16`` or ``fp32`` (see ``assistant/lm_precision.py``)."""
        path = Path(path) if path is not None else default_model_path()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
        fp16_lm = lm_precision_mod.resolve(lm_precision, device)
        merged = merged_cache.cache_folder(path) if dtype is None else None
        model = None
        if merged_cache.is_complete(merged):
            try:
                model, processor = ExplainableVLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                  merged_base=merged)
                os.utime(merged)  # the newest-used copies are the ones kept
            except Exception as exc:  # a damaged copy: drop it and merge again, the answer does not need it
                logger.warning("the merged-model cache %s does not load (%s); it is rebuilt", merged, exc)
                shutil.rmtree(merged, ignore_errors=True)
        if model is None:
            model, processor = ExplainableVLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
        if hasattr(model.vlm, "peft_config"):
            # answering only: fold the LoRA update into the base weights (exact to ~3e-7), one matmul per layer
            model.vlm = merge_lora(model.vlm)
            if merged is not None and merged_cache.write(merged, model.vlm):  # later starts skip peft
                # answer from the copy, as every later start will: the same bits from the first answer on (a
                # float kernel's sums can differ, by ~1e-7, with where a matrix starts in memory)
                try:
                    model, processor = ExplainableVLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                                      merged_base=merged)
                except Exception as exc:  # the copy went meanwhile: ``model`` is still the merge in memory
                    logger.warning("the merged-model copy %s just written does not load (%s); answering from "
                                   "the merge in memory", merged, exc)
        model.to(device)
        if fp16_lm:  # none of them under a --dtype other than fp32: then the name does not say it either
            fp16_lm = lm_precision_mod.enable(model.vlm) > 0
        name = checkpoint_id(path, model.config.name)
        if fp16_lm:
            name += "+fp16lm"  # answers can differ from exact fp32 where two tokens were nearly tied
        if evidence_guidance is not None and evidence_guidance != model.config.evidence_guidance:
            name += f"+guidance{evidence_guidance:g}"  # answers differ from the checkpoint's own setting
        return cls(model, processor, name=name, max_new_tokens=max_new_tokens, evidence_guidance=evidence_guidance,
                   reference_model=reference_mod.load_reference_model(path),
                   noreference_model=noreference_mod.load_noreference_model(path),
                   forensic=forensic_mod.load_forensic_model(path))

    # ---- one-call API --------------------------------------------------------------------------
    def assess(self, image: Any, reference: Any = None, detail: bool = False) -> Result:
        """Quality of one image (optionally against a pristine reference): rating, score, distortions."""
        roles = image_roles_for("quality.assess", reference is not None)
        images = ([reference] if reference is not None else []) + [image]
        return self._one(Request("quality.assess", images, roles, detail=detail))

    def identify(self, image: Any, reference: Any = None) -> Result:
        """Name the distortions of one image."""
        roles = image_roles_for("quality.identify", reference is not None)
        images = ([reference] if reference is not None else []) + [image]
        return self._one(Request("quality.identify", images, roles))

    def compare(self, a: Any, b: Any, reference: Any = None, detail: bool = False) -> Result:
        """Which of A and B is better. Both orders are run; the probability averages them."""
        task = "quality.compare" if detail else "quality.rate"
        roles = image_roles_for(task, reference is not None)
        images = ([reference] if reference is not None else []) + [a, b]
        return self._one(Request(task, images, roles, detail=detail))

    def detect_forgery(self, image: Any, detail: bool = True) -> Result:
        """Tampered or not (with P(tampered)), where (a mask at the image's size) and why."""
        return self._one(Request("forgery.detect", [image], ["A"], detail=detail))

    def chat(self, messages: list[dict], images: Sequence[Any] = ()) -> Result:
        """Free-form chat: ``messages`` in the transformers shape with ``{"type": "image"}`` parts."""
        return self._one(Request("chat", list(images), ["A"] * len(images), messages=messages))

    def _one(self, request: Request) -> Result:
        errors: dict[int, BaseException] = {}
        result = self.run([request], errors=errors)[0]
        if errors:
            raise errors[0]
        return result

    # ---- batched core --------------------------------------------------------------------------
    def run(self, requests: list[Request], batch_size: int = 8,
            errors: dict[int, BaseException] | None = None) -> list[Result]:
        """Run many requests, ``batch_size`` generations at a time. A request whose images fail to
        load becomes an error ``Result`` (its exception also goes to ``errors`` by index); the others
        go on. ``seconds`` is the item's load time plus its share of its batches' time."""
        results: list[Result] = []
        jobs: list[tuple[int, int, Any]] = []  # (request index, order, encoded)
        for i, req in enumerate(requests):
            names = _names(req)
            t0 = time.perf_counter()
            try:
                encoded = self._encode_orders(req)
            except (ImageError, ValueError, OSError) as exc:
                if errors is not None:
                    errors[i] = exc
                results.append(error_result(req.task, names, exc, req.id, self.name))
                continue
            jobs += [(i, k, e) for k, e in enumerate(encoded)]
            results.append(Result(task=req.task, images=names, id=req.id, model=self.name,
                                  seconds=time.perf_counter() - t0))
        outputs: dict[tuple[int, int], dict] = {}
        probes = self._probe_orders([(i, k, e) for i, k, e in jobs if self._averages_orders(requests[i].task)],
                                    batch_size, results)
        # a probed comparison's result reads both orders from its probe: its swapped answer would go unused
        jobs = [(i, k, e) for i, k, e in jobs if k == 0 or i not in probes]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            t0 = time.perf_counter()
            tasks = [requests[i].task for i, _, _ in chunk]
            given = [_written_p_a(probes.get(i)) for i, _, _ in chunk]
            for (i, k, _), out in zip(chunk, self._generate([e for _, _, e in chunk], tasks=tasks, p_a=given)):
                outputs[(i, k)] = out
            share = (time.perf_counter() - t0) / len(chunk)
            for i, _, _ in chunk:
                results[i].seconds = (results[i].seconds or 0.0) + share
        for i, req in enumerate(requests):
            if results[i].error is None:
                t0 = time.perf_counter()
                self._fill(results[i], req, outputs[(i, 0)], outputs.get((i, 1)), probes.get(i))
                results[i].seconds = (results[i].seconds or 0.0) + time.perf_counter() - t0
        return results

    def _averages_orders(self, task: str) -> bool:
        """Whether this task's verdict is the LM's both-order average (``ab_verdict`` ``both_orders``, guided)."""
        return self.guide is not None and self.model.config.ab_verdict == "both_orders" and task in COMPARE_TASKS

    def _probe_orders(self, jobs: list[tuple[int, int, Any]], batch_size: int,
                      results: list[Result] | None = None) -> dict[int, tuple[float | None, float | None]]:
        """The LM's own P(A better) in each order of each comparison (request index -> (as asked, read from
        the swapped pair and turned back to P(A better))), from a short unguided pass that stops after
        ``AB_PROBE_TOKENS`` tokens. None where that pass wrote no "A" or "B"."""
        found: dict[int, list[float | None]] = {}
        # a pair with readings (assistant/reference.py, noreference.py) is decided by them, in both orders alike:
        # no LM pass
        for i, k, e in jobs:
            p = (e.readings or {}).get("p_a")
            if p is not None:
                found.setdefault(i, [None, None])[k] = p if k == 0 else 1.0 - p
        jobs = [(i, k, e) for i, k, e in jobs if (e.readings or {}).get("p_a") is None]
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start:start + batch_size]
            t0 = time.perf_counter()
            outs = self._generate([e for _, _, e in chunk], tasks=["probe"] * len(chunk),
                                  max_new_tokens=AB_PROBE_TOKENS)
            for (i, k, _), out in zip(chunk, outs):
                p = self._p_a(out["tokens"], out["logits"], None, None)
                found.setdefault(i, [None, None])[k] = p if k == 0 or p is None else 1.0 - p  # swapped A: the B
            if results is not None:
                share = (time.perf_counter() - t0) / len(chunk)
                for i, _, _ in chunk:
                    results[i].seconds = (results[i].seconds or 0.0) + share
        return {i: (v[0], v[1]) for i, v in found.items() if v[0] is not None or v[1] is not None}

    def _encode_orders(self, req: Request) -> list[Any]:
        """The request encoded as asked and, for a comparison, with A and B swapped (loads the images)."""
        pil = [load_image(x, self.processor.max_image_pixels) for x in req.images]
        orders = [pil]
        if req.task in ("quality.rate", "quality.compare"):
            swapped = list(pil)
            ia, ib = req.roles.index("A"), req.roles.index("B")
            swapped[ia], swapped[ib] = pil[ib], pil[ia]
            orders.append(swapped)
        encoded = [self._encode(req, imgs) for imgs in orders]
        readings = self._readings(req, pil, encoded[0])
        if readings is not None:
            for k, e in enumerate(encoded):
                e.readings = readings if k == 0 else {"cue": readings["cue"], "p_a": (
                    None if readings["p_a"] is None else 1.0 - readings["p_a"])}  # the swapped pair: B is shown as A
        if req.task == "forgery.detect" and self._weighs_duplicates():  # copy-move evidence of the judged image
            judged = encoded[0].mask_image
            encoded[0].duplicate = duplication.find_duplicate(np.asarray(pil[judged].convert("RGB")))
        if req.task == "forgery.detect" and self.forensic is not None:  # the forensic network's tampering map
            encoded[0].forensic = forensic_mod.forensic_maps(self.forensic, [pil[encoded[0].mask_image]])[0]
        return encoded

    def _readings(self, req: Request, pil: list[Any], encoded: Any) -> dict[str, Any] | None:
        """The readings that guide a quality question's answer, in the order asked: ``cue``, the judged image's
        ``ReferenceCue`` (describing tasks), and ``p_a``, a comparison's P(A better) from the two images' quality
        readings before clipping (``REFERENCE_COMPARE_SLOPE``). Read against the reference image where the
        question gives one (``assistant/reference.py``), else from the image alone and the heads' logits
        (``assistant/noreference.py``). None where the checkpoint has no such model or the question is not
        guided; a cue is None where an image is too small to read."""
        if req.task not in GUIDED_TASKS or self.guide is None:
            return None
        if "reference" in req.roles:
            if self.reference_model is None:
                return None
            ref = np.asarray(pil[req.roles.index("reference")].convert("RGB"))

            def read(idx: list[int]) -> dict[int, Any]:
                return {i: self.reference_model.judge(ref, np.asarray(pil[i].convert("RGB"))) for i in idx}
        else:
            if self.noreference_model is None:
                return None

            def read(idx: list[int]) -> dict[int, Any]:
                logits = noreference_mod.heads_logits(self.model, [encoded.lowlevel_pixels[i] for i in idx])
                return {i: self.noreference_model.judge(np.asarray(pil[i].convert("RGB")), row)
                        for i, row in zip(idx, logits)}

        compare = req.task in COMPARE_TASKS
        idx = ([req.roles.index("A"), req.roles.index("B")] if compare else
               [[i for i, r in enumerate(req.roles) if r != "reference"][-1]])
        try:
            cues = read(idx)
        except reference_mod.ReferenceError as exc:
            logger.info("no quality readings: %s", exc)
            return {"cue": None, "p_a": None}
        if compare:
            a, b = cues[idx[0]], cues[idx[1]]
            p_a = 1.0 / (1.0 + math.exp(-REFERENCE_COMPARE_SLOPE * (a.mos_raw - b.mos_raw)))
            return {"cue": None, "p_a": float(p_a)}
        return {"cue": cues[idx[0]], "p_a": None}

    def _weighs_duplicates(self) -> bool:
        """Whether forgery verdicts weigh copy-move evidence (a three-term ``LoupeConfig.verdict_map``)."""
        coef = self.model.config.verdict_map
        return coef is not None and len(coef) > 2

    def _encode(self, req: Request, images: list[Any]):
        if req.task == "chat":
            messages = req.messages or []
        else:
            question = req.question or canonical_question(req.task, req.detail, "reference" in req.roles)
            messages = [{"role": "user", "content": user_content(req.roles, question)}]
        non_ref = [j for j, r in enumerate(req.roles) if r != "reference"]
        return self.processor.encode(messages, images, train=False, mask_image=non_ref[0] if non_ref else 0)

    def stream(self, request: Request) -> Iterator[str | Result]:
        """Answer one request token by token: yields the answer's text in pieces as the model writes them
        (mask tokens left out), then the finished ``Result`` with its numbers and mask. The images are
        loaded and encoded before this returns, so a bad image raises here, not while iterating.

        A comparison runs its second (swapped) order after the first has streamed."""
        first, *swapped = self._encode_orders(request)
        return self._stream(request, first, swapped[0] if swapped else None, _names(request))

    def _stream(self, request: Request, first: Any, swapped: Any, names: list[str]) -> Iterator[str | Result]:
        t0 = time.perf_counter()
        pieces: queue.Queue = queue.Queue()
        done: dict[str, Any] = {}

        probe = None
        if swapped is not None and self._averages_orders(request.task):
            probe = self._probe_orders([(0, 0, first), (0, 1, swapped)], 2).get(0)

        def work() -> None:
            try:
                done["out"] = self._generate([first], streamer=_PieceStreamer(self.tokenizer, self.eos_ids, pieces),
                                             tasks=[request.task], p_a=[_written_p_a(probe)])[0]
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
                done["error"] = exc
            finally:
                pieces.put(None)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        streamed = ""
        while (piece := pieces.get()) is not None:
            streamed += piece
            yield piece
        thread.join()
        if "error" in done:
            raise done["error"]
        other = (self._generate([swapped], tasks=[request.task])[0]
                 if swapped is not None and probe is None else None)
        result = Result(task=request.task, images=names, id=request.id, model=self.name)
        self._fill(result, request, done["out"], other, probe)
        if result.text.startswith(streamed) and len(result.text) > len(streamed):
            yield result.text[len(streamed):]  # what the reading adds after the model's words (COPY_MOVE_NOTE)
        result.seconds = time.perf_counter() - t0
        yield result

    @torch.no_grad()
    def _generate(self, encoded: list[Any], streamer: Any = None, tasks: Sequence[str] = (),
                  p_a: Sequence[float | None] | None = None, max_new_tokens: int | None = None) -> list[dict]:
        """Greedy-generate for a batch; per row: tokens, per-step logits, mask probability maps. Rows
        whose task (``tasks``, per row) is in ``GUIDED_TASKS`` get evidence guidance, when it is on; rows in
        ``VERDICT_TASKS`` write the verdict their P(tampered) reports (``consistency``). ``p_a`` (per row,
        None for none): the P(A better) that guides a comparison row's verdict instead of the heads'."""
        batch = self.processor.collate(encoded, padding_side="left")
        extra: dict[str, Any] = {"streamer": streamer} if streamer is not None else {}
        if self.guide is not None and any(t in GUIDED_TASKS for t in tasks):
            extra["guide"] = self.guide
            extra["guide_strength"] = torch.tensor([self.evidence_guidance if t in GUIDED_TASKS else 0.0
                                                    for t in tasks])
            extra["guide_compare"] = torch.tensor([t in COMPARE_TASKS for t in tasks])
            # a comparison with a reference image is decided by the full-reference readings, unless given
            p_a = [p if p is not None else (e.readings or {}).get("p_a") if t in COMPARE_TASKS else None
                   for p, e, t in zip(p_a or [None] * len(encoded), encoded, tasks)]
            if any(p is not None for p in p_a):
                extra["guide_p_a"] = torch.tensor([float("nan") if p is None else float(p) for p in p_a])
            cues = [(e.readings or {}).get("cue") if t in GUIDED_TASKS else None for e, t in zip(encoded, tasks)]
            if any(c is not None for c in cues):
                extra["guide_given"] = _given_readings(cues)
        verdict_rows = torch.tensor([t in VERDICT_TASKS for t in tasks], dtype=torch.bool)
        # the forensic network's (tampering map, image-level logit), per forgery row that has them
        found = {b: e.forensic for b, (e, t) in enumerate(zip(encoded, tasks)) if t == "forgery.detect" and
                 e.forensic is not None}
        fmaps = {b: f[0] for b, f in found.items()}
        last: list[Any] = []
        p_map: list[float | None] = [None] * len(encoded)
        copies: list[np.ndarray | None] = [None] * len(encoded)
        if bool(verdict_rows.any()):  # the verdict word written is the one P(tampered) reports
            order = [self.verdicts.groups["tampered"]] + [g for k, g in self.verdicts.groups.items() if k != "tampered"]
            forced = None
            # the tampering map's verdict (LoupeConfig.verdict_map), for forgery questions only: in a chat the
            # first verdict-like word may be about something else ("the original image")
            if self.model.config.verdict_map is not None and "forgery.detect" in tasks:
                extra["low"] = self.model.encode_lowlevel(batch.get("lowlevel_pixels", []))
                dups = [e.duplicate if t == "forgery.detect" else None for e, t in zip(encoded, tasks)]
                p_map = [p if t == "forgery.detect" else None for p, t in
                         zip(self.model.map_verdicts(batch["input_ids"], batch, extra["low"],
                                                     [duplication.strength(d) for d in dups]), tasks)]
                for b, (_, logit) in found.items():  # where the forensic network ran, its image-level logit decides
                    p_map[b] = strength_verdict(logit, self.model.config.verdict_map, duplication.strength(dups[b]))
                forced = [None if p is None else (0 if p >= 0.5 else 1) for p in p_map]
                maps = {**self.model.tamper_maps(batch["input_ids"], batch, extra["low"]), **fmaps}
                copies = self._pasted_copies(encoded, dups, p_map, maps)
            last.append(VerdictProcessor(order, verdict_rows, forced))
        rating_rows = torch.tensor([t in RATED_TASKS for t in tasks], dtype=torch.bool)
        if bool(rating_rows.any()) and self.eos_ids:  # an assessment does not end before its rating word
            last.append(RatingProcessor(self.ratings.all_ids, sorted(self.eos_ids), rating_rows))
        quality_rows = torch.tensor([t in GUIDED_TASKS for t in tasks], dtype=torch.bool)
        if bool(quality_rows.any()):  # a quality answer says each thing once
            last.append(RepeatBan(NO_REPEAT_TOKENS, quality_rows, self.ratings.all_ids + self.ab.all_ids,
                                  word_class=self._word_classes()))
        forgery_rows = torch.tensor([t == "forgery.detect" for t in tasks], dtype=torch.bool)
        if bool(forgery_rows.any()):  # ... and so does a forgery answer, but for its coordinates and masks
            last.append(RepeatBan(NO_REPEAT_TOKENS, forgery_rows, self._forgery_keep()))
        if last:
            extra["last_processors"] = last
        gen = self.model.generate(batch, max_new_tokens=max_new_tokens or self.max_new_tokens, **extra)
        rows = []
        positions = []
        for b in range(len(encoded)):
            toks = gen["new_tokens"][b].tolist()
            end = next((t for t, x in enumerate(toks) if x in self.eos_ids), len(toks))
            toks = toks[:end]
            pos = [gen["prompt_len"] + t for t, x in enumerate(toks) if x == self.model.config.mask_token_id
                   and gen["prompt_len"] + t < gen["hidden"].shape[1]]
            positions.append(torch.tensor(pos, dtype=torch.long))
            rows.append({"tokens": toks, "logits": gen["logits"][b, :end], "masks": [], "p_map": p_map[b],
                         "copy": copies[b], "copy_pairs": None if copies[b] is None else encoded[b].duplicate.inliers})
        if any(p.numel() for p in positions):
            logits = self.model.decode_masks(gen["hidden"], batch["input_ids"].to(self.model.device), batch,
                                             gen["lowlevel"], positions)
            it = iter(logits)
            for b, pos in enumerate(positions):
                w, h = encoded[b].sizes[encoded[b].mask_image]
                for _ in range(pos.numel()):
                    rows[b]["masks"].append(torch.sigmoid(resize_logits(next(it), (h, w))).cpu().numpy())
        for b, fmap in fmaps.items():  # a forgery mask: the decoder's and the forensic network's, averaged
            if rows[b]["masks"]:
                w, h = encoded[b].sizes[encoded[b].mask_image]
                fprob = torch.sigmoid(resize_logits(fmap.float().cpu(), (h, w))).numpy()
                rows[b]["masks"] = [(m + fprob) / 2 for m in rows[b]["masks"]]
        return rows

    def _word_classes(self) -> torch.Tensor:
        """``consistency.word_classes`` of this tokenizer, built on first use: a quality answer's repeats are
        counted by word, as ``loupe eval`` counts them ("readable, but" and "readable but" are one run)."""
        if self._word_class is None:
            self._word_class = word_classes(self.tokenizer)
        return self._word_class

    def _forgery_keep(self) -> list[int]:
        """Tokens a forgery answer may repeat (``RepeatBan``'s ``keep``): digits, "%", spaces and punctuation,
        " to", " and", " across" and " down", which its coordinates repeat by design ("from 10% to 80% across
        and 10% to 90% down"), the mask token (one per region) and the verdict words."""
        if self._keep_forgery is None:
            tok = self.tokenizer
            words = {"to", "and", "across", "down"}
            keep = [i for i in range(len(tok))
                    if re.fullmatch(r"[\s\d%.,;:()]*", t := tok.decode([i])) or t.strip() in words]
            self._keep_forgery = keep + [self.model.config.mask_token_id] + self.verdicts.all_ids
        return self._keep_forgery

    @staticmethod
    def _pasted_copies(encoded: list[Any], dups: list[Any], p_map: list[float | None],
                       maps: dict[int, torch.Tensor]) -> list[np.ndarray | None]:
        """Per row judged tampered with copy-move evidence (``duplication.found``), the copy its tampering
        map marks more strongly (mean logit inside each of the two regions): the pasted one, whose borders
        and resampling the heads were trained to see; the source is untouched. None elsewhere."""
        out: list[np.ndarray | None] = [None] * len(encoded)
        for b, (dup, p) in enumerate(zip(dups, p_map)):
            if p is None or p < 0.5 or not duplication.found(dup) or b not in maps:
                continue
            w, h = encoded[b].sizes[encoded[b].mask_image]
            tmap = resize_logits(maps[b].float().cpu(), (h, w)).numpy()
            out[b] = dup.first if tmap[dup.first].mean() >= tmap[dup.second].mean() else dup.second
        return out

    # ---- reading the answer --------------------------------------------------------------------
    def _fill(self, res: Result, req: Request, out: dict, swapped: dict | None,
              probe: tuple[float | None, float | None] | None = None) -> None:
        toks, logits = out["tokens"], out["logits"]
        raw = self.tokenizer.decode(toks, skip_special_tokens=False)
        res.raw_text = raw
        res.text = strip_mask_tokens(raw)
        if "reference" in req.roles:
            res.reference = res.images[req.roles.index("reference")]
            res.images = [n for n, r in zip(res.images, req.roles) if r != "reference"]
        key_probs: list[float] = []
        probs = torch.softmax(logits.float(), dim=-1) if len(toks) else None

        def chosen(t: int) -> float:
            return float(probs[t, toks[t]])

        task = req.task
        if task in ("quality.assess", "quality.identify", "chat"):
            pos = self.ratings.first_position(toks, last=True)
            rating = score = rp = None
            if pos is not None:
                rp = self.ratings.probabilities(logits[pos])
                rating = max(rp, key=rp.get)
                score = sum(p * rating_value(k) for k, p in rp.items())
                key_probs.append(chosen(pos))
            if task != "chat" or pos is not None:
                res.quality = Quality(rating, score, parse_distortions(res.text), rp)
        if task in ("quality.rate", "quality.compare"):
            if probe is not None:  # both_orders: the LM's own two readings; the answer wrote their average's verdict
                p1, p2 = probe
            else:
                p1 = self._p_a(toks, logits, key_probs, chosen)
                p2 = None
                if swapped is not None:
                    p2s = self._p_a(swapped["tokens"], swapped["logits"], None, None)
                    p2 = None if p2s is None else 1.0 - p2s  # swapped "A" is the original B
            pa = _order_average(p1, p2)
            if pa is not None:
                better = "A" if pa >= 0.5 else "B"
                if probe is not None:  # the written verdict token was forced: its probability is no confidence
                    key_probs.append(pa if better == "A" else 1 - pa)
                res.comparison = Comparison(better, pa if better == "A" else 1 - pa, p1, p2,
                                            None if p1 is None or p2 is None else (p1 >= 0.5) == (p2 >= 0.5))
            else:
                res.comparison = Comparison(None, None)
        if task in ("forgery.detect", "chat"):
            pos = self.verdicts.first_position(toks)
            tampered = p_t = None
            if pos is not None:
                p_t = out.get("p_map")
                if p_t is None:
                    p_t = temper(self.verdicts.probabilities(logits[pos])["tampered"], self.model.config.verdict_temperature)
                    key_probs.append(chosen(pos))
                else:  # the map decided and the verdict word was forced: its probability is no confidence
                    key_probs.append(max(p_t, 1 - p_t))
                tampered = p_t >= 0.5
            mask = mask_prob = None
            if out["masks"]:
                mask_prob = np.max(np.stack(out["masks"]), axis=0)
            if out.get("copy") is not None:  # the pasted copy of a duplicated region joins the mask
                copy = out["copy"].astype(np.float32)
                mask_prob = copy if mask_prob is None else np.maximum(mask_prob, copy)
            if mask_prob is not None:
                mask = mask_prob > 0.5
            if out.get("copy") is not None and tampered:  # say what joined the mask, and why
                res.text = f"{res.text} {COPY_MOVE_NOTE.format(pairs=out['copy_pairs'])}".strip()
            if task != "chat" or pos is not None:
                res.forgery = Forgery(tampered, p_t, parse_manipulation(res.text),
                                      None if mask is None else float(mask.mean()), mask, len(out["masks"]),
                                      mask_prob)
        key_probs += self._taxonomy_token_probs(toks, chosen)
        res.confidence = float(np.mean(key_probs)) if key_probs else None

    def _p_a(self, toks: list[int], logits: torch.Tensor, key_probs: list[float] | None, chosen: Any) -> float | None:
        pos = self.ab.first_position(toks)
        if pos is None:
            return None
        if key_probs is not None:
            key_probs.append(chosen(pos))
        return self.ab.probabilities(logits[pos])["A"]

    def _taxonomy_token_probs(self, toks: list[int], chosen: Any) -> list[float]:
        """Probabilities of the first token of each taxonomy word (distortion, severity, manipulation)."""
        if not toks:
            return []
        # character offset at which each token starts, by decoding growing prefixes
        starts, text = [], ""
        for t in range(len(toks)):
            starts.append(len(text))
            text = self.tokenizer.decode(toks[: t + 1], skip_special_tokens=False)
        out = []
        taken: list[tuple[int, int]] = []
        for vocab in (DISTORTIONS, CATEGORIES, SEVERITIES, MANIPULATIONS):
            for m in find_terms(text, vocab, taken=taken):
                taken.append((m.start, m.end))
                t = max(i for i, s in enumerate(starts) if s <= m.start)
                out.append(chosen(t))
        return out
