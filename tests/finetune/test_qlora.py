"""LoRA on a 4-bit base (QLoRA through bitsandbytes, on the CPU) and exporting a merged model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")


def test_qlora_trains_lora_with_vision_and_heads_unquantised(dataset, tiny_base, tmp_path):
    import bitsandbytes as bnb

    from loupe_vlm.assistant.modeling import ExplainableVLM
    from loupe_vlm.finetune.export import main as export_main
    from loupe_vlm.finetune.train import finish, fit, parse_args, setup

    out = tmp_path / "run"
    cfg = parse_args(["--config", RECIPE, "--data", str(dataset), "--base", str(tiny_base), "--method", "qlora",
                      "--output", str(out), "--max_steps", "3", "--save_every", "0", "--eval_every", "0"])
    run = setup(cfg)
    model = run.unwrapped
    modules = dict(model.vlm.named_modules())
    four_bit = [n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert any(".language_model." in n for n in four_bit), "the language model should be 4-bit"
    assert not any(".visual." in n for n in four_bit), "the vision tower must stay out of quantisation"
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.mask_decoder.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.lowlevel.modules())

    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert lora and all(".language_model." in n for n in lora)
    assert any("trainable_tokens" in n for n in trainable), "the mask token's row should be trainable"
    assert not any(".visual." in n for n in trainable)
    frozen_visual = next(p for n, p in model.named_parameters() if ".visual." in n)
    visual_before = frozen_visual.detach().clone()

    fit(run)
    after = dict(model.named_parameters())
    changed = [n for n in lora if not torch.equal(after[n], trainable[n])]
    assert len(changed) >= len(lora) // 2, f"only {len(changed)} of {len(lora)} LoRA tensors moved"
    decoder = [n for n in trainable if n.startswith("mask_decoder.")]
    assert any(not torch.equal(after[n], trainable[n]) for n in decoder)
    assert all(after[n].dtype == torch.float32 for n in decoder)
    assert torch.equal(frozen_visual, visual_before)
    finish(run)

    # the adapter over the (unquantised) base folder merges into a model that loads without peft
    merged = tmp_path / "merged"
    assert export_main(["--checkpoint", str(out), "--out", str(merged), "--merge"]) == 0
    assert (merged / "base").is_dir() and not (merged / "adapter").exists()
    lora_model, processor = ExplainableVLM.from_pretrained(out)
    merged_model, _ = ExplainableVLM.from_pretrained(merged)
    assert hasattr(lora_model.vlm, "peft_config") and not hasattr(merged_model.vlm, "peft_config")
    from loupe_vlm.assistant.processing import LoupeProcessor
    from loupe_vlm.prompts import load_jsonl

    lp = LoupeProcessor.for_model(lora_model, processor)
    batch = lp.collate([lp.encode_sample(s, dataset) for s in load_jsonl(dataset / "val.jsonl")])
    with torch.no_grad():
        a, b = lora_model(batch), merged_model(batch)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert all(torch.allclose(x, y, atol=1e-4) for x, y in zip(a.mask_logits, b.mask_logits))


def test_lora_trains_only_the_chosen_parts(dataset, tiny_base, tmp_path):
    from loupe_vlm.finetune.train import parse_args, setup

    cfg = parse_args(["--config", RECIPE, "--data", str(dataset), "--base", str(tiny_base), "--method", "lora",
                      "--output", str(tmp_path / "run"), "--train_projector"])
    model = setup(cfg).unwrapped
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(".visual.merger." in n for n in trainable)
    assert not any(".visual." in n and ".merger." not in n for n in trainable)  # the tower itself stays frozen
    assert all(n.startswith("vlm.") for n in frozen)  # the heads always train
    assert not any(".language_model." in n and "lora_" not in n and "trainable_tokens" not in n for n in trainable)
