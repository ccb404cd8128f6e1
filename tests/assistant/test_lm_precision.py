"""fbgemm-packed fp16 weights for the language model while answering (assistant/lm_precision.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loupe_vlm.assistant import lm_precision as lp
from tests.helpers import ASSETS

pytestmark = pytest.mark.skipif(not lp.available(), reason="this torch has no fbgemm (not an x86 build)")


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
    assert lp.enable(lm) == n_linear == 2 * 7 + 1  # q k v o gate up down per layer, and the head
    assert lp.enable(lm) == n_linear  # idempotent: nothing packed twice
    assert set(lm.state_dict()) == keys  # the copies are not saved
    assert lm.lm_head.weight is lm.model.embed_tokens.weight  # the tie survives
    assert lm.lm_head.weight.dtype == torch.float32
    assert lp.disable(lm) == n_linear
    assert all(type(m) is nn.Linear for m in lm.modules() if isinstance(m, nn.Linear))
    assert not hasattr(lm.lm_head, "packed_fp16")


@pytest.mark.parametrize("rows", [1, 8, 64])
def test_the_packed_product_is_the_fp16_rounded_weight_in_fp32(rows):
    torch.manual_seed(1)
    layer = nn.Linear(64, 48)
    exact = nn.Linear(64, 48)
    exact.load_state_dict(layer.state_dict())
    lp.enable(layer)
    x = torch.randn(2, rows, 64)
    with torch.no_grad():
        got = layer(x)
        rounded = nn.functional.linear(x, exact.weight.half().float(), exact.bias.half().float())
        assert got.dtype == torch.float32 and got.shape == (2, rows, 48)
        assert not torch.equal(got, exact(x))  # it really uses the fp16 copy...
        assert torch.allclose(got, rounded, atol=1e-3)  # ...which is the fp16-rounded weight, in fp32
        assert (got - exact(x)).abs().max() < 5e-3
    # with grad on (training) every call is the exact fp32 product, and gradients reach the fp32 weight
    out = layer(x)
    assert torch.equal(out, exact(x))
    out.sum().backward()
    assert layer.weight.grad is not None


def _siblings(bias: bool) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(2)
    block = nn.Module()
    for name, out in (("q_proj", 48), ("k_proj", 16), ("v_proj", 16)):
        setattr(block, name, nn.Linear(64, out, bias=bias))
    alone = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(alone, name, nn.Linear(64, getattr(block, name).out_features, bias=bias))
    alone.load_state_dict(block.state_dict())
    lp.enable(block)
    lp.enable(alone, group_siblings=False)
    return block, alone


@pytest.mark.parametrize("bias", [True, False])
def test_siblings_share_one_product_with_the_same_bits_in_any_order(bias):
    block, alone = _siblings(bias)
    names = ("q_proj", "k_proj", "v_proj")
    groups = {id(getattr(block, n).fp16_group[0]) for n in names}
    assert len(groups) == 1 and all(getattr(alone, n).fp16_group is None for n in names)
    group = block.q_proj.fp16_group[0]
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        for order in (names, names[::-1], ("k_proj", "q_proj", "v_proj")):
            for n in order:
                assert torch.equal(getattr(block, n)(x), getattr(alone, n)(x)), (order, n)
            assert group._local.input is None  # all parts handed out: nothing held between steps
        # another input between two members, a member called twice, and an in-place change of the input
        assert torch.equal(block.q_proj(x), alone.q_proj(x))
        assert torch.equal(block.k_proj(y), alone.k_proj(y))
        assert torch.equal(block.k_proj(y), alone.k_proj(y))
        x.mul_(2)
        assert torch.equal(block.v_proj(x), alone.v_proj(x))
        with torch.inference_mode():
            z = torch.randn(3, 64)
            assert torch.equal(block.v_proj(z), alone.v_proj(z)) and torch.equal(block.q_proj(z), alone.q_proj(z))
    assert lp.disable(block) == 3 and not hasattr(block.k_proj, "fp16_group")
    assert type(block.k_proj) is nn.Linear


def test_a_part_kept_in_one_thread_is_never_taken_by_another():
    """The demo's queue and a server run one model from two threads: the kept parts are per thread.

    The main thread computes q/k/v for ``x`` and keeps k and v; another thread then asks k of the same
    ``x``. Were the parts shared, it would take the main thread's k (and the main thread would have to
    compute again, or worse, take a part of another thread's input); per thread, the main thread's k and v
    are still the views of the one product its q came from.
    """
    import threading

    block, alone = _siblings(bias=True)
    x = torch.randn(2, 64)
    seen = {}

    def other():
        with torch.no_grad():
            seen["k"] = block.k_proj(x)

    with torch.no_grad():
        q = block.q_proj(x)
        t = threading.Thread(target=other)
        t.start()
        t.join()
        k, v = block.k_proj(x), block.v_proj(x)
        assert q._base is not None and k._base is q._base and v._base is q._base
        assert seen["k"]._base is not q._base and torch.equal(seen["k"], alone.k_proj(x))
        assert torch.equal(k, alone.k_proj(x)) and torch.equal(v, alone.v_proj(x))


def test_siblings_of_different_input_sizes_or_biases_are_packed_alone():
    block = nn.Module()
    block.gate_proj, block.up_proj = nn.Linear(8, 4), nn.Linear(8, 4, bias=False)
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(8, 4), nn.Linear(6, 4), nn.Linear(8, 4)
    assert lp.enable(block) == 5
    assert all(m.fp16_group is None and m.packed_fp16 is not None for m in block.children())


def test_a_tiny_llama_groups_its_projections_and_decodes_the_same_bits():
    lm, alone = _tiny_llama(), _tiny_llama()
    lp.enable(lm)
    lp.enable(alone, group_siblings=False)
    attn, mlp = lm.model.layers[0].self_attn, lm.model.layers[0].mlp
    assert attn.q_proj.fp16_group[0] is attn.v_proj.fp16_group[0] and attn.o_proj.fp16_group is None
    assert mlp.gate_proj.fp16_group[0] is mlp.up_proj.fp16_group[0] and mlp.down_proj.fp16_group is None
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    with torch.no_grad():
        a = lm.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
        b = alone.generate(ids, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.equal(x, y) for x, y in zip(a.logits, b.logits))


def test_resolve_auto_is_on_for_the_cpu_only_and_bad_choices_are_named():
    assert lp.resolve("auto", "cpu") is True
    assert lp.resolve("auto", "cuda:0") is False
    assert lp.resolve("fp32", "cpu") is False
    assert lp.resolve("fp16", "cpu") is True
    with pytest.raises(ValueError, match="CPU with fbgemm only"):
        lp.resolve("fp16", "cuda")
    with pytest.raises(ValueError, match="LM precision 'half'.*auto, fp16, fp32"):
        lp.resolve("half", "cpu")


def test_generation_with_the_copies_stays_close_to_fp32():
    """Greedy decoding of a random tiny LM: the same tokens, and logits that agree to fp16 rounding."""
    lm = _tiny_llama()
    ids = torch.tensor([[5, 17, 33, 2, 9, 41]])
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = lm.generate(ids, **kw)
        lp.enable(lm)
        got = lm.generate(ids, **kw)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert not torch.equal(a, b)
        assert torch.allclose(a, b, atol=2e-3)


def test_assistant_names_the_precision_and_fp32_is_the_exact_model(tiny_checkpoint):
    from loupe_vlm.assistant.inference import Assistant

    fast = Assistant.from_pretrained(tiny_checkpoint)  # auto on the CPU
    exact = Assistant.from_pretrained(tiny_checkpoint, lm_precision="fp32")
    assert fast.name.endswith("+fp16lm") and "+fp16lm" not in exact.name
    guided = Assistant.from_pretrained(tiny_checkpoint, evidence_guidance=1)
    assert guided.name.endswith("+fp16lm+guidance1")  # the guidance suffix stays last
    assert any(type(m) is lp._PackedLinear for m in fast.model.vlm.modules())
    assert not any(type(m) is lp._PackedLinear for m in exact.model.vlm.modules())
    # the answers of the overfit tiny model are the same either way
    a, b = fast.assess(ASSETS / "noisy.png"), exact.assess(ASSETS / "noisy.png")
    assert a.text == b.text and a.quality.score == pytest.approx(b.quality.score, abs=1e-3)
    with pytest.raises(ValueError, match="LM precision"):
        Assistant.from_pretrained(tiny_checkpoint, lm_precision="int4")
