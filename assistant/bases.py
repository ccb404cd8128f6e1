"""Base models: load one by hub id or folder, or build a small one from scratch, through its family.

What differs between kinds of base (Qwen2.5-VL, Qwen3-VL, ...) lives in ``families/``, one file per
family. This module holds what is generic: sizes of from-scratch bases, an offline tokenizer,
Loupe's added tokens, and ``load_base``, which reads a base's config to pick its family.

A ``scratch:<size>[:<family>]`` base builds a new model of the family from a config in code, with a
tokenizer trained offline: that is how tests get tiny twins of the real architectures and how the
embedded ``loupe-tiny`` model was born.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from transformers import AutoConfig, PreTrainedTokenizerFast

from loupe_vlm.prompts import SPECIAL_TOKENS, all_vocabulary_text

from .families import FAMILIES, BaseFamily, FamilyError, get_family


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
    # the shape of loupe-smol's language model (SmolLM2-135M's first 12 layers), for the from-scratch ablation
    "smol12": ScratchSize(576, 12, 9, 3, 1536, 64, 2, 2, 4000),
}

SCRATCH_FAMILIES = tuple(FAMILIES)


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

def build_tokenizer(corpus: Iterable[str], vocab_size: int, family: BaseFamily) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer offline on ``corpus`` plus the whole Loupe vocabulary.

    It carries the family's special tokens, Loupe's mask and low-level tokens, and the chat template.
    Every taxonomy word that the assistant reads probabilities of (ratings, verdicts, A/B) is
    forced to be a single token by adding it to the alphabet of merges through repetition.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1,
                                  special_tokens=list(family.special_tokens) + list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The vocabulary text is repeated so its words win merges even against a large builder corpus.
    vocab_text = all_vocabulary_text()
    tok.train_from_iterator(list(corpus) + [vocab_text] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=family.end_token, pad_token=family.special_tokens[0], unk_token=None,
        additional_special_tokens=list(family.special_tokens[1:]) + list(SPECIAL_TOKENS),
    )
    fast.chat_template = family.chat_template
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
# Models
# --------------------------------------------------------------------------------------------------

def build_scratch_base(base: str, corpus: Iterable[str] = (), min_pixels: int = 56 * 56,
                       max_pixels: int = 224 * 224, seed: int = 0) -> tuple[Any, Any]:
    """Build ``(model, processor)`` for ``scratch:<size>[:<family>]`` with a freshly trained tokenizer."""
    size, family_name = parse_scratch(base)
    family = get_family(family_name)
    tokenizer = build_tokenizer(corpus, SCRATCH_SIZES[size].vocab_size, family)
    torch.manual_seed(seed)
    return family.build_scratch(SCRATCH_SIZES[size], tokenizer, min_pixels, max_pixels)


def resolve_base(name_or_path: str) -> str:
    """A packaged base's name (``smollm2-135m-instruct``) becomes its converted folder; anything else is
    returned as given (a hub id or a local folder)."""
    from .packaged_bases import is_packaged_base, resolve_packaged_base

    return str(resolve_packaged_base(name_or_path)) if is_packaged_base(name_or_path) else name_or_path


def base_family(name_or_path: str, trust_remote_code: bool = False) -> BaseFamily:
    """The family of a packaged base, hub id or local folder, from its config; a clear error if it is none
    of Loupe's."""
    return _family_at(resolve_base(name_or_path), trust_remote_code)


def _family_at(name_or_path: str, trust_remote_code: bool) -> BaseFamily:
    """The family of a hub id or local folder (a packaged base already resolved to its folder)."""
    path = Path(name_or_path)
    if path.is_dir() and (path / "loupe_config.json").is_file():
        raise FamilyError(f"{name_or_path}: is a Loupe checkpoint, not a base model; load it with --model")
    if not path.exists() and name_or_path.count("/") != 1:
        from .packaged_bases import packaged_base_names

        raise FileNotFoundError(f"base model {name_or_path!r}: no such folder, not a hub id (expected "
                                f"'owner/name'), and not a packaged base ({', '.join(packaged_base_names())})")
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise FileNotFoundError(f"base model {name_or_path!r}: cannot read its config.json ({exc})") from None
    return get_family(getattr(config, "model_type", "unknown"))


def load_base(name_or_path: str, *, dtype: torch.dtype | None = None, quantization_config: Any = None,
              trust_remote_code: bool = False, device_map: Any = None) -> tuple[Any, Any]:
    """Load ``(model, processor)`` from a packaged base, a hub id or a local folder, safetensors only."""
    resolved = resolve_base(name_or_path)
    return _family_at(resolved, trust_remote_code).load(
        resolved, dtype=dtype, quantization_config=quantization_config, trust_remote_code=trust_remote_code,
        device_map=device_map)


def load_base_model(name_or_path: str, *, dtype: torch.dtype | None = None, quantization_config: Any = None,
                    trust_remote_code: bool = False, device_map: Any = None) -> Any:
    """The model of ``load_base`` without its processor: for a LoRA checkpoint, whose processor (tokenizer
    with Loupe's tokens) is its own. Loading the base's tokenizer too would cost ~0.3 s per start."""
    resolved = resolve_base(name_or_path)
    return _family_at(resolved, trust_remote_code).load_checkpoint_base(
        resolved, dtype=dtype, quantization_config=quantization_config, trust_remote_code=trust_remote_code,
        device_map=device_map)
