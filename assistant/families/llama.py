"""Text-only causal LMs of the Llama architecture (SmolLM2, Llama, ...), made to see LLaVA-style.

The language model has no vision tower: Loupe's own ``ImageEncoder`` (in ``modeling.py``) turns each
image into a raster of image tokens, one per ``cell`` x ``cell`` pixels under the pixel budget, and
``ExplainableVLM.embed`` writes them into the ``<|image_pad|>`` rows of ``inputs_embeds``. This file
holds what the family needs besides: the processor that expands each image into its tokens and
prepares the pixels, the chat template with ``{% generation %}`` spans, and the module tree.

The processor is hand-written because transformers has no image processor for a model it does not
know the vision side of; it reuses the tokenizer's own chat-template machinery for the text.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image

from . import BaseFamily, FamilyError, _unwrap, raster_spans
from ._qwen import QWEN_CHAT_TEMPLATE

VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
PROCESSOR_FILE = "loupe_image_processor.json"


def image_grid(width: int, height: int, cell: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(grid_h, grid_w) of an image: its aspect kept, its area scaled into [min_pixels, max_pixels],
    each side a whole number of cells (at least one)."""
    area = float(width * height)
    target = min(max(area, float(min_pixels)), float(max_pixels))
    scale = math.sqrt(target / area)
    gh = max(1, round(height * scale / cell))
    gw = max(1, round(width * scale / cell))
    while gh * gw * cell * cell > max_pixels and (gh > 1 or gw > 1):
        if gh >= gw:
            gh -= 1
        else:
            gw -= 1
    return gh, gw


class ImageGridProcessor:
    """Tokenizer + image preparation for a text-only LM: each image part becomes
    ``<|vision_start|>`` + grid_h * grid_w ``<|image_pad|>`` + ``<|vision_end|>``, and its pixels are resized
    to (grid_h * cell, grid_w * cell). ``pixel_values`` holds every image's pixels flattened, (sum of H*W, 3)
    in [0, 1], so batches concatenate like the Qwen processors' patches; ``image_grid_hw`` (N, 2) gives the
    grids back."""

    def __init__(self, tokenizer: Any, cell: int = 32, min_pixels: int = 64 * 64, max_pixels: int = 448 * 448,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.cell = cell
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        if chat_template:
            tokenizer.chat_template = chat_template

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def grid(self, width: int, height: int) -> tuple[int, int]:
        return image_grid(width, height, self.cell, self.min_pixels, self.max_pixels)

    def _expand(self, messages: list[dict], images: Sequence[Image.Image]) -> tuple[list[dict], list[tuple[int, int]]]:
        grids = [self.grid(*im.size) for im in images]
        it = iter(grids)
        out = []
        for msg in messages:
            content = msg["content"]
            if isinstance(content, str):
                out.append(msg)
                continue
            parts = []
            for part in content:
                if part.get("type") == "image":
                    try:
                        gh, gw = next(it)
                    except StopIteration:
                        raise ValueError("the messages have more image parts than images were given") from None
                    text = VISION_TOKENS[0] + VISION_TOKENS[1] * (gh * gw) + VISION_TOKENS[2]
                    parts.append({"type": "text", "text": text})
                else:
                    parts.append(part)
            out.append({**msg, "content": parts})
        if next(it, None) is not None:
            raise ValueError(f"{len(images)} images were given but the messages have fewer image parts")
        return out, grids

    def pixels(self, image: Image.Image, grid: tuple[int, int]) -> torch.Tensor:
        """(H*W, 3) float in [0, 1] of ``image`` resized to the grid's size."""
        gh, gw = grid
        size = (gw * self.cell, gh * self.cell)
        img = image if image.size == size else image.resize(size, Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(-1, 3) / 255.0)

    def apply_chat_template(self, messages: list[dict], processor_kwargs: dict[str, Any] | None = None,
                            **kwargs: Any) -> dict[str, Any]:
        """The transformers processor call ``LoupeProcessor`` makes: tokenised chat plus image tensors."""
        images = list((processor_kwargs or {}).get("images") or [])
        expanded, grids = self._expand(messages, images)
        out = dict(self.tokenizer.apply_chat_template(expanded, **kwargs))
        if images:
            out["pixel_values"] = torch.cat([self.pixels(im, g) for im, g in zip(images, grids)])
            out["image_grid_hw"] = torch.tensor(grids, dtype=torch.long)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        self.tokenizer.save_pretrained(path)
        (path / PROCESSOR_FILE).write_text(json.dumps(
            {"cell": self.cell, "min_pixels": self.min_pixels, "max_pixels": self.max_pixels}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False) -> "ImageGridProcessor":
        from transformers import AutoTokenizer

        path = Path(path)
        try:
            settings = json.loads((path / PROCESSOR_FILE).read_text())
        except FileNotFoundError:
            raise FamilyError(f"{path}: no {PROCESSOR_FILE}; it is not a Loupe checkpoint of a text-only base") from None
        except json.JSONDecodeError as exc:
            raise FamilyError(f"{path / PROCESSOR_FILE}: corrupt JSON ({exc})") from None
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        return cls(tokenizer, **settings)


class LlamaFamily(BaseFamily):
    """Llama-architecture causal LMs; every image token comes from Loupe's ``ImageEncoder``."""

    name = "llama"
    model_types = ("llama",)
    image_token = "<|image_pad|>"
    end_token = "<|im_end|>"
    own_image_tokens = True
    new_trainable_tokens = (VISION_TOKENS[0], VISION_TOKENS[2])
    lora_target: ClassVar[str] = r".*layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
    quant_skip: ClassVar[tuple[str, ...]] = ("lm_head",)
    special_tokens: ClassVar[tuple[str, ...]] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *VISION_TOKENS)
    # ChatML with {% generation %} spans (the same rendering as the Qwen template; image parts arrive
    # already expanded to text by ImageGridProcessor)
    chat_template: ClassVar[str] = QWEN_CHAT_TEMPLATE
    cell: ClassVar[int] = 32

    # ---- loading -------------------------------------------------------------------------------
    def load(self, name_or_path, *, dtype=None, quantization_config=None, trust_remote_code=False, device_map=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, quantization_config=quantization_config, use_safetensors=True,
            trust_remote_code=trust_remote_code, device_map=device_map)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        missing = [t for t in (*VISION_TOKENS, self.end_token) if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
        tokenizer.padding_side = "left"
        return model, ImageGridProcessor(tokenizer, self.cell, chat_template=self.chat_template)

    def load_checkpoint_base(self, folder, *, dtype=None, quantization_config=None, trust_remote_code=False,
                             device_map=None):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=trust_remote_code,
                                                    quantization_config=quantization_config, device_map=device_map)

    def load_processor(self, path, trust_remote_code=False):
        return ImageGridProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def build_scratch(self, size, tokenizer, min_pixels, max_pixels):
        from transformers import AutoModelForCausalLM, LlamaConfig

        s = size
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=s.text_hidden, intermediate_size=s.text_intermediate,
                          num_hidden_layers=s.text_layers, num_attention_heads=s.text_heads,
                          num_key_value_heads=s.text_kv_heads, max_position_embeddings=4096, tie_word_embeddings=True,
                          bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids(self.end_token),
                          pad_token_id=tokenizer.pad_token_id)
        processor = ImageGridProcessor(tokenizer, self.cell, min_pixels, max_pixels)
        return AutoModelForCausalLM.from_config(cfg), processor

    def set_pixel_budget(self, processor, min_pixels, max_pixels):
        processor.min_pixels, processor.max_pixels = min_pixels, max_pixels

    # ---- image tokens --------------------------------------------------------------------------
    def image_token_count(self, width, height, processor):
        gh, gw = processor.grid(width, height)
        return gh * gw

    def image_spans(self, input_ids, batch, image_token_id):
        grids = batch.get("image_grid_hw")
        if grids is None:
            raise ValueError("the batch has no images (no image_grid_hw)")
        return raster_spans(input_ids, image_token_id, [(int(h), int(w)) for h, w in grids.tolist()],
                            what="image_grid_hw")

    def position_ids(self, model, input_ids, batch):
        return None  # 1D positions, which the model derives itself

    # ---- module tree ---------------------------------------------------------------------------
    def backbone(self, model):
        return _unwrap(model).model

    def final_norm(self, model):
        return _unwrap(model).model.norm

    def keep_layers(self, model, n):
        inner = _unwrap(model).model
        total = len(inner.layers)
        if not 0 < n <= total:
            raise FamilyError(f"lm_layers: {n} is not between 1 and the base's {total} layers")
        inner.layers = torch.nn.ModuleList(list(inner.layers)[:n])
        for cfg in {id(c): c for c in (_unwrap(model).config, inner.config)}.values():
            cfg.num_hidden_layers = n
            if getattr(cfg, "layer_types", None):
                cfg.layer_types = list(cfg.layer_types)[:n]

    def module_role(self, parameter_name):
        return None  # no vision tower or projector inside the base: Loupe's ImageEncoder is outside it
