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
        s = size
        text = self._text_config(s, tokenizer)
        text["head_dim"] = s.text_hidden // s.text_heads
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                      num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=256,
                      deepstack_visual_indexes=[s.vision_depth - 1])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                             **self._vision_ids(tokenizer))
