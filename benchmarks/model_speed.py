"""Two Loupe checkpoints side by side: the speed targets of a 448 px image on the CPU, in one run.

    python benchmarks/model_speed.py                                      # the default model (loupe-smol) vs loupe-tiny
    python benchmarks/model_speed.py --models CKPT_A CKPT_B --threads 1
    python benchmarks/model_speed.py --models CKPT_A CKPT_B --skip-ask --skip-caption --json speed.json
    python benchmarks/model_speed.py --models M M --lm-precision fp16 fp32 --skip-ask --skip-caption

Measures, for each model, in this order:

1. brief quality answer: ``Assistant.assess(img)``, in this process;
2. forgery with mask: ``Assistant.detect_forgery(img)``, in this process (the note under the table says
   whether the model did produce a mask: an "authentic" answer decodes none);
3. ``loupe caption --task quality --batch-size 8`` in a subprocess, over a folder of N images
   (``--caption-images``, default 16) made from ``tests/assets`` (each a slightly different crop, resized
   to SIZE x SIZE). The figure held against the target is the *steady* throughput
   (N - K) / (T_N - T_K), where T_K is a run over the first K images of the same set, with K = the batch
   size when N >= 2 x batch, else 1: the difference cancels interpreter start, imports and model load,
   and with K = 8 it is whole batches of 8. Two more rows for reference: N / T_N (everything included)
   and the rate ``loupe caption`` prints itself (model load excluded, its first batch included);
4. the first answer of ``loupe ask IMAGE --device cpu`` in a subprocess, wall clock from start to exit:
   "first use" with ``LOUPE_CACHE`` pointing at a new empty folder (a checkpoint on a packaged base
   converts it there, 15-20 s on 2 cores, and writes its merged LM copy; a bundled base converts
   nothing, the note says which happened), then "after" with that same cache.

The image is ``tests/assets/tampered.png`` resized to SIZE x SIZE, as in ``benchmarks/core_speed.py``.
The in-process figures are the median of ``--repeats`` runs after one warm-up per model; the
subprocess figures are the median of ``--cli-repeats`` runs (caption: after one untimed warm-up run
per model). Models are interleaved (A B A B ...) so that load from other users of the machine hits
both alike; the ratio A/B of the same run is the figure to read on a shared machine. All but the
first-use ask use one private ``LOUPE_CACHE`` in a temporary folder (converted once, untimed, when
the models are loaded), so the user's own cache is neither read nor written. ``--threads`` sets
torch's threads here, ``--threads`` of ``loupe caption`` and ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
of every subprocess (``loupe ask`` has no threads flag).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from PIL import Image, ImageFilter  # noqa: E402

from loupe_vlm.assistant import lm_precision  # noqa: E402

ASSETS = REPO / "tests" / "assets"
TARGETS = {  # name -> (comparison, value, unit)
    "brief": ("<=", 1.5, "s"),
    "forgery": ("<=", 4.0, "s"),
    "caption": (">=", 2.0, "images/s"),
    "ask_first": ("<=", 20.0, "s"),
    "ask_after": ("<=", 8.0, "s"),
}


def interleaved_medians(fns: list, repeats: int) -> list[tuple[float, list[float]]]:
    """``core_speed.median_time`` for several functions at once: one warm-up call each, then ``repeats``
    rounds of one timed call each in turn (A B A B ...); per function (median, all times)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), t) for t in times]


def check_model(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise SystemExit(f"model_speed.py: model folder {path!r} does not exist (or is not a folder)")
    if not (p / "loupe_config.json").is_file():
        raise SystemExit(f"model_speed.py: {path!r} is not a Loupe checkpoint folder (no loupe_config.json in it)")
    return p.resolve()


def model_base(path: Path) -> str:
    base = json.loads((path / "loupe_config.json").read_text()).get("base", "bundled")
    return "bundled" if (path / "base").is_dir() else str(base)


def bench_image(size: int) -> Image.Image:
    img = Image.open(ASSETS / "tampered.png").convert("RGB")
    return img.resize((size, size)) if size else img


def caption_images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` PNGs at size x size: the test assets in turn (masks left out), each a crop shifted by its
    index so that no two files are the same."""
    sources = [Image.open(p).convert("RGB") for p in sorted(ASSETS.glob("*.png")) if "mask" not in p.stem]
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        src = sources[i % len(sources)]
        w, h = src.size
        d = (i // len(sources)) % max(1, min(w, h) // 8)
        img = src.crop((d, d, w - d, h - d)).resize((size, size), Image.BICUBIC)
        path = folder / f"img{i:04d}.png"
        img.save(path)
        paths.append(path)
    return paths


def subprocess_env(threads: int, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), LOUPE_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Wall-clock seconds of ``python -m loupe_vlm ARGS`` and its stdout; a clear error if it fails."""
    cmd = [sys.executable, "-m", "loupe_vlm", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"model_speed.py: `{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                         f"{(proc.stdout + proc.stderr)[-2000:]}")
    return seconds, proc.stdout


def caption_run(model: Path, folder: Path, n: int, out: Path, batch: int, threads: int, env: dict[str, str],
                cwd: Path, precision: str | None = None) -> tuple[float, float | None]:
    """(wall seconds, the rate ``loupe caption`` printed) of one fresh run over ``folder``."""
    seconds, stdout = run_cli(["caption", str(folder), "--task", "quality", "--batch-size", str(batch),
                               "--threads", str(threads), "--device", "cpu", "--model", str(model),
                               "--out", str(out), "--overwrite", "--no-progress",
                               *(["--lm-precision", precision] if precision else [])], env, cwd)
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    bad = [r.get("id") for r in records if r.get("error")]
    if len(records) != n or bad:
        raise SystemExit(f"model_speed.py: loupe caption with {model} wrote {len(records)} record(s) for {n} "
                         f"images, errors for {bad}:\n{stdout[-1000:]}")
    m = re.search(r"\(([0-9.]+) items/s\)", stdout)
    return seconds, float(m.group(1)) if m else None


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    return f"{value:.2f} {unit}"


def meets(key: str | None, value: float | None) -> bool | None:
    if key is None or value is None:
        return None
    op, limit, _ = TARGETS[key]
    return value <= limit if op == "<=" else value >= limit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs=2, metavar=("A", "B"),
                   help="two checkpoint folders (default: the embedded default model and assistant/weights/loupe-tiny)")
    p.add_argument("--size", type=int, default=448, help="image side in pixels (default: 448)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model in this process (default: 5)")
    p.add_argument("--cli-repeats", type=int, default=3, help="timed subprocess runs per model and case (default: 3)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads, here and in the subprocesses (default: 2)")
    p.add_argument("--caption-images", type=int, default=16, metavar="N", help="images for loupe caption (default: 16)")
    p.add_argument("--caption-batch", type=int, default=8, help="loupe caption --batch-size (default: 8)")
    p.add_argument("--skip-ask", action="store_true", help="leave out the loupe ask timings")
    p.add_argument("--skip-caption", action="store_true", help="leave out the loupe caption timings")
    p.add_argument("--lm-precision", nargs=2, metavar=("PA", "PB"), default=None, choices=lm_precision.CHOICES,
                   help="--lm-precision of models A and B (auto, fp16 or fp32; default: each command's own: auto "
                        "in process and for caption, fp32 for ask). "
                        "`--models M M --lm-precision fp16 fp32` times one model both ways")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    if args.caption_images < 2 and not args.skip_caption:
        p.error("--caption-images must be at least 2 (the steady rate is a difference of two runs)")
    if min(args.repeats, args.cli_repeats, args.threads, args.caption_batch) < 1:
        p.error("--repeats, --cli-repeats, --threads and --caption-batch must be at least 1")

    import torch

    from loupe_vlm.assistant.inference import DEFAULT_MODEL_DIR, Assistant

    paths = [check_model(m) for m in (args.models or [str(DEFAULT_MODEL_DIR),
                                                      str(REPO / "assistant" / "weights" / "loupe-tiny")])]
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    notes: list[str] = []

    def row(name: str, key: str | None, unit: str, a: float | None, b: float | None, runs_a=None, runs_b=None):
        rows.append({"measurement": name, "target_key": key, "unit": unit, "a": a, "b": b,
                     "ratio": a / b if a is not None and b else None, "runs_a": runs_a, "runs_b": runs_b,
                     "target": None if key is None else f"{TARGETS[key][0]} {TARGETS[key][1]} {TARGETS[key][2]}",
                     "a_meets": meets(key, a), "b_meets": meets(key, b)})

    with tempfile.TemporaryDirectory(prefix="loupe-model-speed-") as tmp_name:
        tmp = Path(tmp_name)
        cache = tmp / "cache"
        os.environ["LOUPE_CACHE"] = str(cache)  # the in-process loads share the subprocesses' private cache
        env = subprocess_env(args.threads, cache)

        # ---- in process: brief assess, forgery with mask ----
        precs = args.lm_precision or [None, None]  # None: the command's own default
        assistants = [Assistant.from_pretrained(path, device="cpu", lm_precision=pr or "auto")
                      for path, pr in zip(paths, precs)]
        names = [a.name for a in assistants]
        img = bench_image(args.size)
        (ma, ra), (mb, rb) = interleaved_medians([lambda a=a: a.assess(img) for a in assistants], args.repeats)
        row(f"brief quality answer, `assess` (median of {args.repeats})", "brief", "s", ma, mb, ra, rb)
        # the same against a reference (a blurred copy judged against the image): a model that ships
        # reference.safetensors also measures the pair (assistant/reference.py)
        blurred = img.filter(ImageFilter.GaussianBlur(2))
        (ma, ra), (mb, rb) = interleaved_medians([lambda a=a: a.assess(blurred, reference=img) for a in assistants],
                                                 args.repeats)
        row(f"brief quality answer against a reference, `assess(image, reference=...)` (median of {args.repeats})",
            "brief", "s", ma, mb, ra, rb)
        (ma, ra), (mb, rb) = interleaved_medians([lambda a=a: a.detect_forgery(img) for a in assistants],
                                                 args.repeats)
        row(f"forgery with mask, `detect_forgery` (median of {args.repeats})", "forgery", "s", ma, mb, ra, rb)
        for label, a in zip("AB", assistants):
            f = a.detect_forgery(img).forgery
            regions = f.regions if f is not None else 0
            notes.append(f"forgery, model {label}: " + (f"mask decoded ({regions} region(s))" if regions else
                         "no mask decoded (the answer had no mask token), so the time holds no mask decoding"))
        del assistants

        # ---- loupe caption: steady throughput at batch 8 ----
        if not args.skip_caption:
            n, batch = args.caption_images, args.caption_batch
            k = batch if n >= 2 * batch else 1
            all_imgs = caption_images(tmp / "caption" / "all", n, args.size)
            base_dir = tmp / "caption" / "base"
            base_dir.mkdir()
            for src in all_imgs[:k]:
                shutil.copy(src, base_dir / src.name)
            outs = tmp / "caption" / "out"
            outs.mkdir()
            for i, path in enumerate(paths):  # warm-up: OS file cache, packaged-base conversion
                caption_run(path, base_dir, k, outs / f"warm{i}.jsonl", batch, args.threads, env, tmp, precs[i])
            t_n: list[list[float]] = [[], []]
            t_k: list[list[float]] = [[], []]
            own: list[list[float]] = [[], []]
            for r in range(args.cli_repeats):
                for i, path in enumerate(paths):
                    s, rate = caption_run(path, tmp / "caption" / "all", n, outs / f"n{i}-{r}.jsonl", batch,
                                          args.threads, env, tmp, precs[i])
                    t_n[i].append(s)
                    if rate is not None:
                        own[i].append(rate)
                for i, path in enumerate(paths):
                    t_k[i].append(caption_run(path, base_dir, k, outs / f"k{i}-{r}.jsonl", batch, args.threads,
                                              env, tmp, precs[i])[0])
            steady, whole = [], []
            for i in range(2):
                d = statistics.median(t_n[i]) - statistics.median(t_k[i])
                steady.append((n - k) / d if d > 0 else None)
                whole.append(n / statistics.median(t_n[i]))
            row(f"`loupe caption --task quality`, batch {batch}: steady, (N−K)/(T_N−T_K), N={n}, K={k}",
                "caption", "images/s", steady[0], steady[1],
                {"T_N": t_n[0], "T_K": t_k[0]}, {"T_N": t_n[1], "T_K": t_k[1]})
            row("`loupe caption`: whole run, N/T_N (start, imports, model load included)", None, "images/s",
                whole[0], whole[1])
            row("`loupe caption`: the rate it prints (model load excluded)", None, "images/s",
                statistics.median(own[0]) if own[0] else None, statistics.median(own[1]) if own[1] else None)
            if k == 1:
                notes.append(f"caption: N={n} < 2 x batch {batch}, so K=1 and the steady rate is not whole "
                             f"batches of {batch}; use --caption-images {2 * batch} or more for the target")
            elif (n - k) % batch:
                notes.append(f"caption: N−K={n - k} is not a multiple of {batch}: the last batch is partial")
            if any(s is None for s in steady):
                notes.append("caption: T_N <= T_K for a model (noise larger than the work); raise --caption-images")

        # ---- loupe ask: first answer, first use and after ----
        if not args.skip_ask:
            ask_img = tmp / "ask.png"
            img.save(ask_img)
            first: list[list[float]] = [[], []]
            after: list[list[float]] = [[], []]
            converted = [False, False]
            for r in range(args.cli_repeats):
                caches = [tmp / f"ask-cache-{i}-{r}" for i in range(2)]
                for i, path in enumerate(paths):
                    caches[i].mkdir()
                    first[i].append(run_cli(["ask", str(ask_img), "--device", "cpu", "--model", str(path),
                                             *(["--lm-precision", precs[i]] if precs[i] else [])],
                                            subprocess_env(args.threads, caches[i]), tmp)[0])
                    converted[i] = converted[i] or any((caches[i] / "bases").glob("*"))
                for i, path in enumerate(paths):
                    after[i].append(run_cli(["ask", str(ask_img), "--device", "cpu", "--model", str(path),
                                             *(["--lm-precision", precs[i]] if precs[i] else [])],
                                            subprocess_env(args.threads, caches[i]), tmp)[0])
            row(f"`loupe ask` first answer, first use (empty LOUPE_CACHE; median of {args.cli_repeats})",
                "ask_first", "s", statistics.median(first[0]), statistics.median(first[1]), first[0], first[1])
            row(f"`loupe ask` first answer, after (same cache; median of {args.cli_repeats})", "ask_after", "s",
                statistics.median(after[0]), statistics.median(after[1]), after[0], after[1])
            for label, i in (("A", 0), ("B", 1)):
                notes.append(f"ask, model {label} (base: {model_base(paths[i])}): first use "
                             + ("converted a packaged base into the empty cache" if converted[i]
                                else "converted nothing (the cache stayed empty), so it differs from 'after' "
                                     "only by cold OS caches"))

    same = paths[0] == paths[1]
    print(f"A: {names[0]}  ({paths[0]})")
    print(f"B: {names[1]}  ({paths[1]})" + ("  [the same folder as A: an A/A run, the ratios show the noise]"
                                            if same else ""))
    print(f"image {args.size}x{args.size}, CPU, {args.threads} thread(s), torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| measurement | model A | model B | A/B | target |")
    print("|---|---|---|---|---|")
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}"
        target = "—"
        if r["target"]:
            ok = {True: "yes", False: "NO", None: "?"}
            op, limit, unit = TARGETS[r["target_key"]]
            target = f"{'≤' if op == '<=' else '≥'} {limit:g} {unit} (A {ok[r['a_meets']]}, B {ok[r['b_meets']]})"
        print(f"| {r['measurement']} | {fmt(r['a'], r['unit'])} | {fmt(r['b'], r['unit'])} | {ratio} | {target} |")
    print()
    print("A/B > 1: A takes longer (seconds) or gets through more (images/s).")
    for note in notes:
        print(f"- {note}")
    if args.json:
        args.json.write_text(json.dumps({
            "models": {"A": {"path": str(paths[0]), "name": names[0]}, "B": {"path": str(paths[1]), "name": names[1]}},
            "settings": {"size": args.size, "repeats": args.repeats, "cli_repeats": args.cli_repeats,
                         "threads": args.threads, "caption_images": args.caption_images,
                         "caption_batch": args.caption_batch, "device": "cpu", "torch": torch.__version__,
                         "load_average_end": os.getloadavg()[0]},
            "measurements": rows, "notes": notes}, indent=2) + "\n")
        print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
