"""Test helpers: tiny Loupe models of the real architectures, built from configs in seconds.

``tiny_model(family)`` builds a fresh scratch Qwen2.5-VL or Qwen3-VL twin with an offline
tokenizer. ``build_tiny_checkpoint(path)`` overfits one on a handful of examples (a quality
assessment, with and without a reference; a tampered image with its mask; an authentic image; a
comparison in both orders; a two-turn chat) so that generation produces real rating, verdict and A/B
words, a mask token and a follow-up answer, then saves a checkpoint folder other tests load with
``Assistant.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loupe_vlm.assistant.modeling import ExplainableVLM, new_model
from loupe_vlm.assistant.processing import LoupeProcessor
from loupe_vlm.prompts import canonical_question, user_content

ASSETS = Path(__file__).resolve().parent / "assets"

QUALITY_ANSWER = "The image suffers from serious Gaussian noise. Overall, the quality is poor."
TAMPERED_ANSWER = "This image has been tampered with: a spliced region in the top-left <|mask|>."
AUTHENTIC_ANSWER = "This image appears authentic, with consistent noise, lighting and edges throughout."
REFERENCE_ANSWER = "Against the reference, the image shows serious Gaussian noise. Overall, the quality is bad."
A_BETTER = "Image A is better: image B suffers from serious Gaussian noise."
B_BETTER = "Image B is better: image A suffers from serious Gaussian noise."
FOLLOW_UP = "Where is the noise strongest?"
FOLLOW_UP_ANSWER = "The noise covers the whole frame evenly, so the quality is poor everywhere."
CORPUS = [QUALITY_ANSWER, TAMPERED_ANSWER, AUTHENTIC_ANSWER, REFERENCE_ANSWER, A_BETTER, B_BETTER, FOLLOW_UP,
          FOLLOW_UP_ANSWER]


def tiny_model(family: str = "qwen2_5_vl", seed: int = 0) -> tuple[ExplainableVLM, LoupeProcessor]:
    """A fresh tiny model and its Loupe processor (low-level branch at 64 px)."""
    model, processor = new_model(f"scratch:test:{family}", corpus=CORPUS, seed=seed, lowlevel_max_side=64,
                                 lowlevel_width=8, decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64)
    return model, LoupeProcessor.for_model(model, processor)


def chat(task: str, answer: str, n_images: int = 1, detail: bool = False, reference: bool = False) -> list[dict]:
    roles = (["reference"] if reference else []) + ["A", "B"][:n_images]
    return [{"role": "user", "content": user_content(roles, canonical_question(task, detail, reference))},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def two_turn_chat() -> list[dict]:
    """A quality assessment of the noisy image, then a follow-up question and its answer."""
    return chat("quality.assess", QUALITY_ANSWER) + [
        {"role": "user", "content": [{"type": "text", "text": FOLLOW_UP}]},
        {"role": "assistant", "content": [{"type": "text", "text": FOLLOW_UP_ANSWER}]}]


def _forgery_items(lp: LoupeProcessor, detail: bool = False) -> list:
    return [lp.encode(chat("forgery.detect", TAMPERED_ANSWER, detail=detail), [ASSETS / "tampered.png"], train=True,
                      masks=[ASSETS / "tampered_mask.png"]),
            lp.encode(chat("forgery.detect", AUTHENTIC_ANSWER, detail=detail), [ASSETS / "clean.png"], train=True)]


def training_batch(lp: LoupeProcessor) -> dict:
    """Three examples: noisy -> poor; tampered -> mask; clean -> authentic."""
    quality = lp.encode(chat("quality.assess", QUALITY_ANSWER), [ASSETS / "noisy.png"], train=True)
    return lp.collate([quality] + _forgery_items(lp))


def checkpoint_batch(lp: LoupeProcessor) -> dict:
    """``training_batch`` plus the two forgery examples asked with the detailed question (what
    ``Assistant.detect_forgery`` asks by default), a comparison of clean and noisy in both orders (so
    the A/B verdict, the swapped order and their average are real), an assessment against a
    reference, and a two-turn chat."""
    clean, noisy = ASSETS / "clean.png", ASSETS / "noisy.png"
    quality = lp.encode(chat("quality.assess", QUALITY_ANSWER), [noisy], train=True)
    compare = [lp.encode(chat("quality.rate", A_BETTER, n_images=2), [clean, noisy], train=True),
               lp.encode(chat("quality.rate", B_BETTER, n_images=2), [noisy, clean], train=True)]
    reference = lp.encode(chat("quality.assess", REFERENCE_ANSWER, reference=True), [clean, noisy], train=True,
                          mask_image=1)
    follow_up = lp.encode(two_turn_chat(), [noisy], train=True)
    return lp.collate([quality] + _forgery_items(lp) + _forgery_items(lp, detail=True) + compare
                      + [reference, follow_up])


def overfit(model: ExplainableVLM, batch: dict, steps: int, lr: float = 3e-3) -> list[dict]:
    """Plain AdamW steps on one batch; returns the loss parts per step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    history = []
    for _ in range(steps):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({"loss": out.loss.item(), "ce": out.ce_loss.item(),
                        "mask": (2 * out.bce_loss + 0.5 * out.dice_loss).item()})
    model.eval()
    return history


def build_tiny_checkpoint(path: Path, family: str = "qwen2_5_vl", steps: int = 160) -> Path:
    """Overfit a tiny model on the examples of ``checkpoint_batch`` and save it as a Loupe checkpoint at ``path``."""
    torch.manual_seed(0)
    model, lp = tiny_model(family)
    overfit(model, checkpoint_batch(lp), steps)
    model.config.name = "tiny-test"
    model.save_pretrained(path, processor=lp.processor)
    return path


def load_benchmark(name: str):
    """A ``benchmarks/`` script as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
