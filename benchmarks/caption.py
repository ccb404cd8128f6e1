"""Benchmark `loupe caption`: images/s at batch sizes 1, 4, 8 vs a plain loop of ``Assistant.assess``.

All configurations run in one process on one loaded model, interleaved round by round (loop, bs1,
bs4, bs8, loop, ...), so a machine shared with other jobs slows them alike; the table reports the
median over rounds and each round's speed-up. Peak RSS is the process's high-water mark.

    .venv/bin/python benchmarks/caption.py                          # the embedded default model (loupe-smol)
    .venv/bin/python benchmarks/caption.py --model /tmp/tiny-ckpt   # any checkpoint
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from loupe_vlm.assistant.caption import caption_items, items_from_paths  # noqa: E402
from loupe_vlm.assistant.inference import Assistant  # noqa: E402

SIZES = ((128, 96), (96, 128), (160, 120), (128, 128))


def make_images(folder: Path, n: int) -> list[Path]:
    """``n`` crops of scikit-image's sample photos at a few sizes (a real folder mixes sizes)."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = SIZES[i % len(SIZES)]
        y, x = (i * 37) % (photo.shape[0] - 2 * h), (i * 53) % (photo.shape[1] - 2 * w)
        crop = Image.fromarray(photo[y:y + 2 * h, x:x + 2 * w]).resize((w, h), Image.BICUBIC)
        paths.append(folder / f"img_{i:04d}.png")
        crop.save(paths[-1])
    return paths


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="checkpoint folder (default: the embedded default model)")
    p.add_argument("--n", type=int, default=48, help="images per configuration (default: 48)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--task", default="quality", choices=("quality", "forgery"))
    p.add_argument("--workers", type=int, default=2, help="decode threads for caption (default: 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    assistant = Assistant.from_pretrained(args.model, device=args.device)
    rss_loaded = peak_rss_mib()
    work = Path(tempfile.mkdtemp(prefix="loupe-caption-bench-"))
    paths = make_images(work / "images", args.n)
    single = assistant.assess if args.task == "quality" else assistant.detect_forgery
    single(paths[0])  # warm-up: first-call allocations are not what we measure

    speeds: dict[str, list[float]] = {"loop": [], **{f"bs{b}": [] for b in sizes}}
    rss: dict[str, float] = {}
    load = os.getloadavg()[0]
    for _ in range(args.rounds):
        t = time.perf_counter()
        for path in paths:
            single(path)
        speeds["loop"].append(len(paths) / (time.perf_counter() - t))
        rss["loop"] = peak_rss_mib()
        for b in sizes:
            items = items_from_paths([(q, q.parent) for q in paths], args.task, False)
            t = time.perf_counter()
            s = caption_items(assistant, items, work / f"bs{b}.jsonl", batch_size=b, workers=args.workers,
                              overwrite=True, progress=False)
            speeds[f"bs{b}"].append(len(paths) / (time.perf_counter() - t))
            assert s.ok == len(paths), f"{len(paths) - s.ok} images failed: {s.errors}"
            rss[f"bs{b}"] = peak_rss_mib()
    loop = statistics.median(speeds["loop"])
    rows = []
    for key, vals in speeds.items():
        ratios = [v / lp for v, lp in zip(vals, speeds["loop"])]
        rows.append({"config": key, "images_per_s": round(statistics.median(vals), 2),
                     "vs_loop": round(statistics.median(vals) / loop, 2),
                     "per_round_vs_loop": [round(r, 2) for r in ratios], "peak_rss_mib": round(rss[key], 1)})
    meta = {"model": assistant.name, "task": args.task, "n": args.n, "rounds": args.rounds,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_start": round(load, 2), "load_avg_end": round(os.getloadavg()[0], 2),
            "rss_after_load_mib": round(rss_loaded, 1)}
    print(json.dumps(meta))
    print(f"\n| config | images/s | x loop | per round | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['images_per_s']} | {r['vs_loop']} | {r['per_round_vs_loop']} | {r['peak_rss_mib']} |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
