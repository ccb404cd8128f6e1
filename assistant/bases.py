"""Base models: load a transformers image-text-to-text model, or build a small one from scratch.

Loupe supports Qwen2.5-VL and Qwen3-VL first-class (native resolution with a pixel budget). A
``scratch:<size>`` base builds a new model of the same class from a config in code, with a
tokenizer trained offline: that is how tests get tiny twins of the real architectures and how the
embedded ``loupe-tiny`` model is born.

torchvision cannot be imported with the CPU torch wheel here, and the Qwen processors want a video
processor that needs it. ``load_processor`` therefore tries ``AutoProcessor`` first and falls back
to a subclass of the family's processor with the video processor dropped (images only).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)

from loupe_vlm.prompts import SPECIAL_TOKENS, all_vocabulary_text

logger = logging.getLogger(__name__)

# Special tokens the Qwen-VL families use, in their usual order.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]

# A Qwen-style chat template. Assistant turns (content and end token) are wrapped in
# {% generation %} so `return_assistant_tokens_mask=True` can label exactly what the model says.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{%- set parts = [{'type': 'text', 'text': message['content']}] -%}"
    "{%- else -%}{%- set parts = message['content'] -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- for part in parts -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}{%- endfor -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{%- for part in parts -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)


@dataclass(frozen=True)
class ScratchSize:
    """Sizes of a from-scratch base. ``vision_*`` for the ViT, ``text_*`` for the language model."""

    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vision_hidden: int
    vision_depth: int
    vision_heads: int
    vocab_size: int


SCRATCH_SIZES = {
    # tests: built in well under a second, a forward pass in milliseconds
    "test": ScratchSize(64, 2, 4, 2, 128, 32, 2, 2, 1200),
    # the embedded default model (~10-20M parameters)
    "tiny": ScratchSize(256, 4, 4, 2, 704, 128, 4, 4, 3000),
    "small": ScratchSize(512, 8, 8, 4, 1408, 256, 8, 4, 4000),
}

SCRATCH_FAMILIES = ("qwen2_5_vl", "qwen3_vl")


def is_scratch(base: str) -> bool:
    return base.startswith("scratch:")


def parse_scratch(base: str) -> tuple[str, str]:
    """``scratch:<size>[:<family>]`` -> (size, family). Family defaults to qwen2_5_vl."""
    parts = base.split(":")
    size = parts[1] if len(parts) > 1 else ""
    family = parts[2] if len(parts) > 2 else "qwen2_5_vl"
    if size not in SCRATCH_SIZES:
        raise ValueError(f"base {base!r}: unknown scratch size {size!r}; choose one of {', '.join(SCRATCH_SIZES)}")
    if family not in SCRATCH_FAMILIES:
        raise ValueError(f"base {base!r}: unknown family {family!r}; choose one of {', '.join(SCRATCH_FAMILIES)}")
    return size, family


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------

def build_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline on ``corpus`` plus the whole Loupe vocabulary.

    It carries Qwen's special tokens, Loupe's mask and low-level tokens, and the chat template.
    Every taxonomy word that the assistant reads probabilities of (ratings, verdicts, A/B) is
    forced to be a single token by adding it to the alphabet of merges through repetition.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=QWEN_SPECIAL + list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The vocabulary text is repeated so its words win merges even against a large builder corpus.
    vocab_text = all_vocabulary_text()
    tok.train_from_iterator(list(corpus) + [vocab_text] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        additional_special_tokens=QWEN_SPECIAL[1:] + list(SPECIAL_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def add_loupe_tokens(tokenizer: Any) -> list[int]:
    """Add the mask and low-level tokens if missing; check each is exactly one id. Returns new ids."""
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    ids = []
    for t in SPECIAL_TOKENS:
        enc = tokenizer.encode(t, add_special_tokens=False)
        if len(enc) != 1:
            raise ValueError(f"special token {t!r} encodes to {len(enc)} ids {enc}; it must be exactly one")
        ids.append(enc[0])
    return [tokenizer.convert_tokens_to_ids(t) for t in missing]


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------

class _ImageOnlyMixin:
    """Processor without a video processor: torchvision is unusable with the CPU torch wheel."""

    @classmethod
    def get_attributes(cls):
        return [a for a in super().get_attributes() if a != "video_processor"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageProcessor(_ImageOnlyMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only."""


class Qwen3VLImageProcessor(_ImageOnlyMixin, Qwen3VLProcessor):
    """Qwen3-VL processor for images only."""


_IMAGE_ONLY = {"qwen2_5_vl": Qwen2_5_VLImageProcessor, "qwen3_vl": Qwen3VLImageProcessor}


def make_image_processor(family: str, min_pixels: int, max_pixels: int) -> Qwen2VLImageProcessorPil:
    """The family's PIL image processor with a pixel budget (the PIL backend: same on CPU and GPU)."""
    patch = 16 if family == "qwen3_vl" else 14
    return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch,
                                    merge_size=2, temporal_patch_size=2)


def make_processor(family: str, tokenizer: Any, min_pixels: int, max_pixels: int) -> Any:
    cls = _IMAGE_ONLY[family]
    return cls(image_processor=make_image_processor(family, min_pixels, max_pixels), tokenizer=tokenizer,
               chat_template=tokenizer.chat_template)


def load_processor(path: str | os.PathLike, family: str, trust_remote_code: bool = False) -> Any:
    """Load a processor: ``AutoProcessor`` first, then the image-only fallback for the family."""
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(processor, "image_processor") and hasattr(processor, "tokenizer"):
            return processor
        # AutoProcessor falls back to the bare tokenizer when it cannot build the processor class
        reason: Exception = TypeError(f"AutoProcessor gave a {type(processor).__name__}")
    except Exception as exc:  # noqa: BLE001 - any failure here means "try the image-only route"
        reason = exc
    if family not in _IMAGE_ONLY:
        raise ValueError(f"{path}: cannot load a processor for family {family!r} ({reason})")
    logger.debug("AutoProcessor failed for %s (%s); using the image-only %s processor", path, reason, family)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return _IMAGE_ONLY[family](image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=getattr(tokenizer, "chat_template", None))


def family_of(config: Any) -> str:
    """The model family name (``qwen2_5_vl``, ``qwen3_vl``, ``llava``...) of a config."""
    return getattr(config, "model_type", "unknown")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

def scratch_config(size: str, family: str, tokenizer: Any) -> Any:
    """A from-scratch config of the family, with ids taken from ``tokenizer``."""
    s = SCRATCH_SIZES[size]
    head_dim = s.text_hidden // s.text_heads
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # sums to head_dim / 2
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    vocab = len(tokenizer)
    text = dict(vocab_size=vocab, hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                num_key_value_heads=s.text_kv_heads, max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                tie_word_embeddings=True, bos_token_id=None,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id)
    if family == "qwen2_5_vl":
        vision = dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                      num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=list(range(s.vision_depth)))
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    else:
        text["head_dim"] = head_dim
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                      num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                      deepstack_visual_indexes=[s.vision_depth - 1])
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    return cfg


def build_scratch_base(base: str, corpus: Iterable[str] = (), min_pixels: int = 56 * 56,
                       max_pixels: int = 224 * 224, seed: int = 0) -> tuple[Any, Any]:
    """Build ``(model, processor)`` for ``scratch:<size>[:<family>]`` with a freshly trained tokenizer."""
    size, family = parse_scratch(base)
    tokenizer = build_tokenizer(corpus, SCRATCH_SIZES[size].vocab_size)
    processor = make_processor(family, tokenizer, min_pixels, max_pixels)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(scratch_config(size, family, tokenizer))
    return model, processor


def load_base(name_or_path: str, *, dtype: torch.dtype | None = None, quantization_config: Any = None,
              trust_remote_code: bool = False, device_map: Any = None) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a hub id or a local folder, safetensors only."""
    path = Path(name_or_path)
    if not path.exists() and name_or_path.count("/") != 1:
        raise FileNotFoundError(f"base model {name_or_path!r}: no such folder, and not a hub id "
                                "(expected 'owner/name')")
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, dtype=dtype, quantization_config=quantization_config, use_safetensors=True,
        trust_remote_code=trust_remote_code, device_map=device_map)
    processor = load_processor(name_or_path, family_of(config), trust_remote_code=trust_remote_code)
    return model, processor
