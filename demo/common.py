"""What the web demo and the OpenAI-compatible server share: upload limits, task routing, masks.

Task routing (documented in the README): an explicit task wins; otherwise a question that mentions
tampering, editing, forgery, fakes or authenticity runs ``forgery.detect``, two images (A and B)
run a comparison, and anything else runs ``quality.assess``. The word list is ``loupe ask``'s, so the
CLI, the demo and the API route a question the same way.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from loupe_vlm.assistant.ask import _pick_task as _ask_pick_task  # one routing word list for ask, demo and serve
from loupe_vlm.assistant.inference import Assistant, Request, Result
from loupe_vlm.assistant.processing import load_image
from loupe_vlm.prompts import TASKS, canonical_question, image_roles_for

# Uploads larger than these are refused before the model sees them. 10 MB covers phone photos;
# 16 MP (e.g. 4000x4000) keeps decoding and resizing cheap on a laptop.
MAX_IMAGE_BYTES = 10_000_000
MAX_IMAGE_PIXELS = 16_000_000

# Every canonical question, so "the user left the mode's prompt as it was" can be told apart from
# a question of their own.
CANONICAL_QUESTIONS = {canonical_question(t, d, r) for t in TASKS for d in (False, True) for r in (False, True)
                       if not (r and t == "forgery.detect")}

# Short names accepted where a task is named (``loupe_task`` on the API).
TASK_ALIASES = {"quality": "quality.assess", "assess": "quality.assess", "identify": "quality.identify",
                "rate": "quality.rate", "compare": "quality.compare", "forgery": "forgery.detect"}


class UploadError(ValueError):
    """An upload the server refuses; ``status`` is the HTTP status it maps to (400 or 413)."""

    def __init__(self, message: str, status: int = 400, kind: str = "bad_image"):
        super().__init__(message)
        self.status = status
        self.kind = kind


def check_image_bytes(data: bytes, name: str = "the image") -> Image.Image:
    """Open uploaded bytes as an image after checking the byte and pixel caps.

    Only the header is read to get the size, so an image bomb is refused before it is decoded.
    """
    if len(data) > MAX_IMAGE_BYTES:
        raise UploadError(f"{name} is {len(data) / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB. "
                          "Send a smaller or more compressed image.", 413, "too_large")
    if not data:
        raise UploadError(f"{name} is empty (0 bytes); send a PNG, JPEG or WebP image.")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as exc:  # PIL raises several types for unreadable data
        raise UploadError(f"{name} is not an image PIL can read ({type(exc).__name__}); "
                          "send a PNG, JPEG or WebP image.") from exc
    _check_pixels(img, name)
    return img


def check_image_file(path: str | Path) -> Path:
    """Check an uploaded file against the byte and pixel caps; returns the path."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_IMAGE_BYTES:
        raise UploadError(f"{path.name} is {size / 1e6:.1f} MB; the limit is {MAX_IMAGE_BYTES / 1e6:.0f} MB. "
                          "Upload a smaller or more compressed image.", 413, "too_large")
    try:
        with Image.open(path) as img:
            _check_pixels(img, path.name)
    except UploadError:
        raise
    except Exception as exc:
        raise UploadError(f"{path.name} is not an image PIL can read ({type(exc).__name__}); "
                          "upload a PNG, JPEG or WebP image.") from exc
    return path


def _check_pixels(img: Image.Image, name: str) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise UploadError(f"{name} is {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                          f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels. Downscale it first.", 413, "too_large")


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps a server on this machine only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def load_assistant(prog: str, model: str | None, device: str, max_new_tokens: int, host: str,
                   lm_precision: str = "auto") -> Assistant | None:
    """Load the model for a server verb; on failure print why (naming ``prog``) and return None.

    Also warns on stderr when ``host`` would expose the server beyond this machine.
    """
    try:
        assistant = Assistant.from_pretrained(model, device=device, max_new_tokens=max_new_tokens,
                                              lm_precision=lm_precision)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return None
    if not is_loopback(host):
        print(f"{prog}: warning: binding {host}; anyone who can reach this machine can use it", file=sys.stderr)
    return assistant


def normalise_task(name: str) -> str:
    """A task name or alias (``forgery``, ``compare``...) -> a template task, or ``chat``."""
    task = TASK_ALIASES.get(name, name)
    if task not in TASKS and task != "chat":
        known = ", ".join(list(TASKS) + ["chat"] + sorted(TASK_ALIASES))
        raise ValueError(f"unknown task {name!r}; use one of: {known}")
    return task


def pick_task(question: str | None, n_images: int, detail: bool = False) -> str:
    """Route a free question over ``n_images`` images (A, or A and B) to a template task."""
    task = _ask_pick_task("auto", n_images, question)
    if task == "quality.compare" and not detail:
        task = "quality.rate"
    return task


@dataclass
class Plan:
    """One template-task request before it meets the model."""

    task: str
    images: list[Any]  # reference first when present, then A (and B)
    roles: list[str]
    question: str
    detail: bool

    def request(self, names: list[str] | None = None) -> Request:
        return Request(self.task, self.images, self.roles, question=self.question, detail=self.detail, names=names)


def plan(task: str, a: Any, b: Any = None, reference: Any = None, question: str | None = None,
         detail: bool = False) -> Plan:
    """Lay out a task's images and question; raise ValueError when the images do not fit the task."""
    pair = task in ("quality.rate", "quality.compare")
    if pair and b is None:
        raise ValueError(f"{task} compares two images: give image B too")
    if task == "forgery.detect" and reference is not None:
        raise ValueError("forgery detection takes no reference image; remove it")
    roles = image_roles_for(task, reference is not None)
    images = ([reference] if reference is not None else []) + [a] + ([b] if pair else [])
    q = question.strip() if question else ""
    if not q or q in CANONICAL_QUESTIONS:
        q = canonical_question(task, detail, reference is not None)
    return Plan(task, images, roles, q, detail)


def mask_png(mask: np.ndarray) -> bytes:
    """A bool HxW mask as PNG bytes (255 = tampered)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def api_record(result: Result) -> dict[str, Any]:
    """DESIGN.md's result record with the forgery mask inlined as base64 PNG (or null)."""
    rec = result.to_record()
    if rec.get("forgery") is not None and result.forgery is not None and result.forgery.mask is not None:
        rec["forgery"]["mask"] = base64.b64encode(mask_png(result.forgery.mask)).decode("ascii")
    return rec


def overlay(image: Any, mask: np.ndarray, colour: tuple[int, int, int] = (255, 40, 40)) -> np.ndarray:
    """The image with the mask tinted and outlined, as HxWx3 uint8 (for display)."""
    import cv2

    rgb = np.asarray(load_image(image))  # EXIF-transposed like the model's input, so the mask lines up
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"mask {mask.shape} does not match the image {rgb.shape[:2]}")
    out = rgb.astype(np.float32)
    out[mask] = 0.55 * out[mask] + 0.45 * np.array(colour, np.float32)
    out = out.astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, colour, thickness=max(1, min(rgb.shape[:2]) // 150))
    return out
