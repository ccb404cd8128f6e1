"""What Qwen2.5-VL and Qwen3-VL share: ChatML tokens, the vision tower's pixel budget and raster of
merged patches, 3D rotary positions, and the module tree ``model.{visual,language_model}`` + ``lm_head``.

torchvision cannot be imported with the CPU torch wheel here, and the Qwen processors want a video
processor that needs it. ``load_processor`` therefore asks ``AutoProcessor`` only when torchvision
imports, and otherwise builds a subclass of the family's processor with the video processor dropped
(images only), from the same saved files.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any, ClassVar

import torch
import torch.nn as nn

from . import BaseFamily, FamilyError, _unwrap, raster_spans

logger = logging.getLogger(__name__)

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>")

# A Qwen-style chat template. Assistant turns (content and end token) are wrapped in
# {% generation %} so `return_assistant_tokens_mask=True` can label exactly what the model says.
QWEN_CHAT_TEMPLATE = (
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


class _ImageOnlyMixin:
    """Processor without a video processor: torchvision is unusable with the CPU torch wheel."""

    @classmethod
    def get_attributes(cls):
        return [a for a in super().get_attributes() if a != "video_processor"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)


def torchvision_usable() -> bool:
    """Whether torchvision imports (it does not with the CPU torch wheel here)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install raises anything from RuntimeError to OSError
        return False
    return True


class QwenVLFamily(BaseFamily):
    """Shared implementation; subclasses name their classes and sizes."""

    image_token: ClassVar[str] = "<|image_pad|>"
    end_token: ClassVar[str] = "<|im_end|>"
    lora_target: ClassVar[str] = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    quant_skip: ClassVar[tuple[str, ...]] = ("model.visual", "lm_head")
    special_tokens: ClassVar[tuple[str, ...]] = QWEN_SPECIAL
    chat_template: ClassVar[str] = QWEN_CHAT_TEMPLATE
    patch_size: ClassVar[int] = 14
    processor_class: ClassVar[type] = object  # the image-only processor class

    # ---- loading -------------------------------------------------------------------------------
    def load(self, name_or_path, *, dtype=None, quantization_config=None, trust_remote_code=False, device_map=None):
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            name_or_path, dtype=dtype, quantization_config=quantization_config, use_safetensors=True,
            trust_remote_code=trust_remote_code, device_map=device_map)
        return model, self.load_processor(name_or_path, trust_remote_code=trust_remote_code)

    def load_checkpoint_base(self, folder, *, dtype=None, quantization_config=None, trust_remote_code=False,
                             device_map=None):
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText.from_pretrained(
            folder, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code,
            quantization_config=quantization_config, device_map=device_map)

    def load_processor(self, path, trust_remote_code=False):
        from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

        if torchvision_usable():
            processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
            if not (hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")):
                raise FamilyError(f"{path}: AutoProcessor gave a {type(processor).__name__}, not an image processor "
                                  "with a tokenizer; the folder lacks processor files")
            return processor
        logger.debug("torchvision is not usable; loading the image-only %s processor from %s", self.name, path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
        except OSError as exc:
            raise FamilyError(f"{path}: cannot load the {self.name} tokenizer and image processor ({exc})") from None
        return self.processor_class(image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=getattr(tokenizer, "chat_template", None))

    def make_image_processor(self, min_pixels: int, max_pixels: int) -> Any:
        """The PIL image processor with a pixel budget (the PIL backend: same on CPU and GPU)."""
        from transformers import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=self.patch_size,
                                        merge_size=2, temporal_patch_size=2)

    def build_scratch(self, size, tokenizer, min_pixels, max_pixels):
        from transformers import AutoModelForImageTextToText

        processor = self.processor_class(image_processor=self.make_image_processor(min_pixels, max_pixels),
                                         tokenizer=tokenizer, chat_template=tokenizer.chat_template)
        return AutoModelForImageTextToText.from_config(self.scratch_config(size, tokenizer)), processor

    def scratch_config(self, size: Any, tokenizer: Any) -> Any:
        raise NotImplementedError

    def _text_config(self, s: Any, tokenizer: Any) -> dict[str, Any]:
        head_dim = s.text_hidden // s.text_heads
        half = head_dim // 2
        mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # sums to head_dim / 2
        return dict(vocab_size=len(tokenizer), hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                    num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                    num_key_value_heads=s.text_kv_heads, max_position_embeddings=4096,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
                    tie_word_embeddings=True, bos_token_id=None,
                    eos_token_id=tokenizer.convert_tokens_to_ids(self.end_token), pad_token_id=tokenizer.pad_token_id)

    def _vision_config(self, s: Any, **specific: Any) -> dict[str, Any]:
        """The vision tower of a from-scratch base: what both families share, plus ``specific``."""
        return dict(depth=s.vision_depth, hidden_size=s.vision_hidden, intermediate_size=2 * s.vision_hidden,
                    num_heads=s.vision_heads, out_hidden_size=s.text_hidden, patch_size=self.patch_size,
                    spatial_merge_size=2, temporal_patch_size=2, **specific)

    @staticmethod
    def _vision_ids(tokenizer: Any) -> dict[str, int]:
        return {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}

    def set_pixel_budget(self, processor, min_pixels, max_pixels):
        processor.image_processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}

    # ---- image tokens --------------------------------------------------------------------------
    def image_token_count(self, width, height, processor):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = processor.image_processor
        patch, merge = ip.patch_size, ip.merge_size
        rh, rw = smart_resize(height, width, factor=patch * merge, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
        return (rh // patch) * (rw // patch) // (merge * merge)

    def image_spans(self, input_ids, batch, image_token_id):
        """Images appear in the sequences in the order of ``image_grid_thw``; each has t*h*w / merge^2
        contiguous tokens, checked against the ids."""
        grid_thw = batch.get("image_grid_thw")
        if grid_thw is None:
            raise ValueError("the batch has no images (no image_grid_thw)")
        merge = 2
        thw = [tuple(int(x) for x in g) for g in grid_thw]
        return raster_spans(input_ids, image_token_id, [(h // merge, w // merge) for _, h, w in thw],
                            [t * h * w // merge ** 2 for t, h, w in thw], "image_grid_thw")

    def model_input_keys(self):
        return ("pixel_values", "image_grid_thw", "mm_token_type_ids")

    def position_ids(self, model: nn.Module, input_ids: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor | None:
        """The 3D rotary positions of a teacher-forced pass, computed from the ids as the model would.

        Passed explicitly because Qwen3-VL refuses ``input_ids`` beside ``inputs_embeds``, and without
        the ids it cannot place the image tokens' positions."""
        inner = _unwrap(model).model
        tt = batch.get("mm_token_type_ids")
        if batch.get("image_grid_thw") is None or tt is None:
            return None
        positions, _ = inner.get_rope_index(input_ids, mm_token_type_ids=tt, image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=batch.get("attention_mask"))
        return positions

    # ---- module tree ---------------------------------------------------------------------------
    def backbone(self, model):
        return _unwrap(model).model

    def final_norm(self, model):
        lm = getattr(_unwrap(model).model, "language_model", None)
        if lm is None or not hasattr(lm, "norm"):
            raise FamilyError(f"{type(_unwrap(model)).__name__}: no language_model.norm; not a {self.name} model")
        return lm.norm

    def module_role(self, parameter_name):
        if ".visual." not in f".{parameter_name}":
            return None
        return "projector" if ".merger" in parameter_name or "deepstack_merger" in parameter_name else "vision"

