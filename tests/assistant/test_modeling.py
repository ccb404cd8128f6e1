"""ExplainableVLM on tiny twins of every base family (Qwen2.5-VL, Qwen3-VL and a text-only Llama LM):
losses, gradients, learning, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe_vlm.assistant.modeling import CheckpointError, ExplainableVLM
from loupe_vlm.assistant.processing import LoupeProcessor
from tests.helpers import ASSETS, TAMPERED_ANSWER, chat, overfit, tiny_model, training_batch

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "llama"]


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_losses_finite_and_gradients_reach_every_trained_part(family):
    model, lp = tiny_model(family)
    model.apply_lora(r=4, alpha=8, trainable_token_ids=[model.config.mask_token_id])
    model.train()
    out = model(training_batch(lp))
    for part in (out.ce_loss, out.bce_loss, out.dice_loss, out.loss):
        assert part is not None and torch.isfinite(part)
    out.loss.backward()
    named = dict(model.named_parameters())
    lora = [p for n, p in named.items() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    token_rows = [p for n, p in named.items() if "trainable_tokens_delta" in n]
    assert token_rows and all(p.grad is not None and p.grad.abs().sum() > 0 for p in token_rows)
    assert (model.image_encoder is not None) == (family == "llama")  # a text-only LM gets Loupe's image tokens
    for _, module in model.head_modules():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    frozen = [p for n, p in named.items() if "lora_" not in n and "trainable_tokens" not in n
              and not n.startswith(("lowlevel.", "mask_decoder.", "image_encoder."))]
    assert frozen and not any(p.requires_grad for p in frozen)


def test_lowlevel_tokens_fill_the_placeholder_rows():
    model, lp = tiny_model()
    batch = training_batch(lp)
    ids = batch["input_ids"]
    n_images = len(batch["lowlevel_pixels"])
    assert int((ids == model.config.lowlevel_token_id).sum()) == n_images * model.config.n_lowlevel_tokens
    low = model.encode_lowlevel(batch["lowlevel_pixels"])
    tokens = low.tokens
    emb = model.vlm.get_input_embeddings()
    filled = model.embed(ids, low)
    where = ids == model.config.lowlevel_token_id
    assert torch.allclose(filled[where], tokens)
    assert torch.equal(filled[~where], emb(ids)[~where])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_few_steps_drive_ce_and_mask_loss_down(family):
    torch.manual_seed(0)
    model, lp = tiny_model(family)
    history = overfit(model, training_batch(lp), steps=25)
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    assert history[-1]["mask"] < 0.8 * history[0]["mask"]


def test_mask_token_count_mismatch_raises():
    model, lp = tiny_model()
    two_tokens = TAMPERED_ANSWER.replace("<|mask|>", "<|mask|> and <|mask|>")
    enc = lp.encode(chat("forgery.detect", two_tokens), [ASSETS / "tampered.png"], train=True,
                    masks=[ASSETS / "tampered_mask.png"])
    with pytest.raises(ValueError, match="2 mask token"):
        model(lp.collate([enc]))


def test_labels_cover_only_the_assistant_turn():
    _, lp = tiny_model()
    enc = lp.encode(chat("forgery.detect", TAMPERED_ANSWER), [ASSETS / "tampered.png"], train=True,
                    masks=[ASSETS / "tampered_mask.png"])
    labelled = enc.labels[enc.labels != -100]
    text = lp.tokenizer.decode(labelled, skip_special_tokens=False)
    assert text == TAMPERED_ANSWER + "<|im_end|>"


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip_gives_identical_logits_and_masks(tmp_path, family):
    torch.manual_seed(0)
    model, lp = tiny_model(family)
    overfit(model, training_batch(lp), steps=3)
    batch = training_batch(lp)
    with torch.no_grad():
        before = model(batch)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    assert not list((tmp_path / "ck").rglob("*.bin")) and not list((tmp_path / "ck").rglob("*.pt"))
    loaded, processor = ExplainableVLM.from_pretrained(tmp_path / "ck")
    lp2 = LoupeProcessor.for_model(loaded, processor)
    with torch.no_grad():
        after = loaded(training_batch(lp2))
    assert torch.equal(before.logits, after.logits)
    assert len(before.mask_logits) == len(after.mask_logits) == 1
    assert torch.equal(before.mask_logits[0], after.mask_logits[0])


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_checkpoint_over_a_local_base_round_trips(tmp_path, family):
    """A LoRA checkpoint stores the adapter and points at its base folder."""
    torch.manual_seed(0)
    model, lp = tiny_model(family)
    model.vlm.save_pretrained(tmp_path / "base_model")
    lp.processor.save_pretrained(tmp_path / "base_model")
    model.config.base = str(tmp_path / "base_model")
    model.apply_lora(r=4, alpha=8, trainable_token_ids=[model.config.mask_token_id])
    overfit(model, training_batch(lp), steps=2)
    with torch.no_grad():
        before = model(training_batch(lp)).logits
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    assert (tmp_path / "ck" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ck" / "base").exists()
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        after = loaded(training_batch(lp)).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_incompatible_checkpoint_is_refused_with_a_message(tmp_path):
    import json

    model, lp = tiny_model()
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    cfg = json.loads((tmp_path / "ck" / "loupe_config.json").read_text())
    cfg["format_version"] = 999
    (tmp_path / "ck" / "loupe_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format 999"):
        ExplainableVLM.from_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="not a Loupe checkpoint"):
        ExplainableVLM.from_pretrained(tmp_path)


def test_lowlevel_encoder_sees_noise():
    """The fixed high-pass residuals separate a clean and a noisy version of the same image."""
    from PIL import Image

    from loupe_vlm.assistant.processing import to_lowlevel_tensor

    model, _ = tiny_model()
    clean = to_lowlevel_tensor(Image.open(ASSETS / "clean.png").convert("RGB"), 64)
    noisy = to_lowlevel_tensor(Image.open(ASSETS / "noisy.png").convert("RGB"), 64)
    e_clean = model.lowlevel.residuals(clean).abs().mean()
    e_noisy = model.lowlevel.residuals(noisy).abs().mean()
    assert e_noisy > 3 * e_clean
    assert np.isfinite(e_clean.item())
