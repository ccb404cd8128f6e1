"""bf16 weight copies for the few-row products of decoding (assistant/decode_precision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loupe_vlm.assistant import decode_precision as dp


def _tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_enable_keeps_parameters_ties_and_state_dict_keys():
    lm = _tiny_llama()
    keys = set(lm.state_dict())
    n_linear = sum(type(m) is nn.Linear for m in lm.modules())
    assert dp.enable(lm) == n_linear == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert dp.enable(lm) == n_linear  # idempotent: nothing converted twice
    assert set(lm.state_dict()) == keys  # the copies are not saved
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # the tie survives
    assert lm.lm_head.weight.dtype == torch.float32 and lm.lm_head.weight_bf16.dtype == torch.bfloat16
    assert dp.disable(lm) == n_linear
    assert all(type(m) is not dp._DecodeLinear for m in lm.modules())
    assert not hasattr(lm.lm_head, "weight_bf16")


def test_few_rows_take_the_bf16_copy_and_many_rows_stay_exact():
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    exact = nn.Linear(64, 48)
    exact.load_state_dict(layer.state_dict())
    dp.enable(layer)
    few, many = torch.randn(1, 1, 64), torch.randn(1, dp.MAX_ROWS + 1, 64)
    with torch.no_grad():
        got_few, got_many = layer(few), layer(many)
        want_few = nn.functional.linear(few.bfloat16(), exact.weight.bfloat16(), exact.bias.bfloat16()).float()
        assert got_few.dtype == torch.float32
        assert torch.equal(got_few, want_few)
        assert not torch.equal(got_few, exact(few))  # it really is the rounded product...
        assert torch.allclose(got_few, exact(few), atol=0.05, rtol=0.02)  # ...and close to the exact one
        assert torch.equal(got_many, exact(many))
    # with grad on (training) every call is the exact fp32 product, and gradients reach the fp32 weight
    out = layer(few)
    assert torch.equal(out, exact(few))
    out.sum().backward()
    assert layer.weight.grad is not None


def test_resolve_auto_is_on_for_the_cpu_only_and_bad_choices_are_named():
    assert dp.resolve("auto", "cpu") is True
    assert dp.resolve("auto", "cuda:0") is False
    assert dp.resolve("bf16", "cuda") is True
    assert dp.resolve("fp32", "cpu") is False
    with pytest.raises(ValueError, match="decode precision 'half'.*auto, bf16, fp32"):
        dp.resolve("half", "cpu")


def test_generation_with_the_copies_stays_close_to_fp32():
    """Greedy decoding of a random tiny LM: the first steps' logits agree to bf16 rounding."""
    lm = _tiny_llama()
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    with torch.no_grad():
        ref = lm.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0)
        dp.enable(lm)
        got = lm.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
                          pad_token_id=0)
        # the prompt's 6 rows run through the layers in fp32; only its last row reaches the head, in bf16
        dp.disable(lm)
        last = lm(ids, output_hidden_states=True).hidden_states[-1][:, -1]
        head = nn.functional.linear(last.bfloat16(), lm.lm_head.weight.bfloat16()).float()
    assert torch.equal(got.logits[0], head)
    # later steps feed one row: rounded weights, small differences
    assert not torch.equal(got.logits[1], ref.logits[1])
    assert torch.allclose(got.logits[1], ref.logits[1], atol=0.05)


def test_assistant_names_the_precision_and_fp32_is_the_exact_model(tiny_checkpoint):
    from loupe_vlm.assistant.inference import Assistant

    fast = Assistant.from_pretrained(tiny_checkpoint)  # auto on the CPU
    exact = Assistant.from_pretrained(tiny_checkpoint, decode_precision="fp32")
    assert fast.name.endswith("+bf16decode") and "+bf16decode" not in exact.name
    guided = Assistant.from_pretrained(tiny_checkpoint, evidence_guidance=1)
    assert guided.name.endswith("+bf16decode+guidance1")  # the guidance suffix stays last
    assert any(type(m) is dp._DecodeLinear for m in fast.model.vlm.modules())
    assert not any(type(m) is dp._DecodeLinear for m in exact.model.vlm.modules())
    with pytest.raises(ValueError, match="decode precision"):
        Assistant.from_pretrained(tiny_checkpoint, decode_precision="int4")
