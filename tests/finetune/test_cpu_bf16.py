"""bf16 mixed precision on the CPU: chosen only where asked for and the CPU has bf16 instructions; the base
is then loaded in bf16 while everything that trains stays fp32."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from loupe_vlm.finetune import train as train_mod
from loupe_vlm.finetune.train import parse_args, pick_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")


def _cfg(dataset: Path, tmp_path: Path, *extra: str):
    return parse_args(["--config", RECIPE, "--data", str(dataset), "--output", str(tmp_path / "run"), *extra])


@pytest.mark.parametrize("has_bf16", [False, True])
def test_cpu_precision_is_full_unless_bf16_is_asked_for_and_the_cpu_has_it(dataset, tmp_path, monkeypatch, caplog,
                                                                           has_bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: has_bf16)
    with caplog.at_level(logging.WARNING, logger=train_mod.logger.name):
        assert pick_precision(_cfg(dataset, tmp_path, "--mixed_precision", "auto")) == "no"
        assert pick_precision(_cfg(dataset, tmp_path, "--mixed_precision", "no")) == "no"
        assert not caplog.records
        assert pick_precision(_cfg(dataset, tmp_path, "--mixed_precision", "bf16")) == ("bf16" if has_bf16 else "no")
        assert [("no bf16 instructions" in r.getMessage()) for r in caplog.records] == ([] if has_bf16 else [True])
        caplog.clear()
        assert pick_precision(_cfg(dataset, tmp_path, "--mixed_precision", "fp16")) == "no"
        assert ["needs a GPU" in r.getMessage() for r in caplog.records] == [True]


def test_cpu_has_bf16_agrees_with_the_cpu_flags():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    flags = {f for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for f in line.split()}
    assert train_mod.cpu_has_bf16() is bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.fixture
def own_accelerator_state():
    """accelerate keeps one precision per process (its state is shared): a bf16 run in the middle of the suite
    gets a fresh state, and leaves one, so the full-precision runs before and after it still start. The
    reset is what accelerate's own test cases do between tests."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.usefixtures("own_accelerator_state")
def test_cpu_bf16_loads_the_base_in_bf16_and_trains_fp32_weights(dataset, tiny_base, tmp_path, monkeypatch):
    # torch's CPU autocast runs bf16 on any x86 CPU (slowly without the instructions), so this runs everywhere
    from loupe_vlm.finetune.train import finish, fit, setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train_mod, "cpu_has_bf16", lambda: True)
    cfg = _cfg(dataset, tmp_path, "--base", str(tiny_base), "--method", "lora", "--mixed_precision", "bf16",
               "--max_steps", "3", "--save_every", "0", "--eval_every", "0")
    run = setup(cfg)
    model = run.unwrapped
    frozen_lm = [p for n, p in model.vlm.named_parameters()
                 if ".language_model." in n and not p.requires_grad and p.is_floating_point()]
    assert frozen_lm and all(p.dtype == torch.bfloat16 for p in frozen_lm)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("trainable_tokens" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())

    fit(run)
    after = dict(model.named_parameters())
    lora = [n for n in trainable if "lora_" in n]
    assert sum(not torch.equal(after[n], trainable[n]) for n in lora) >= len(lora) // 2
    assert all(after[n].dtype == torch.float32 and torch.isfinite(after[n]).all() for n in trainable)
    finish(run)
    rows = [json.loads(line) for line in (Path(cfg.output) / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

    from loupe_vlm.assistant.modeling import ExplainableVLM

    loaded, _ = ExplainableVLM.from_pretrained(cfg.output)  # the saved adapter loads over the fp32 base
    weights = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert weights and all(p.dtype == torch.float32 for p in weights.values())
