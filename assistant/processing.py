"""Processing: images in, model inputs out.

* ``load_image`` opens a file (or takes a PIL image / array) and returns RGB, handling EXIF
  orientation, palette/alpha/16-bit/CMYK modes, and refusing truncated, non-image, empty and
  oversized files with an ``ImageError`` that names the file and says what to do.
* ``LoupeProcessor`` wraps the base's transformers processor. It renders chat ``messages`` with the
  base's chat template, puts the low-level placeholder tokens after each image, labels only the
  assistant turns, prepares the full-resolution tensors for the LowLevelEncoder, and loads masks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from loupe_vlm.prompts import CATEGORIES, LOWLEVEL_TOKEN, MASK_TOKEN, Sample

# Refuse images above this many pixels before decoding them (decompression bombs).
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
IGNORE_INDEX = -100


class ImageError(ValueError):
    """An image that cannot be used. ``kind`` is one of: missing, empty, not_image, truncated,
    too_large, bad_mode. ``str()`` names the file and says what to do."""

    def __init__(self, path: Any, kind: str, detail: str):
        self.path = str(path)
        self.kind = kind
        super().__init__(f"{self.path}: {detail}")


def _to_rgb(img: Image.Image, where: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(where, "bad_mode", f"cannot convert image mode {img.mode!r} to RGB ({exc}); "
                         "save it as an 8-bit RGB PNG or JPEG") from None


def load_image(src: Any, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open ``src`` (a path, PIL image or HxW[x3|4] uint8 array) as an RGB PIL image."""
    if isinstance(src, Image.Image):
        return _to_rgb(ImageOps.exif_transpose(src) or src, "<image>")
    if isinstance(src, np.ndarray):
        if src.ndim not in (2, 3) or src.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
            raise ImageError("<array>", "bad_mode", f"array of shape {src.shape} and dtype {src.dtype} is not "
                             "an image; pass HxW or HxWx3 uint8")
        if src.dtype != np.uint8:
            src = (np.clip(src, 0, 1) * 255).astype(np.uint8) if src.dtype.kind == "f" else (src >> 8).astype(np.uint8)
        return _to_rgb(Image.fromarray(src), "<array>")
    path = Path(src)
    if not path.exists():
        raise ImageError(path, "missing", "no such file; check the path")
    if path.is_dir():
        raise ImageError(path, "not_image", "is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(path, "empty", "the file is empty (0 bytes); re-export or re-download it")
    try:
        with Image.open(path) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(path, "too_large", f"{w}x{h} = {w * h / 1e6:.0f} MP is over the {max_pixels / 1e6:.0f} MP "
                                 "limit (a possible decompression bomb); downscale it first")
            img = ImageOps.exif_transpose(img) or img
            img.load()
            return _to_rgb(img, str(path))
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(path, "too_large", f"refused as a decompression bomb ({exc}); downscale it first") from None
    except UnidentifiedImageError:
        raise ImageError(path, "not_image", "not an image file Pillow can read (PNG, JPEG, WebP, TIFF, BMP...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(path, "truncated", f"the image data is truncated or corrupt ({exc}); "
                         "re-export or re-download it") from None


def load_mask(path: Any, size: tuple[int, int]) -> np.ndarray:
    """A binary mask (255 = manipulated) as a bool array of ``size`` = (W, H)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(path, "missing", "mask file not found; check the dataset's masks/ folder")
    try:
        with Image.open(path) as m:
            m = m.convert("L")
            if m.size != size:
                m = m.resize(size, Image.NEAREST)
            return np.asarray(m) > 127
    except (OSError, SyntaxError, UnidentifiedImageError) as exc:
        raise ImageError(path, "truncated", f"cannot read mask ({exc})") from None


def lowlevel_size(w: int, h: int, max_side: int, multiple: int = 16) -> tuple[int, int]:
    """Working size (W, H) of the LowLevelEncoder: long side <= max_side, both multiples of ``multiple``."""
    scale = min(1.0, max_side / max(w, h))
    nw = max(multiple, int(round(w * scale / multiple)) * multiple)
    nh = max(multiple, int(round(h * scale / multiple)) * multiple)
    return nw, nh


def to_lowlevel_tensor(img: Image.Image, max_side: int) -> torch.Tensor:
    """(3, H', W') float in [0, 1] at the LowLevelEncoder's working size."""
    size = lowlevel_size(*img.size, max_side)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def with_lowlevel_placeholders(messages: list[dict], n_tokens: int) -> list[dict]:
    """A copy of ``messages`` with ``n_tokens`` low-level placeholders right after each image part."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, str) or n_tokens == 0:
            out.append(msg)
            continue
        parts = []
        for part in content:
            parts.append(part)
            if part.get("type") == "image":
                parts.append({"type": "text", "text": LOWLEVEL_TOKEN * n_tokens})
        out.append({**msg, "content": parts})
    return out


@dataclass
class Encoded:
    """One example as tensors (no batch dimension on the token tensors)."""

    input_ids: torch.Tensor  # (L,)
    attention_mask: torch.Tensor  # (L,)
    labels: torch.Tensor | None  # (L,)
    extra: dict[str, torch.Tensor]  # pixel_values (P, C), image_grid_thw (N, 3), mm_token_type_ids (L,) ...
    lowlevel_pixels: list[torch.Tensor]  # per image (3, H', W')
    masks: torch.Tensor | None  # (M, H', W') float targets at the mask image's low-level size
    mask_image: int  # index (within this example's images) of the image the masks describe
    sizes: list[tuple[int, int]]  # (W, H) of each image as given, so masks come back at that size
    aux: torch.Tensor | None = None  # (N, AUX_DIM) per-image labels from Sample.meta, NaN = unknown
    aux_mask: list[torch.Tensor | None] | None = None  # per image: tampered-pixel map (H', W') or None
    duplicate: Any = None  # at inference, a forgery question's copy-move evidence (duplication.Duplicate) or None
    # at inference, a forgery question's reading by the forensic network (assistant/forensic.py): (tampering-map
    # logits (h, w), image-level logit) of the judged image, or None
    forensic: Any = None
    # at inference, a quality question's readings (Assistant._readings: against its reference, or of the image
    # alone) or None
    readings: Any = None


# Auxiliary per-image labels (see ``aux_labels``): one bit per distortion category, then the worst
# severity / 5, then tampered. NaN marks a label the record does not give.
AUX_CATEGORIES = tuple(CATEGORIES.ids)
AUX_DIM = len(AUX_CATEGORIES) + 2


def aux_labels(sample: Sample) -> torch.Tensor:
    """Per-image labels read from a record's ``meta`` (the builders' ground truth), (N, AUX_DIM).

    They supervise the LowLevelEncoder directly during training, so the visual branch learns to see
    distortions and tampering long before the language model would teach it through the text alone.
    Quality records give categories and severity (a reference image is clean); forgery records give
    the tampered bit. Anything a record does not state is NaN and is left out of the loss.
    """
    out = torch.full((len(sample.images), AUX_DIM), float("nan"))
    meta = sample.meta or {}
    if sample.task.startswith("quality."):
        per_role = {"reference": [], "A": meta.get("distortions_A", meta.get("distortions")),
                    "B": meta.get("distortions_B")}
        for i, role in enumerate(sample.image_roles):
            ds = per_role.get(role)
            if ds is None or not isinstance(ds, list):
                continue
            try:
                cats = {d["category"] for d in ds}
                worst = max((int(d["severity"]) for d in ds), default=0)
            except (KeyError, TypeError, ValueError):
                continue  # a record without the builders' distortion facts: no aux labels
            out[i, : len(AUX_CATEGORIES)] = torch.tensor([float(c in cats) for c in AUX_CATEGORIES])
            out[i, -2] = worst / 5.0
    elif sample.task.startswith("forgery.") and isinstance(meta.get("tampered"), bool):
        out[0, -1] = float(meta["tampered"])
    return out


class LoupeProcessor:
    """Turns messages + images (or a ``Sample``) into model inputs for one base family."""

    def __init__(self, processor: Any, n_lowlevel_tokens: int, lowlevel_max_side: int = 448,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, *, family: str):
        from .families import get_family

        self.processor = processor
        self.family = get_family(family)
        self.tokenizer = processor.tokenizer
        self.n_lowlevel_tokens = n_lowlevel_tokens
        self.lowlevel_max_side = lowlevel_max_side
        self.max_image_pixels = max_image_pixels
        self.mask_token_id = self._single_id(MASK_TOKEN)
        self.lowlevel_token_id = self._single_id(LOWLEVEL_TOKEN)
        self.pad_token_id = self.tokenizer.pad_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before training")

    @classmethod
    def for_model(cls, model: Any, processor: Any, **kwargs: Any) -> "LoupeProcessor":
        """The processor that feeds ``model`` (an ``ExplainableVLM``): its family, token and size settings."""
        cfg = model.config
        return cls(processor, cfg.n_lowlevel_tokens, cfg.lowlevel_max_side, family=cfg.family, **kwargs)

    def image_token_count(self, width: int, height: int) -> int:
        """Image tokens an image of this size becomes (the family's rule and this processor's pixel budget)."""
        return self.family.image_token_count(width, height, self.processor)

    def _single_id(self, token: str) -> int:
        ids = self.tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"token {token!r} encodes to {len(ids)} ids; add it as a special token first")
        return ids[0]

    # ---- one example ---------------------------------------------------------------------------
    def encode(self, messages: list[dict], images: Sequence[Any], *, train: bool,
               masks: Sequence[Any] = (), mask_image: int = 0) -> Encoded:
        """Encode a chat. With ``train``, labels cover only the assistant turns (and their end token);
        without, a generation prompt is appended for the assistant to answer."""
        pil = [load_image(im, self.max_image_pixels) for im in images]
        msgs = with_lowlevel_placeholders(messages, self.n_lowlevel_tokens)
        out = self.processor.apply_chat_template(
            msgs, processor_kwargs={"images": pil or None}, tokenize=True, return_dict=True, return_tensors="pt",
            add_generation_prompt=not train, return_assistant_tokens_mask=train)
        input_ids = out.pop("input_ids")[0]
        attention_mask = out.pop("attention_mask")[0]
        labels = None
        if train:
            assistant = torch.as_tensor(out.pop("assistant_masks"))[0].bool()
            if not assistant.any():
                raise ValueError("no assistant tokens were marked: the chat template lacks {% generation %} "
                                 "spans; use a template that has them")
            labels = torch.where(assistant, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        extra = {k: (v[0] if k.endswith("token_type_ids") else v) for k, v in out.items() if torch.is_tensor(v)}
        low = [to_lowlevel_tensor(im, self.lowlevel_max_side) for im in pil]
        mask_t = None
        if masks:
            if not pil:
                raise ValueError("masks were given without an image")
            h, w = low[mask_image].shape[-2:]
            mask_t = torch.stack([torch.from_numpy(load_mask(m, (w, h)) if not isinstance(m, np.ndarray)
                                                   else _resize_bool(m, (w, h))).float() for m in masks])
        return Encoded(input_ids, attention_mask, labels, extra, low, mask_t, mask_image, [im.size for im in pil])

    def encode_sample(self, sample: Sample, root: str | os.PathLike, train: bool = True) -> Encoded:
        """Encode a dataset record; paths resolve under ``root`` (the dataset folder)."""
        root = Path(root)
        images = [root / p for p in sample.images]
        messages = sample.messages if train else _without_last_answer(sample.messages)
        non_ref = [i for i, r in enumerate(sample.image_roles) if r != "reference"]
        enc = self.encode(messages, images, train=train, masks=[root / m for m in sample.masks],
                          mask_image=non_ref[0] if non_ref else 0)
        enc.aux = aux_labels(sample)
        # the forensic map target: the union of the tamper masks, or all zeros for an authentic image
        enc.aux_mask = [None] * len(images)
        if sample.task.startswith("forgery.") and not torch.isnan(enc.aux[enc.mask_image, -1]):
            low = enc.lowlevel_pixels[enc.mask_image]
            enc.aux_mask[enc.mask_image] = (enc.masks.amax(0) if enc.masks is not None and enc.masks.numel()
                                            else torch.zeros(low.shape[-2:]))
        return enc

    # ---- batches -------------------------------------------------------------------------------
    def collate(self, items: list[Encoded], padding_side: str = "right") -> dict[str, Any]:
        """Pad a list of ``Encoded`` into one batch dict for ``ExplainableVLM.forward``/generation."""
        length = max(int(e.input_ids.numel()) for e in items)

        def pad(t: torch.Tensor, value: int) -> torch.Tensor:
            fill = torch.full((length - t.numel(),), value, dtype=t.dtype)
            return torch.cat([t, fill] if padding_side == "right" else [fill, t])

        batch: dict[str, Any] = {
            "input_ids": torch.stack([pad(e.input_ids, self.pad_token_id) for e in items]),
            "attention_mask": torch.stack([pad(e.attention_mask, 0) for e in items]),
        }
        if all(e.labels is not None for e in items):
            batch["labels"] = torch.stack([pad(e.labels, IGNORE_INDEX) for e in items])
        for key in items[0].extra:
            vals = [e.extra[key] for e in items if key in e.extra]
            if key.endswith("token_type_ids"):  # padded with zeros (text), per the notes
                batch[key] = torch.stack([pad(v, 0) for v in vals])
            else:  # pixel_values, image_grid_thw: concatenated over images
                batch[key] = torch.cat(vals)
        batch["lowlevel_pixels"] = [t for e in items for t in e.lowlevel_pixels]
        batch["masks"] = [e.masks for e in items]
        # index into the flat image list of the image each example's masks describe
        offsets = np.cumsum([0] + [len(e.lowlevel_pixels) for e in items])[:-1]
        batch["mask_image"] = [int(o) + e.mask_image for o, e in zip(offsets, items)]
        if any(e.aux is not None for e in items):
            batch["aux"] = torch.cat([e.aux if e.aux is not None else torch.full((len(e.lowlevel_pixels), AUX_DIM),
                                                                                 float("nan")) for e in items])
            batch["aux_mask"] = [m for e in items for m in (e.aux_mask or [None] * len(e.lowlevel_pixels))]
        return batch


def _resize_bool(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    m = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    return np.asarray(m.resize(size, Image.NEAREST)) > 127


def _without_last_answer(messages: list[dict]) -> list[dict]:
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample (..., h, w) mask logits to size (H, W) bilinearly."""
    shape = logits.shape
    x = logits.reshape(-1, 1, *shape[-2:])
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x.reshape(*shape[:-2], *size)
