"""Two real training processes on the CPU (DDP through accelerate, started by torchrun), no code changes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_cpu_processes_train_together(dataset, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "loupe_vlm.finetune.train", "--config", str(ROOT / "finetune/recipes/tiny-smoke.yaml"),
           "--data", str(dataset), "--output", str(out), "--max_steps", "2", "--save_every", "2",
           "--eval_every", "0", "--batch_size", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("split") != "val"] == [1, 2]
    trainer = out / "checkpoints" / "step-0000002" / "trainer"
    assert (trainer / "rng-0.pt").is_file() and (trainer / "rng-1.pt").is_file()
    assert json.loads((trainer / "state.json").read_text())["processes"] == 2
    training = json.loads((out / "loupe_config.json").read_text())["training"]
    assert training["processes"] == 2 and training["steps"] == 2
