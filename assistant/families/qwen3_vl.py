"""Qwen3-VL: 16 px patches merged 2x2 into 32 px image tokens, interleaved 3D rotary sections and
DeepStack (vision features added to early language-model layers)."""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLProcessor

from ._qwen import QwenVLFamily, _ImageOnlyMixin


class Qwen3VLImageProcessor(_ImageOnlyMixin, Qwen3VLProcessor):
    """Qwen3-VL processor for images only."""


class Qwen3VLFamily(QwenVLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    patch_size = 16
    processor_class = Qwen3VLImageProcessor

    def scratch_config(self, size, tokenizer):
        text = self._text_config(size, tokenizer)
        text["head_dim"] = size.text_hidden // size.text_heads
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = self._vision_config(size, num_position_embeddings=256, deepstack_visual_indexes=[size.vision_depth - 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **self._vision_ids(tokenizer))
