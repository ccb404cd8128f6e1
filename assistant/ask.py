"""``loupe ask``: one question about one or two images, answered in plain words or as a JSON record."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from . import lm_precision
from .inference import GUIDANCE_HELP, MODEL_HELP, Assistant, Request
from .processing import ImageError, load_image

TASK_CHOICES = ("auto", "quality", "identify", "compare", "forgery")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loupe ask",
        description="Ask Loupe about an image (or a pair). Without --task, one image gets a quality "
                    "assessment and two images a comparison; a question mentioning tampering, editing "
                    "or forgery runs forgery detection.",
        epilog="examples:\n  loupe ask photo.png\n  loupe ask a.png b.png --detail\n"
               "  loupe ask photo.png \"Has this been tampered with?\" --mask-out mask.png --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="one image, or two (A then B) to compare; a last argument that is not a file is the question")
    p.add_argument("--reference", metavar="R", help="a pristine reference image (quality tasks)")
    p.add_argument("--task", choices=TASK_CHOICES, default="auto", help="what to do (default: auto)")
    p.add_argument("--detail", action="store_true", help="a detailed answer instead of a brief one")
    p.add_argument("--model", metavar="M", help=MODEL_HELP)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto: the GPU if there is one, else the CPU)")
    p.add_argument("--json", action="store_true", help="print the result record of DESIGN.md as JSON")
    p.add_argument("--mask-out", metavar="PNG", help="save the forgery mask (255 = tampered) to this PNG")
    p.add_argument("--max-new-tokens", type=int, default=160, help="answer length cap (default: 160)")
    p.add_argument("--evidence-guidance", type=float, metavar="S", help=GUIDANCE_HELP)
    p.add_argument("--lm-precision", choices=lm_precision.CHOICES, default="fp32",
                   help="weights of the language model while answering: fp32 (default here: packing the fp16 "
                        "copies costs about 2 s at load, more than one brief answer gains), fp16 or auto (the "
                        "fbgemm-packed fp16 weights that caption, demo and serve use on a CPU, about 2x faster "
                        "per token: worth it for a forgery or detailed answer; assistant/lm_precision.py)")
    return p


def _split_question(items: list[str]) -> tuple[list[str], str | None]:
    from pathlib import Path

    if len(items) > 1 and not Path(items[-1]).exists() and (" " in items[-1] or items[-1].endswith("?")):
        return items[:-1], items[-1]
    return items, None


def _pick_task(task: str, n_images: int, question: str | None) -> str:
    if task == "auto":
        q = (question or "").lower()
        if any(w in q for w in ("tamper", "forg", "edited", "manipulat", "fake", "authentic", "splice")):
            return "forgery.detect"
        return "quality.compare" if n_images == 2 else "quality.assess"
    return {"quality": "quality.assess", "identify": "quality.identify", "compare": "quality.compare",
            "forgery": "forgery.detect"}[task]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    images, question = _split_question(args.images)
    if len(images) > 2:
        print(f"loupe ask: give one or two images, got {len(images)}", file=sys.stderr)
        return 2
    task = _pick_task(args.task, len(images), question)
    if task == "quality.compare" and not args.detail:
        task = "quality.rate"
    if task in ("quality.compare", "quality.rate") and len(images) != 2:
        print("loupe ask: a comparison needs two images, A then B", file=sys.stderr)
        return 2
    if task not in ("quality.compare", "quality.rate") and len(images) != 1:
        print(f"loupe ask: task {task} takes one image; for two use --task compare", file=sys.stderr)
        return 2
    if task == "forgery.detect" and args.reference:
        print("loupe ask: forgery detection takes no reference image", file=sys.stderr)
        return 2
    # the images are checked (exist, open, decode) before the model is loaded, which takes seconds
    for src in ([args.reference] if args.reference else []) + images:
        try:
            load_image(src)
        except ImageError as exc:
            print(f"loupe ask: {exc}", file=sys.stderr)
            return 1
    try:
        assistant = Assistant.from_pretrained(args.model, device=args.device, max_new_tokens=args.max_new_tokens,
                                              evidence_guidance=args.evidence_guidance,
                                              lm_precision=args.lm_precision)
    except (FileNotFoundError, RuntimeError, ValueError) as exc:
        print(f"loupe ask: {exc}", file=sys.stderr)
        return 2
    roles = (["reference"] if args.reference else []) + (["A", "B"] if len(images) == 2 else ["A"])
    all_images = ([args.reference] if args.reference else []) + images
    errors: dict = {}
    result = assistant.run([Request(task, all_images, roles, question=question, detail=args.detail)],
                           errors=errors)[0]
    if errors:
        exc = errors[0]
        print(f"loupe ask: {exc}" if isinstance(exc, ImageError) else f"loupe ask: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1
    mask_path = None
    if args.mask_out and result.forgery is not None and result.forgery.mask is not None:
        from PIL import Image

        Image.fromarray(result.forgery.mask.astype(np.uint8) * 255).save(args.mask_out)
        mask_path = args.mask_out
    if args.json:
        print(json.dumps(result.to_record(mask_path), indent=2))
        return 0
    print(result.text)
    facts = []
    if result.quality and result.quality.score is not None:
        facts.append(f"rating: {result.quality.rating} (score {result.quality.score:.2f} of 5)")
    if result.comparison and result.comparison.better:
        facts.append(f"better: {result.comparison.better} (p={result.comparison.probability:.2f})")
    if result.forgery and result.forgery.probability is not None:
        facts.append(f"P(tampered) = {result.forgery.probability:.2f}")
        if result.forgery.area is not None:
            facts.append(f"mask area {result.forgery.area:.1%}" + (f" -> {mask_path}" if mask_path else ""))
    if result.confidence is not None:
        facts.append(f"confidence {result.confidence:.2f}")
    if facts:
        print("[" + "; ".join(facts) + "]")
    return 0
