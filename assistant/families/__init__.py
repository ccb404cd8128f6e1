"""Base families: everything that differs between kinds of base model, behind one small interface.

``ExplainableVLM``, ``LoupeProcessor``, training and evaluation take one code path for every base;
what they need to know about a base's layout they ask its ``BaseFamily``. One file per family:

* ``qwen2_5_vl.py`` and ``qwen3_vl.py``: transformers image-text-to-text models whose own vision
  tower fills ``<|image_pad|>`` tokens (native resolution with a pixel budget);
* ``llama.py``: a text-only causal LM (Llama architecture, e.g. SmolLM2): Loupe's own ``ImageEncoder``
  supplies every image token (``own_image_tokens``), LLaVA-style.

Adding a family is one new file with a ``BaseFamily`` subclass, registered in ``FAMILIES`` below.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn


class FamilyError(ValueError):
    """A base whose family Loupe does not support, or a model whose layout does not match its family."""


class BaseFamily:
    """The interface. Subclasses set the class attributes and implement the methods that raise."""

    name: ClassVar[str] = ""
    """The family id stored in loupe_config.json (a transformers ``model_type`` where there is one)."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """transformers ``model_type`` values of bases of this family."""
    image_token: ClassVar[str] = "<|image_pad|>"
    """The placeholder token image features are written into, one per image token."""
    end_token: ClassVar[str] = "<|im_end|>"
    """The token that ends an assistant turn (generation stops there; training labels it)."""
    own_image_tokens: ClassVar[bool] = False
    """True when Loupe's own image encoder supplies the image tokens (a text-only LM), False when the
    base's vision tower does."""
    new_trainable_tokens: ClassVar[tuple[str, ...]] = ()
    """Tokens Loupe adds to a pretrained base of this family (besides its own mask token) whose embedding rows
    LoRA training must learn: a text-only LM has no image delimiters of its own."""
    lora_target: ClassVar[str] = ""
    """Default peft ``target_modules`` regex: the language model's linear layers only."""
    quant_skip: ClassVar[tuple[str, ...]] = ()
    """Module prefixes kept in full precision under 4-bit loading (full prefixes, as transformers 5 wants)."""
    special_tokens: ClassVar[tuple[str, ...]] = ()
    """The family's own special tokens, in order, for a tokenizer built from scratch."""
    chat_template: ClassVar[str] = ""
    """A chat template with ``{% generation %}`` spans, for bases built from scratch."""

    # ---- loading -------------------------------------------------------------------------------
    def load(self, name_or_path: str, *, dtype: torch.dtype | None = None, quantization_config: Any = None,
             trust_remote_code: bool = False, device_map: Any = None) -> tuple[nn.Module, Any]:
        """``(model, processor)`` from a hub id or local folder, safetensors only."""
        raise NotImplementedError

    def load_checkpoint_base(self, folder: Any, *, dtype: torch.dtype | None = None, quantization_config: Any = None,
                             trust_remote_code: bool = False, device_map: Any = None) -> nn.Module:
        """The full base weights a Loupe checkpoint bundles in ``base/``."""
        raise NotImplementedError

    def load_processor(self, path: Any, trust_remote_code: bool = False) -> Any:
        """The processor saved in ``path`` (a base folder or a Loupe checkpoint)."""
        raise NotImplementedError

    def build_scratch(self, size: Any, tokenizer: Any, min_pixels: int, max_pixels: int) -> tuple[nn.Module, Any]:
        """A new, randomly initialised base of the family with sizes ``size`` (a ``ScratchSize``)."""
        raise NotImplementedError

    def set_pixel_budget(self, processor: Any, min_pixels: int, max_pixels: int) -> None:
        """Make ``processor`` resize every image to between ``min_pixels`` and ``max_pixels``."""
        raise NotImplementedError

    # ---- image tokens --------------------------------------------------------------------------
    def image_token_count(self, width: int, height: int, processor: Any) -> int:
        """How many image tokens an image of ``width`` x ``height`` becomes (for length estimates)."""
        raise NotImplementedError

    def image_overhead(self) -> int:
        """Tokens the chat template writes around each image besides its image tokens."""
        return 2

    def message_overhead(self) -> int:
        """Tokens the chat template writes around each message."""
        return 5

    def image_spans(self, input_ids: torch.Tensor, batch: dict[str, Any],
                    image_token_id: int) -> list[tuple[int, torch.Tensor, tuple[int, int]]]:
        """For each image of the batch, in order: (row, positions of its image tokens, (grid_h, grid_w)).
        The positions' hidden states form a raster grid the mask decoder reads."""
        raise NotImplementedError

    def model_input_keys(self) -> tuple[str, ...]:
        """The collated batch entries (besides ids, mask and embeddings) the transformers model takes."""
        return ()

    # ---- module tree ---------------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        """The module that maps (input_ids, inputs_embeds, ...) to ``last_hidden_state`` after the final
        norm, without the ``lm_head``. Looks through a peft wrapper (its LoRA layers stay active)."""
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Module:
        return _unwrap(model).get_output_embeddings()

    def keep_layers(self, model: nn.Module, n: int) -> None:
        """Keep only the first ``n`` decoder layers of the language model (in place)."""
        raise FamilyError(f"family {self.name}: keeping only some of the language model's layers is not supported")

    def module_role(self, parameter_name: str) -> str | None:
        """"vision", "projector" or None (language model) for a parameter name of the base."""
        return None

    def text_config(self, model: nn.Module) -> Any:
        return _unwrap(model).config.get_text_config()


def raster_spans(input_ids: torch.Tensor, image_token_id: int, grids: list[tuple[int, int]],
                 tokens_per_image: list[int] | None = None, what: str = "image grids"
                 ) -> list[tuple[int, torch.Tensor, tuple[int, int]]]:
    """Spans of images whose tokens are contiguous runs of ``image_token_id``, in batch order: image i has
    ``tokens_per_image[i]`` tokens (default: grid_h * grid_w) forming a (grid_h, grid_w) raster.
    Checked against the ids: every image token belongs to exactly one image."""
    counts = tokens_per_image or [gh * gw for gh, gw in grids]
    spans = []
    img = 0
    for row in range(input_ids.shape[0]):
        pos = (input_ids[row] == image_token_id).nonzero().flatten()
        start = 0
        while start < pos.numel():
            if img >= len(grids):
                raise ValueError(f"more image tokens in input_ids than images in the {what}")
            spans.append((row, pos[start:start + counts[img]], grids[img]))
            start += counts[img]
            img += 1
    if img != len(grids):
        raise ValueError(f"{len(grids)} images but image tokens for {img}")
    return spans


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# Registered families (imported lazily: importing a family pulls in its transformers classes).
FAMILIES: dict[str, str] = {
    "qwen2_5_vl": "loupe_vlm.assistant.families.qwen2_5_vl:Qwen2_5_VLFamily",
    "qwen3_vl": "loupe_vlm.assistant.families.qwen3_vl:Qwen3VLFamily",
    "llama": "loupe_vlm.assistant.families.llama:LlamaFamily",
}

_cache: dict[str, BaseFamily] = {}


def get_family(name: str) -> BaseFamily:
    """The family registered as ``name`` (a ``loupe_config.json`` family or a transformers model_type)."""
    if name in FAMILIES:  # by its key: import that family only, not the others' transformers classes
        return _load(name, FAMILIES[name])
    for key, target in FAMILIES.items():
        if name == key or name in _load(key, target).model_types:
            return _load(key, target)
    raise FamilyError(f"base family {name!r} is not supported; Loupe supports {', '.join(FAMILIES)}")


def family_of_config(config: Any) -> BaseFamily:
    """The family of a transformers config (by its ``model_type``)."""
    return get_family(getattr(config, "model_type", "unknown"))


def _load(key: str, target: str) -> BaseFamily:
    if key not in _cache:
        import importlib

        module, cls = target.split(":")
        _cache[key] = getattr(importlib.import_module(module), cls)()
    return _cache[key]
