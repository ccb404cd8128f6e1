"""Auxiliary supervision of the LowLevelEncoder: labels read from Sample.meta, the loss, save/load."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from loupe_vlm.assistant.modeling import ExplainableVLM, new_model
from loupe_vlm.assistant.processing import AUX_CATEGORIES, AUX_DIM, LoupeProcessor, aux_labels
from loupe_vlm.prompts import Sample, canonical_question, user_content
from tests.helpers import ASSETS, CORPUS, tiny_model, training_batch


def _sample(task: str, roles: list[str], meta: dict, masks: list[str] | None = None, answer: str = "ok") -> Sample:
    images = [f"{r}.png" for r in roles]
    return Sample(id=f"s-{task}", task=task, images=images, image_roles=roles,
                  messages=[{"role": "user", "content": user_content(roles, canonical_question(task))},
                            {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                  masks=masks or [], meta=meta)


COMPARE = _sample("quality.compare", ["reference", "A", "B"], {
    "distortions_A": [{"name": "gaussian_blur", "category": "blur", "severity": 2}],
    "distortions_B": [{"name": "gaussian_noise", "category": "noise", "severity": 4},
                      {"name": "jpeg", "category": "compression", "severity": 1}],
    "distortions": [{"name": "gaussian_blur", "category": "blur", "severity": 2}], "better": "A"})
TAMPERED = _sample("forgery.detect", ["A"], {"tampered": True}, masks=["mask.png"],
                   answer=CORPUS[1])
AUTHENTIC = _sample("forgery.detect", ["A"], {"tampered": False})


def test_aux_labels_follow_each_images_role():
    y = aux_labels(COMPARE)
    assert y.shape == (3, AUX_DIM)
    cat = {c: i for i, c in enumerate(AUX_CATEGORIES)}
    assert torch.equal(y[0, :-2], torch.zeros(len(AUX_CATEGORIES))) and y[0, -2] == 0  # the reference is clean
    assert y[1, cat["blur"]] == 1 and y[1, :-2].sum() == 1 and math.isclose(float(y[1, -2]), 0.4, rel_tol=1e-6)
    assert y[2, cat["noise"]] == 1 and y[2, cat["compression"]] == 1 and math.isclose(float(y[2, -2]), 0.8, rel_tol=1e-6)
    assert torch.isnan(y[:, -1]).all()  # quality records say nothing about tampering
    t, a = aux_labels(TAMPERED), aux_labels(AUTHENTIC)
    assert t[0, -1] == 1 and a[0, -1] == 0 and torch.isnan(t[0, :-1]).all()
    # a record without the builders' facts gives no labels at all
    assert torch.isnan(aux_labels(_sample("quality.assess", ["A"], {}))).all()


def _tiny(aux_weight: float, **scratch) -> tuple[ExplainableVLM, LoupeProcessor]:
    """A tiny model; keyword arguments are the from-scratch group's options (ScratchOptions)."""
    model, processor = new_model("scratch:test", corpus=CORPUS, seed=0, lowlevel_max_side=64, lowlevel_width=8,
                                 decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64, aux_weight=aux_weight,
                                 scratch=scratch)
    return model, LoupeProcessor.for_model(model, processor)


def _batch(lp: LoupeProcessor, root) -> dict:
    for name, src in (("reference", "clean"), ("A", "tampered"), ("B", "noisy"), ("mask", "tampered_mask")):
        shutil.copy(ASSETS / f"{src}.png", root / f"{name}.png")
    items = [lp.encode_sample(s, root) for s in (COMPARE, TAMPERED, AUTHENTIC)]
    assert items[1].aux_mask[0].sum() > 0 and items[2].aux_mask[0].sum() == 0  # authentic: an all-zero map
    assert items[0].aux_mask == [None, None, None]
    return lp.collate(items)


def test_aux_loss_trains_the_lowlevel_heads_and_goes_down(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(aux_weight=1.0)
    batch = _batch(lp, tmp_path)
    assert batch["aux"].shape == (5, AUX_DIM) and len(batch["aux_mask"]) == 5
    out = model(batch)
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss)
    out.loss.backward()
    for part in (model.lowlevel.aux_head, model.lowlevel.aux_dense, model.lowlevel.stem):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    opt = torch.optim.AdamW(model.lowlevel.parameters(), lr=1e-2)
    first = float(out.aux_loss.detach())
    for _ in range(30):
        opt.zero_grad()
        o = model(batch)
        o.aux_loss.backward()
        opt.step()
    assert float(model(batch).aux_loss.detach()) < 0.7 * first


def test_without_aux_weight_there_are_no_aux_heads(tmp_path):
    model, lp = _tiny(aux_weight=0.0)
    assert not hasattr(model.lowlevel, "aux_head")
    out = model(_batch(lp, tmp_path))
    assert out.aux_loss is None


def test_aux_heads_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(aux_weight=0.5)
    (tmp_path / "d").mkdir()
    batch = _batch(lp, tmp_path / "d")
    model.eval()
    with torch.no_grad():
        before = model(batch)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.aux_weight == 0.5 and hasattr(loaded.lowlevel, "aux_head")
    with torch.no_grad():
        after = loaded(batch)
    assert torch.equal(before.logits, after.logits) and torch.equal(before.aux_loss, after.aux_loss)


def test_weighted_token_ce_is_the_plain_mean_at_weight_one_and_leans_on_key_tokens():
    from loupe_vlm.assistant.modeling import weighted_token_ce

    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11)
    labels = torch.tensor([[-100, 3, 4, 5, -100, -100], [-100, -100, 7, 3, 2, 9]])
    plain = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert torch.allclose(weighted_token_ce(logits, labels, [3], 1.0), plain)
    # with weight w on id 3: sum(w_i ce_i) / sum(w_i) over the 7 labelled tokens (two of them are 3s)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                           reduction="none", ignore_index=-100)
    flat = labels[:, 1:].reshape(-1)
    w = (flat != -100).float() * torch.where(flat == 3, 5.0, 1.0)
    assert torch.allclose(weighted_token_ce(logits, labels, [3], 5.0), (ce * w).sum() / w.sum())


def test_key_token_weight_changes_the_ce_and_its_ids_are_taxonomy_words(tmp_path):
    from loupe_vlm.assistant.modeling import key_token_ids

    model, lp = _tiny(aux_weight=0.0)
    ids = key_token_ids(lp.tokenizer)
    words = {lp.tokenizer.decode([i]).strip() for i in ids}
    assert {"A", "B"} <= words and all(len(w) > 2 for w in words - {"A", "B"})
    batch = _batch(lp, tmp_path)
    with torch.no_grad():
        plain = model(batch).ce_loss
        model.config.scratch.key_token_weight, model.config.scratch.key_token_ids = 1.0, ids
        same = model(batch).ce_loss
        model.config.scratch.key_token_weight = 10.0
        weighted = model(batch).ce_loss
    assert torch.allclose(plain, same, atol=1e-5)
    assert not torch.allclose(plain, weighted, atol=1e-3)


def test_distinct_key_tokens_skip_a_shared_opening_token():
    from loupe_vlm.assistant.modeling import distinct_token_ids

    # word-level ids: 1 HSV, 2 brightening, 3 darkening, 4 blur, 5 Gaussian, 6 noise, 7 saturation, 8 loss, 9 boost
    terms = {"brighten_hsv": [[1, 2]], "darken_hsv": [[1, 3]], "blur": [[4], [5, 4]], "noise": [[5, 6]],
             "sat_weaken": [[1, 7, 8]], "sat_strengthen": [[1, 7, 9]]}
    assert distinct_token_ids(terms) == {2, 3, 4, 6, 8, 9}  # never 1 (HSV) or 5 (Gaussian), which open several
    # a token that opens one term's phrasing alone is its deciding token
    assert distinct_token_ids({"a": [[1, 2]], "b": [[3, 2]]}) == {1, 3}


def test_key_token_modes_on_a_real_tokenizer():
    from loupe_vlm.assistant.modeling import key_token_ids

    model, lp = _tiny(aux_weight=0.0)
    first, distinct = (set(key_token_ids(lp.tokenizer, m)) for m in ("first", "distinct"))
    assert first and distinct and first != distinct
    with pytest.raises(ValueError, match="key tokens"):
        key_token_ids(lp.tokenizer, "last")
    with pytest.raises(ValueError, match="key_tokens"):
        _tiny(1.0, key_tokens="last")


def test_evidence_tokens_are_soft_words_the_lm_can_copy(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0, evidence_tokens=True)
    groups = model.config.scratch.evidence_word_ids
    assert [len(g) for g in groups] == [len(AUX_CATEGORIES) + 1, 5, 2]
    assert model.config.n_lowlevel_tokens == 4 + 3 and model.lowlevel.grid == 2
    emb = model.vlm.get_input_embeddings().weight
    sure = torch.full((AUX_DIM,), -30.0)
    sure[-1] = 30.0  # certain: tampered, no distortion, severity ~0 (the lowest word dominates)
    ev = model.evidence_tokens(sure)
    assert torch.allclose(ev[2], emb[torch.tensor(groups[2][0])].mean(0), atol=1e-5)  # "tampered"
    assert torch.allclose(ev[0], emb[torch.tensor(groups[0][-1])].mean(0), atol=1e-5)  # "no visible distortion"
    sure[-1] = -30.0
    assert torch.allclose(model.evidence_tokens(sure)[2], emb[torch.tensor(groups[2][1])].mean(0), atol=1e-5)
    batch = _batch(lp, tmp_path)
    model.eval()
    with torch.no_grad():
        before = model(batch)
    assert torch.isfinite(before.loss)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.scratch.evidence_word_ids == groups
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, before.logits)


def test_evidence_fusion_biases_only_the_key_words_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0, evidence_fusion=True)
    keys = model.config.scratch.key_token_ids
    assert model.fusion is not None and model.fusion.out_features == len(keys) > 10
    batch = _batch(lp, tmp_path)
    model.eval()
    with torch.no_grad():
        neutral = model(batch).logits  # zero-initialised: the language model alone
        model.fusion.bias.fill_(2.0)
        shifted = model(batch).logits
    delta = shifted - neutral
    others = torch.ones(delta.shape[-1], dtype=torch.bool)
    others[keys] = False
    assert torch.allclose(delta[..., keys], torch.full_like(delta[..., keys], 2.0), atol=1e-4)
    assert delta[..., others].abs().max() < 1e-4
    # the bias depends on each row's images: a weight on the last image's tampered probability
    with torch.no_grad():
        model.fusion.bias.zero_()
        model.fusion.weight.zero_()
        model.fusion.weight[0, AUX_DIM - 1] = 10.0
        out = model(batch)
        per_row = out.logits[:, -1, keys[0]] - neutral[:, -1, keys[0]]
        p_t = torch.stack([out.lowlevel.aux[i][0][-1].sigmoid() for i in (2, 3, 4)]) * 10
    assert torch.allclose(per_row, p_t, atol=1e-4)  # rows 0..2 end with images 2, 3 and 4
    gen = model.generate(lp.collate([lp.encode_sample(TAMPERED, tmp_path, train=False)], padding_side="left"),
                         max_new_tokens=3)
    assert gen["new_tokens"].shape[1] >= 1
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


@pytest.mark.parametrize("kind", ["gated-fusion", "llama-lora"])
def test_scored_only_logits_give_the_same_loss_and_gradients(kind, tmp_path):
    """``forward(scored_only=True)`` (training) computes the logits only where the next token is labelled:
    those rows equal the full pass's, and the loss and every gradient are the same."""
    torch.manual_seed(0)
    if kind == "gated-fusion":  # loupe-smol's heads: a gated vocabulary bias and weighted key tokens
        model, lp = _tiny(1.0, evidence_fusion=True, fusion_scope="vocab", fusion_gate=True, key_token_weight=5.0)
        with torch.no_grad():
            model.fusion.weight.normal_(0, 0.5)
            model.fusion_gate.weight.normal_(0, 2.0)
        batch = _batch(lp, tmp_path)
    else:  # a text-only LM with LoRA and trainable rows for the added tokens
        model, lp = tiny_model("llama")
        model.apply_lora(r=2, alpha=4, trainable_token_ids=[model.config.mask_token_id])
        batch = training_batch(lp)
    model.eval()  # no dropout: both passes see the same network

    def run(scored_only: bool):
        model.zero_grad(set_to_none=True)
        out = model(batch, scored_only=scored_only)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full, full_grads = run(False)
    part, part_grads = run(True)
    labelled = batch["labels"][:, 1:] != -100
    assert full.scored is None and torch.equal(part.scored, labelled)
    assert 0 < labelled.sum() < labelled.numel()  # the prompts' positions are left out
    assert part.logits.shape == (int(labelled.sum()), full.logits.shape[-1])
    assert torch.allclose(part.logits, full.logits[:, :-1][labelled], atol=1e-5)
    assert torch.allclose(part.ce_loss, full.ce_loss, atol=1e-6) and torch.allclose(part.loss, full.loss, atol=1e-6)
    assert full_grads.keys() == part_grads.keys() and len(full_grads) > 0
    for name, g in full_grads.items():
        assert torch.allclose(part_grads[name], g, atol=1e-6, rtol=1e-4), name


def test_evidence_words_read_the_base_rows_under_trainable_tokens_without_a_merged_copy():
    from loupe_vlm.assistant import modeling

    model, _ = new_model("scratch:test:llama", corpus=CORPUS, seed=0, lowlevel_max_side=64, lowlevel_width=8,
                         decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64, aux_weight=1.0,
                         scratch={"evidence_tokens": True})
    groups = model.config.scratch.evidence_word_ids
    ids = {i for group in groups for word in group for i in word}
    added = model.config.mask_token_id
    assert groups and added not in ids
    model.apply_lora(r=2, alpha=4, trainable_token_ids=[added])
    wrapper = model.vlm.get_input_embeddings()
    with torch.no_grad():  # a trained delta for the added row, so merged and base matrices differ
        wrapper.token_adapter.trainable_tokens_delta["default"].add_(1.0)
    merged = wrapper.weight  # peft's merged copy: the reference
    base = wrapper.token_adapter.base_layer.weight
    assert not torch.equal(merged[added], base[added])
    expected = [torch.stack([merged[word].float().mean(0) for word in group]) for group in groups]
    assert all(torch.equal(a, b) for a, b in zip(model.evidence_words(), expected))
    assert modeling._embedding_rows_source(wrapper, ids) is base  # no copy of the matrix
    # a trainable row among the ids, or a plain embedding: the module's own .weight
    assert torch.equal(modeling._embedding_rows_source(wrapper, ids | {added}), merged)
    plain = torch.nn.Embedding(4, 2)
    assert modeling._embedding_rows_source(plain, {1}) is plain.weight


def test_vocab_fusion_reaches_any_token_per_row_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0, evidence_fusion=True, fusion_scope="vocab")
    vocab = model.vlm.get_output_embeddings().weight.shape[0]
    assert model.fusion.out_features == vocab
    other = next(i for i in range(vocab) if i not in set(model.config.scratch.key_token_ids))  # not a key word
    batch = _batch(lp, tmp_path)
    model.eval()
    with torch.no_grad():
        neutral = model(batch).logits
        model.fusion.weight[other, AUX_DIM - 1] = 10.0  # that token follows the judged image's P(tampered)
        out = model(batch)
        shifted = out.logits
        p_t = torch.stack([out.lowlevel.aux[i][0][-1].sigmoid() for i in (2, 3, 4)]) * 10
    delta = shifted - neutral
    assert torch.allclose(delta[:, -1, other], p_t, atol=1e-4)
    delta[..., other] = 0
    assert delta.abs().max() < 1e-4
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.scratch.fusion_scope == "vocab"
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, shifted)
    with pytest.raises(ValueError, match="fusion_scope"):
        _tiny(1.0, evidence_fusion=True, fusion_scope="all")


def test_fusion_gate_scales_the_bias_by_the_token_before_and_generation_decides_on_it(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0, evidence_fusion=True, fusion_scope="vocab", fusion_gate=True)
    vocab = model.vlm.get_output_embeddings().weight.shape[0]
    assert model.fusion_gate is not None and model.fusion_gate.num_embeddings == vocab
    batch = _batch(lp, tmp_path)
    ids = batch["input_ids"]
    model.eval()
    target = 5  # a token the bias pushes
    with torch.no_grad():
        neutral = model(batch).logits
        model.fusion.bias[target] = 4.0
        half = model(batch).logits - neutral
        assert torch.allclose(half[..., target], torch.full_like(half[..., target], 2.0), atol=1e-4)  # gate 0.5
        closed = int(ids[0, -1])  # after this token the gate shuts; after every other it stays at 0.5
        model.fusion_gate.weight[closed] = -30.0
        delta = (model(batch).logits - neutral)[..., target]
    after_closed = ids == closed
    assert delta[after_closed].abs().max() < 1e-4
    assert torch.allclose(delta[~after_closed], torch.full_like(delta[~after_closed], 2.0), atol=1e-4)
    # generation: a wide-open gate after the prompt's last token makes the pushed token the first answer
    item = lp.collate([lp.encode_sample(TAMPERED, tmp_path, train=False)], padding_side="left")
    with torch.no_grad():
        model.fusion_gate.weight.zero_()
        model.fusion.bias[target] = 0.0
        plain = int(model.generate(item, max_new_tokens=1)["new_tokens"][0, 0])
        target = 5 if plain != 5 else 6  # a token the LM alone would not say first
        model.fusion.bias[target] = 200.0
        model.fusion_gate.weight[int(item["input_ids"][0, -1])] = 30.0
        model.fusion_gate.weight[target] = -30.0  # and shut after it: the bias cannot repeat it
        gen = model.generate(item, max_new_tokens=2)
    assert int(gen["new_tokens"][0, 0]) == target
    assert gen["logits"][0, 0, target] > 100  # the returned logits carry the gated bias of each step
    if gen["new_tokens"].shape[1] > 1:
        assert gen["logits"][0, 1, target] < 100
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.scratch.fusion_gate
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    with pytest.raises(ValueError, match="fusion_gate"):
        _tiny(1.0, fusion_gate=True)


def test_context_convs_and_map_pooling_train_and_round_trip(tmp_path):
    from loupe_vlm.assistant.modeling import map_pool

    assert torch.equal(map_pool(torch.tensor([[0.0, 5.0], [1.0, -2.0]])), torch.tensor([5.0, 5.0]))
    torch.manual_seed(0)
    model, lp = _tiny(1.0, lowlevel_context=2, lowlevel_pool_map=True)
    assert len(model.lowlevel.context) == 2 and model.lowlevel.pool_map
    batch = _batch(lp, tmp_path)
    out = model(batch)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.lowlevel.context.parameters())
    # the tampered logit reads the map's peak: its first layer has weights for the two pooled inputs
    first = model.lowlevel.aux_head[0]
    assert first.weight.grad[:, -2:].abs().sum() > 0
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.scratch.lowlevel_context == 2 and loaded.lowlevel.pool_map
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)
    with pytest.raises(ValueError, match="lowlevel_pool_map"):
        _tiny(0.0, lowlevel_pool_map=True)


def test_mask_prior_adds_the_branch_tampering_map_with_a_learned_scale(tmp_path):
    torch.manual_seed(0)
    model, lp = _tiny(1.0, mask_prior=True)
    batch = _batch(lp, tmp_path)
    out = model(batch)
    assert len(out.mask_logits) == 1  # the tampered sample's one mask token
    tamper_map = out.lowlevel.aux[3][1]  # row 1 (the tampered sample): the fourth image of the batch
    out.loss.backward()
    assert model.mask_decoder.prior_scale.grad is not None and model.mask_decoder.prior_scale.grad != 0
    with torch.no_grad():
        model.mask_decoder.prior_scale.fill_(3.0)
        three = model(batch).mask_logits[0]
        model.mask_decoder.prior_scale.zero_()
        zero = model(batch).mask_logits[0]
    assert torch.allclose(three - zero, 3.0 * tamper_map.detach(), atol=1e-5)
    with pytest.raises(ValueError, match="mask_prior"):
        _tiny(0.0, mask_prior=True)


def test_map_verdicts_read_the_largest_logit_of_each_row_s_judged_image(tmp_path):
    from loupe_vlm.assistant.modeling import map_verdict

    model, lp = _tiny(1.0)
    model.eval()
    batch = _batch(lp, tmp_path)  # rows: a comparison (reference, A, B), a tampered and an authentic image
    ids = batch["input_ids"]
    with torch.no_grad():
        low = model.encode_lowlevel(batch["lowlevel_pixels"])
    assert model.map_verdicts(ids, batch, low) == [None, None, None]  # no verdict_map: nothing is read
    model.config.verdict_map = [0.7, -0.2]
    got = model.map_verdicts(ids, batch, low)
    rows = model.row_images(ids, batch)
    for row in range(3):
        m = low.aux[rows[row][-1]][1].max()
        assert got[row] == pytest.approx(float(torch.sigmoid(0.7 * m - 0.2)))
        assert got[row] == pytest.approx(map_verdict(low.aux[rows[row][-1]][1], (0.7, -0.2)))
    # the two forgery rows judge the same file; the comparison's judged image is its last, B, another one
    assert got[1] == got[2] and got[0] != got[1]
