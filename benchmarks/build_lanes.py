"""Two of the build's steps at once on 2 cores, against one after the other: the evidence for the two lanes
of ``finetune/recipes/build-loupe-smol.sh``.

    .venv/bin/python benchmarks/build_lanes.py --data DATA/quality DATA/forgery --forensic DATA/forgery-forensic
    .venv/bin/python benchmarks/build_lanes.py ... --steps 30 --forensic-records 1600 --spinning

The two steps are the build's longest: stage 2 (the build script's command, ``--steps`` steps over the
shipped model's heads, ``benchmarks/train_precision.py``'s command in the recipe's precision) and the forensic network (``loupe train
forensic``, one epoch over the first ``--forensic-records`` training records, scored on 64 validation records,
``--dry-run``). Each runs as a whole process, as in the build. The arms:

- ``one after the other``: stage 2 on 2 threads, then the forensic network on 2 threads;
- ``two lanes``: stage 2 on 2 threads beside the forensic network on 1, idle threads sleeping
  (``OMP_WAIT_POLICY=PASSIVE``): the build's stage 2 beside its forensic network;
- ``one thread each``: both on 1 thread (sleeping idle threads): the build's stage 1 and refit beside the
  forensic network;
- with ``--spinning``, also ``two lanes, spinning``: the second arm with OpenMP's default waiting.

It prints each process's wall time (loading included) and the arm's, and the
arm's wall time over the first arm's: below 1, running the two at once saved time. Two processes share the
machine's cores, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train_logits import parse_stage2, stage2_parser  # noqa: E402  (this folder, first on sys.path)
from train_precision import stage2  # noqa: E402

LOUPE = [sys.executable, "-m", "loupe_vlm.cli"]  # the forensic command


def subset(src: Path, dst: Path, n: int, pick=None) -> int:
    """The first ``n`` records of ``src`` (those ``pick`` keeps) written to ``dst`` (same folder: the records'
    image paths are relative to it); how many were written."""
    rows = []
    with open(src, encoding="utf-8") as f:
        for line in f:
            if line.strip() and (pick is None or pick(json.loads(line))):
                rows.append(line if line.endswith("\n") else line + "\n")
            if len(rows) == n:
                break
    dst.write_text("".join(rows), encoding="utf-8")
    return len(rows)


def env(threads: int, policy: str | None) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    e.pop("OMP_WAIT_POLICY", None)
    if policy:
        e["OMP_WAIT_POLICY"] = policy
    return e


def run_arm(jobs: list[tuple[str, list[str], dict]], together: bool, logs: Path) -> dict[str, float]:
    """Wall seconds of each job and of the arm; the jobs run at once when ``together``."""
    t0, times, procs = time.perf_counter(), {}, []

    def finish(name: str, p: subprocess.Popen, start: float, log) -> None:
        times[name] = time.perf_counter() - start
        log.close()
        if p.returncode != 0:
            raise SystemExit(f"{name} failed (exit {p.returncode}); its log: {logs / (name + '.log')}")

    for name, cmd, e in jobs:
        log = open(logs / f"{name}.log", "w")
        start = time.perf_counter()
        p = subprocess.Popen(cmd, env=e, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        procs.append((name, p, start, log))
        if not together:
            p.wait()
            finish(name, p, start, log)
    while len(times) < len(procs):  # each process's own end, whichever ends first
        for name, p, start, log in procs:
            if name not in times and p.poll() is not None:
                finish(name, p, start, log)
        time.sleep(0.2)
    times["arm"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    p = stage2_parser(__doc__)
    p.add_argument("--forensic", type=Path, required=True, help="the forensic network's forgery dataset "
                   "(the build's DATA/forgery-forensic)")
    p.add_argument("--steps", type=int, default=30, help="stage 2's steps in each arm")
    p.add_argument("--forensic-records", type=int, default=1600, help="the forensic network's training records "
                   "(one epoch, batches of 16)")
    p.add_argument("--spinning", action="store_true", help="also the two lanes with spinning idle threads")
    args = parse_stage2(p, argv)
    if not (args.forensic / "train.jsonl").is_file():
        p.error(f"{args.forensic}: no train.jsonl; build it with `loupe build-data forgery` (see the README)")
    # the subsets sit beside the records' images (their paths are relative to the file), under names that
    # say what they are, and go at the end
    train = args.forensic / ".build-lanes-train.jsonl"
    val = args.data[1] / ".build-lanes-val.jsonl"
    try:
        n = subset(args.forensic / "train.jsonl", train, args.forensic_records)
        tampered = subset(args.data[1] / "val.jsonl", val.with_suffix(".t"), 32, lambda r: r["meta"].get("tampered"))
        authentic = subset(args.data[1] / "val.jsonl", val.with_suffix(".a"), 32,
                           lambda r: r["meta"].get("tampered") is False)
        val.write_text(val.with_suffix(".t").read_text() + val.with_suffix(".a").read_text())
        print(f"forensic network: {n} training records, {tampered} + {authentic} validation records; "
              f"stage 2: {args.steps} steps")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)

            def forensic(tag: str) -> list[str]:
                return LOUPE + ["train", "forensic", "--data", str(train), "--val", str(val), "--epochs", "1",
                                "--work", str(tmp / f"forensic-{tag}"), "--dry-run", "--no-progress"]

            arms = [("one after the other", False, [(2, None), (2, None)]),
                    ("two lanes", True, [(2, "PASSIVE"), (1, "PASSIVE")]),
                    ("one thread each", True, [(1, "PASSIVE"), (1, "PASSIVE")])]
            if args.spinning:
                arms.append(("two lanes, spinning", True, [(2, None), (1, None)]))
            rows = []
            for i, (name, together, ((t2, p2), (tf, pf))) in enumerate(arms):
                jobs = [(f"stage2-{i}", stage2(args.data, args.heads, tmp / f"stage2-{i}", args.steps, "auto"),
                         env(t2, p2)),
                        (f"forensic-{i}", forensic(str(i)), env(tf, pf))]
                print(f"{name} ...", flush=True)
                times = run_arm(jobs, together, tmp)
                rows.append((name, f"{t2} + {tf}", times[f"stage2-{i}"], times[f"forensic-{i}"], times["arm"]))
    finally:
        for f in (train, val, val.with_suffix(".t"), val.with_suffix(".a")):
            f.unlink(missing_ok=True)
    print("\n| arm | threads | stage 2 s | forensic s | arm s | arm / one after the other |\n|---|---|---:|---:|---:|---:|")
    for name, threads, s2, fo, arm in rows:
        print(f"| {name} | {threads} | {s2:.0f} | {fo:.0f} | {arm:.0f} | {arm / rows[0][4]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
