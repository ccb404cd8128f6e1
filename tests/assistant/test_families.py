"""The base-family interface: every family implements it, and what each says matches its models."""

from __future__ import annotations

import pytest
import torch

from loupe_vlm.assistant.families import FAMILIES, BaseFamily, FamilyError, get_family
from tests.helpers import ASSETS, chat, tiny_model, training_batch, QUALITY_ANSWER

REQUIRED = ("load", "load_checkpoint_base", "load_processor", "build_scratch", "set_pixel_budget",
            "image_token_count", "image_spans", "backbone", "final_norm")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_family_implements_the_interface(name):
    family = get_family(name)
    assert isinstance(family, BaseFamily) and family.name == name
    missing = [m for m in REQUIRED if getattr(type(family), m) is getattr(BaseFamily, m)]
    assert not missing, f"{name} does not implement {missing}"
    assert family.lora_target and family.special_tokens and "{% generation %}" in family.chat_template.replace(
        "{%- generation -%}", "{% generation %}")


def test_unknown_family_is_refused_with_the_supported_list():
    with pytest.raises(FamilyError, match="qwen2_5_vl, qwen3_vl, llama"):
        get_family("mamba")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_image_token_count_matches_the_processor_and_the_spans(name):
    """The length estimate's image-token count, the tokens the processor writes and the spans the mask
    decoder reads all agree."""
    model, lp = tiny_model(name)
    enc = lp.encode(chat("quality.assess", QUALITY_ANSWER), [ASSETS / "noisy.png"], train=True)
    batch = lp.collate([enc])
    w, h = enc.sizes[0]
    n = int((batch["input_ids"] == model.config.image_token_id).sum())
    assert n == lp.image_token_count(w, h) > 0
    (row, pos, (gh, gw)), = model.family.image_spans(batch["input_ids"], batch, model.config.image_token_id)
    assert row == 0 and pos.numel() == n == gh * gw


@pytest.mark.parametrize("name", list(FAMILIES))
def test_hidden_states_are_the_final_norm_outputs(name):
    """Forward and generate return exactly what the family's final norm gives (the convention the
    mask decoder was trained with), read from the outputs instead of a hook."""
    torch.manual_seed(0)
    model, lp = tiny_model(name)
    model.eval()
    seen = []
    handle = model.family.final_norm(model.vlm).register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        batch = training_batch(lp)
        with torch.no_grad():
            out = model(batch)
        assert len(seen) == 1 and torch.equal(out.hidden, seen[0])
        seen.clear()
        enc = lp.encode(chat("quality.assess", QUALITY_ANSWER)[:1], [ASSETS / "noisy.png"], train=False)
        gen = model.generate(lp.collate([enc], padding_side="left"), max_new_tokens=4)
        assert torch.equal(gen["hidden"], torch.cat(seen, dim=1))
    finally:
        handle.remove()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_lora_target_reaches_the_language_model_only(name):
    model, _ = tiny_model(name)
    model.apply_lora(r=2, alpha=4)
    lora = [n for n, _ in model.vlm.named_parameters() if "lora_" in n]
    assert lora
    assert not [n for n in lora if model.family.module_role(n.replace("base_model.model.", "")) is not None]
    assert not [n for n in lora if "visual" in n or "lm_head" in n]


def test_a_bare_lora_target_that_matches_nothing_is_refused():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="matches no module"):
        model.apply_lora(r=2, alpha=4, target=r".*language_model.*\.q_proj")  # Qwen's layout, not Llama's


@pytest.mark.parametrize("name", ["qwen2_5_vl", "llama"])
def test_vision_and_projector_roles(name):
    model, _ = tiny_model(name)
    roles = {model.family.module_role(n) for n, _ in model.vlm.named_parameters()}
    if name == "llama":
        assert roles == {None}  # its image tokens come from Loupe's ImageEncoder, outside the base
        assert model.image_encoder is not None
    else:
        assert roles == {None, "vision", "projector"}
