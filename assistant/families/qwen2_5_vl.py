"""Qwen2.5-VL: 14 px patches merged 2x2 into 28 px image tokens, window attention in the vision tower."""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

from ._qwen import QwenVLFamily, _ImageOnlyMixin


class Qwen2_5_VLImageProcessor(_ImageOnlyMixin, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only."""


class Qwen2_5_VLFamily(QwenVLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    patch_size = 14
    processor_class = Qwen2_5_VLImageProcessor

    def scratch_config(self, size, tokenizer):
        vision = self._vision_config(size, window_size=112, fullatt_block_indexes=list(range(size.vision_depth)))
        return Qwen2_5_VLConfig(text_config=self._text_config(size, tokenizer), vision_config=vision,
                                tie_word_embeddings=True, **self._vision_ids(tokenizer))
