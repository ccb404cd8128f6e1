"""A quality test set whose corruptions come from other code than Loupe's builders.

Loupe's quality data is made by ``data_builders/distortions.py``; a model can learn that code's
fingerprints instead of the distortion. This script takes the clean reference views of a built quality
dataset's test split (held-out photos), keeps those from the chosen photo sources, and corrupts each with
plain Pillow, OpenCV and scikit-image calls at one clearly visible strength, one per distortion category,
plus the clean view itself. It writes a ``quality.identify`` dataset (``test.jsonl`` in the Sample format,
PNG images, a ``card.md``) that ``loupe eval`` and ``benchmarks/lowlevel_probe.py`` read like any other:

    python benchmarks/external_corruptions.py --data data/loupe-smol/quality --out data/external \\
        --sources gcompris-qt-data palapeli-data opencv-doc
    loupe eval --data data/external/test.jsonl --out runs/external

``--split val`` corrupts the validation split's photos instead (``val.jsonl``), for choosing settings without
looking at the test photos.

Only ``quality.category_accuracy`` (single-distortion items) and ``quality.clean_accuracy`` mean
anything here: each corruption is given severity 3 by convention, so severity figures do not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageEnhance
from skimage import exposure, util
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loupe_vlm.prompts import CATEGORIES, load_jsonl  # noqa: E402
from loupe_vlm.prompts.templates import canonical_question, user_content  # noqa: E402


def _pil(f):
    return lambda a, rng: np.asarray(f(Image.fromarray(a)).convert("RGB"))


def _jpeg(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", a[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 8])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]


def _pixelate(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = a.shape[:2]
    small = Image.fromarray(a).resize((max(1, w // 8), max(1, h // 8)), Image.Resampling.BOX)
    return np.asarray(small.resize((w, h), Image.Resampling.NEAREST))


def _float(f):
    return lambda a, rng: (np.clip(f(a.astype(np.float64) / 255.0, rng), 0, 1) * 255).round().astype(np.uint8)


def _unsharp(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    soft = cv2.GaussianBlur(a, (0, 0), 2.0)
    return cv2.addWeighted(a, 4.0, soft, -3.0, 0)


# category -> a corruption made by a library call, at a strength meant to be plainly visible
CORRUPTIONS = {
    "blur": ("cv2.GaussianBlur sigma 2.5", lambda a, rng: cv2.GaussianBlur(a, (0, 0), 2.5)),
    "compression": ("cv2.imencode JPEG quality 8", _jpeg),
    "noise": ("skimage.util.random_noise gaussian var 0.012",
              _float(lambda x, rng: util.random_noise(x, mode="gaussian", var=0.012,
                                                      rng=int(rng.integers(1 << 31))))),
    "pixelate": ("PIL resize 1/8 BOX then NEAREST", _pixelate),
    "darken": ("skimage.exposure.adjust_gamma 2.2", _float(lambda x, rng: exposure.adjust_gamma(x, 2.2))),
    "brighten": ("skimage.exposure.adjust_gamma 0.4", _float(lambda x, rng: exposure.adjust_gamma(x, 0.4))),
    "contrast_weaken": ("PIL ImageEnhance.Contrast 0.4", _pil(lambda im: ImageEnhance.Contrast(im).enhance(0.4))),
    "contrast_strengthen": ("PIL ImageEnhance.Contrast 2.2",
                            _pil(lambda im: ImageEnhance.Contrast(im).enhance(2.2))),
    "saturate_weaken": ("PIL ImageEnhance.Color 0.15", _pil(lambda im: ImageEnhance.Color(im).enhance(0.15))),
    "saturate_strengthen": ("PIL ImageEnhance.Color 2.8", _pil(lambda im: ImageEnhance.Color(im).enhance(2.8))),
    "oversharpen": ("cv2 unsharp mask, amount 3, sigma 2", _unsharp),
    "quantization": ("PIL Image.quantize 6 colours",
                     _pil(lambda im: im.quantize(colors=6, dither=Image.Dither.NONE))),
}
assert set(CORRUPTIONS) == set(CATEGORIES.ids), "one corruption per taxonomy category"


def reference_views(test: Path, sources: list[str]) -> dict[str, str]:
    """The clean reference views of a split's records from ``sources`` (all where empty): view -> source photo,
    in first-seen order."""
    if not test.is_file():
        raise SystemExit(f"{test}: not found; --data must be a quality dataset built by `loupe build-data quality`")
    refs: dict[str, str] = {}
    for s in load_jsonl(test):
        photo = (s.meta or {}).get("source_photo", "")
        if sources and photo.split(":")[0] not in sources:
            continue
        for rel, role in zip(s.images, s.image_roles):
            if role == "reference":
                refs.setdefault(rel, photo)
    return refs


def build(data: Path, out: Path, sources: list[str], seed: int, split: str = "test") -> dict:
    test = data / f"{split}.jsonl"
    refs = reference_views(test, sources)
    if not refs:
        raise SystemExit(f"{test}: no reference views from sources {sources}; pick others with --sources")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    question = canonical_question("quality.identify", False, False)
    lines = []
    for k, (rel, photo) in enumerate(tqdm(sorted(refs.items()), desc="photos")):
        img = np.asarray(Image.open(data / rel).convert("RGB"))
        for cat in ["clean", *CORRUPTIONS]:
            arr = img if cat == "clean" else CORRUPTIONS[cat][1](img, rng)
            name = f"images/{k:04d}-{cat}.png" if split == "test" else f"images/{split}-{k:04d}-{cat}.png"
            Image.fromarray(np.ascontiguousarray(arr)).save(out / name)
            ds = [] if cat == "clean" else [{"name": cat, "category": cat, "severity": 3}]
            answer = ("There is no visible distortion in the image." if cat == "clean" else
                      f"The image shows evident {next(t for t in CATEGORIES if t.id == cat).phrasings[0]}.")
            lines.append({"id": f"x-{k:04d}-{cat}", "task": "quality.identify", "images": [name], "image_roles": ["A"],
                          "messages": [{"role": "user", "content": user_content(["A"], question)},
                                       {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                          "masks": [], "meta": {"distortions": ds, "clean": cat == "clean", "source": photo,
                                                "source_photo": photo, "detail": "brief", "reference": False,
                                                "corruption": "none" if cat == "clean" else CORRUPTIONS[cat][0]}})
    tmp = out / f"{split}.jsonl.tmp"
    tmp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    tmp.replace(out / f"{split}.jsonl")
    rows = "\n".join(f"| {c} | {d} |" for c, (d, _) in CORRUPTIONS.items())
    (out / ("card.md" if split == "test" else f"card-{split}.md")).write_text(
        f"# External corruptions (benchmarks/external_corruptions.py)\n\n"
        f"- from: `{test}`, its clean reference views from sources {', '.join(sources) or 'all'}\n"
        f"- photos: {len(refs)}; samples: {len(lines)} (each photo clean and once per category); seed {seed}\n"
        f"- the photos keep their pool's licences (see the source dataset's card)\n\n"
        f"| category | corruption |\n|---|---|\n{rows}\n")
    return {"photos": len(refs), "samples": len(lines)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a quality dataset folder (its test.jsonl is read)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="which split's photos to corrupt: test (held out: report) or val (to choose settings "
                        "on, without looking at test); the output is SPLIT.jsonl")
    p.add_argument("--out", type=Path, help="output dataset folder (required unless --check)")
    p.add_argument("--sources", nargs="*", default=[], help="photo sources to keep (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 0 if the split has reference views from --sources, else 1 "
                        "(make loupe-smol skips the set when a small test split has none)")
    args = p.parse_args(argv)
    if args.check:
        refs = reference_views(args.data / f"{args.split}.jsonl", args.sources)
        print(f"{len(refs)} reference views from sources {args.sources or 'all'}")
        return 0 if refs else 1
    if args.out is None:
        p.error("--out is required (or give --check)")
    print(json.dumps(build(args.data, args.out, args.sources, args.seed, args.split)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
