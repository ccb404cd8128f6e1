"""The forensic network (assistant/forensic.py), its training command and how the assistant reads it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from loupe_vlm.assistant import forensic as forensic_mod
from loupe_vlm.assistant.forensic import (FORENSIC_FILE, SIDE, ForensicError, ForensicNet, forensic_maps,
                                          load_forensic, load_forensic_model, save_forensic, to_input)
from loupe_vlm.assistant.inference import Request, checkpoint_id
from tests.helpers import ASSETS


def _untrained_reading(height: int, width: int):
    """A seeded untrained network, an input batch of two, and the network's reading of it."""
    torch.manual_seed(0)
    net = ForensicNet(pretrained=False).eval()
    x = torch.rand(2, 3, height, width)
    with torch.no_grad():
        maps, logits = net(x)
    return net, x, maps, logits


def test_the_network_maps_at_a_quarter_and_round_trips_through_safetensors(tmp_path):
    net, x, maps, logits = _untrained_reading(64, 96)
    assert maps.shape == (2, 16, 24) and logits.shape == (2,)
    save_forensic(net, tmp_path / FORENSIC_FILE, {"epoch": 3})
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    back = load_forensic(tmp_path / FORENSIC_FILE)
    with torch.no_grad():
        maps2, logits2 = back(x)
    # stored as int8 weights with per-channel scales: the same maps to within 5e-2
    assert torch.allclose(maps, maps2, atol=5e-2) and torch.allclose(logits, logits2, atol=5e-2)
    assert load_forensic_model(tmp_path) is not None and load_forensic_model(tmp_path / "none") is None
    # any image comes in at SIDE x SIDE, in [0, 1]
    img = to_input(np.full((30, 50, 3), 255, np.uint8))
    assert img.shape == (3, SIDE, SIDE) and float(img.max()) == 1.0
    (m, z), = forensic_maps(back, [np.zeros((40, 40, 3), np.uint8)])
    assert m.shape == (SIDE // 4, SIDE // 4) and math.isfinite(z)
    # a reading is the mean of the image's and its mirror image's (mirrored back)
    photo = (np.random.default_rng(0).random((SIDE, SIDE, 3)) * 255).astype(np.uint8)
    (m, z), = forensic_maps(back, [photo])
    x = to_input(photo).unsqueeze(0)
    with torch.no_grad():
        (m1, z1), (m2, z2) = back(x), back(x.flip(-1))
    assert torch.allclose(m, (m1[0] + m2[0].flip(-1)) / 2, atol=1e-5)
    assert z == pytest.approx(float(z1 + z2) / 2, abs=1e-5)
    assert not torch.allclose(m1[0], m2[0].flip(-1), atol=1e-3)  # the two readings differ: the mean is not a no-op


def test_the_channels_last_layout_training_uses_reads_the_same_and_saves(tmp_path):
    # loupe train forensic (and refit-heads' trunk) train in channels-last layout for speed: the same
    # readings, and a network in that layout is written and read back like any other
    net, x, maps, logits = _untrained_reading(64, 64)
    with torch.no_grad():
        net.to(memory_format=torch.channels_last)
        assert net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
        maps2, logits2 = net(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(maps, maps2, atol=1e-4) and torch.allclose(logits, logits2, atol=1e-4)
    save_forensic(net, tmp_path / FORENSIC_FILE)
    with torch.no_grad():
        maps3, _ = load_forensic(tmp_path / FORENSIC_FILE)(x)
    assert torch.allclose(maps, maps3, atol=5e-2)


def test_a_file_that_is_not_a_forensic_network_is_refused_with_what_to_do(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "loupe-reference-1"})
    with pytest.raises(ForensicError, match=r"other\.safetensors.*loupe train forensic"):
        load_forensic(tmp_path / "other.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ForensicError, match=r"broken\.safetensors.*not a readable"):
        load_forensic(tmp_path / "broken.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "shape.safetensors"), metadata={"format": forensic_mod.FORMAT})
    with pytest.raises(ForensicError, match="do not fit"):
        load_forensic(tmp_path / "shape.safetensors")


def test_forgery_questions_read_the_forensic_network_for_their_verdict(tiny_assistant, monkeypatch):
    """With a forensic network, a forgery row's P(tampered) is verdict_map read on its image-level logit, not
    on the heads' map;
    quality rows never run it; without one the heads' map decides as before."""
    model = tiny_assistant.model
    monkeypatch.setattr(model.config, "verdict_map", [1.0, 0.0])
    heads = torch.full((24, 32), -4.0)  # the heads see nothing
    monkeypatch.setattr(model, "tamper_maps", lambda ids, batch, low: {r: heads for r in range(ids.shape[0])})
    strong = torch.full((SIDE // 4, SIDE // 4), -3.0)
    strong[10:20, 30:40] = 2.5
    calls = []

    def fake(net, images):
        calls.append([im.size for im in images])
        return [(strong, 1.5) for _ in images]

    monkeypatch.setattr(forensic_mod, "forensic_maps", fake)
    monkeypatch.setattr(tiny_assistant, "forensic", object())
    out = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"]),
                              Request("quality.assess", [ASSETS / "noisy.png"], ["A"])])
    assert calls == [[(128, 96)]]  # the judged image of the forgery row only
    # verdict_map reads the network's image-level logit
    assert out[0].forgery.probability == pytest.approx(1 / (1 + math.exp(-1.5)), abs=1e-4)
    assert out[0].forgery.tampered and out[1].forgery is None
    monkeypatch.setattr(tiny_assistant, "forensic", None)
    r = tiny_assistant.run([Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])])[0]
    assert len(calls) == 1 and r.forgery.probability == pytest.approx(1 / (1 + math.exp(4.0)), abs=1e-4)


def test_a_forgery_mask_averages_the_decoder_and_the_forensic_map(tiny_assistant, monkeypatch):
    from loupe_vlm.assistant.processing import resize_logits

    model = tiny_assistant.model
    monkeypatch.setattr(model.config, "verdict_map", [1.0, 0.0])
    sure = torch.full((SIDE // 4, SIDE // 4), 3.0)  # both maps say tampered: the answer has a mask token
    monkeypatch.setattr(model, "tamper_maps", lambda ids, batch, low: {r: sure[:24, :32] for r in range(ids.shape[0])})
    req = Request("forgery.detect", [ASSETS / "tampered.png"], ["A"])
    alone = tiny_assistant.run([req])[0]
    assert alone.forgery.tampered and alone.forgery.mask_probability is not None, alone.text
    fmap = torch.full((SIDE // 4, SIDE // 4), -3.0)
    fmap[:, :28] = 3.0
    monkeypatch.setattr(forensic_mod, "forensic_maps", lambda net, images: [(fmap, 3.0) for _ in images])
    monkeypatch.setattr(tiny_assistant, "forensic", object())
    both = tiny_assistant.run([req])[0]
    fprob = torch.sigmoid(resize_logits(fmap, (96, 128))).numpy()
    assert both.text == alone.text and both.forgery.tampered
    assert np.allclose(both.forgery.mask_probability, (alone.forgery.mask_probability + fprob) / 2, atol=1e-5)
    # the streamed answer (the demo, serve) gives the same mask
    *_, streamed = list(tiny_assistant.stream(req))
    assert np.allclose(streamed.forgery.mask_probability, both.forgery.mask_probability, atol=1e-5)


def test_the_model_id_digests_the_forensic_network(tmp_path, tiny_checkpoint):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    before = checkpoint_id(ckpt, "tiny")
    save_forensic(ForensicNet(pretrained=False), ckpt / FORENSIC_FILE)
    assert checkpoint_id(ckpt, "tiny") != before


# ---- loupe train forensic ------------------------------------------------------------------------

def _forgery_split(root, name, n, seed):
    """``n`` forgery records: half with a bright square pasted in (its mask given), half untouched."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        img = (rng.random((48, 48, 3)) * 120).astype(np.uint8)
        rec = {"id": f"{name}-{i}", "task": "forgery.detect", "images": [f"images/{name}-{i}.png"],
               "image_roles": ["A"], "messages": [
                   {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tampered?"}]},
                   {"role": "assistant", "content": [{"type": "text", "text": "The image is authentic."}]}],
               "masks": [], "meta": {"tampered": False}}
        if i % 2:
            mask = np.zeros((48, 48), np.uint8)
            mask[10:30, 12:32] = 255
            img[mask > 0] = 250
            Image.fromarray(mask).save(root / "masks" / f"{name}-{i}.png")
            rec["masks"] = [f"masks/{name}-{i}.png"]
            rec["messages"][1]["content"][0]["text"] = "The image is tampered: a pasted square <|mask|>."
            rec["meta"] = {"tampered": True, "manipulation": "splice"}
        Image.fromarray(img).save(root / "images" / f"{name}-{i}.png")
        lines.append(json.dumps(rec))
    (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n{broken\n")
    return root / f"{name}.jsonl"


def test_train_forensic_fits_resumes_writes_and_refuses_bad_inputs(tmp_path, capsys, tiny_checkpoint):
    import shutil

    from loupe_vlm.finetune.forensic import main

    data = tmp_path / "data"
    train, val = _forgery_split(data, "train", 6, 0), _forgery_split(data, "val", 4, 1)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    work = tmp_path / "work"
    common = ["--checkpoint", str(ckpt), "--data", str(train), "--val", str(val), "--work", str(work),
              "--batch-size", "4", "--no-progress"]
    assert main(common + ["--epochs", "1", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "epoch 1: auc_image" in out and "pixel_f1" in out and "dry run" in out
    assert "malformed JSON" in err  # the broken line is skipped and named
    assert not (ckpt / FORENSIC_FILE).exists()
    state = json.loads((work / "state.json").read_text())
    assert state["step"] == 2 and len(state["history"]) == 1
    # the same command with more epochs carries on from the saved step
    assert main(common + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 2 of 4" in out and "epoch 2: auc" in out and "epoch 1: auc" not in out
    assert load_forensic_model(ckpt) is not None
    # a test split, a folder that is not a checkpoint, a missing file
    test = data / "test.jsonl"
    shutil.copy(val, test)
    assert main(["--checkpoint", str(ckpt), "--data", str(test), "--val", str(val), "--work", str(work)]) == 2
    assert "test split" in capsys.readouterr().err
    assert main(["--checkpoint", str(tmp_path), "--data", str(train), "--val", str(val), "--work", str(work)]) == 2
    assert "not a Loupe checkpoint" in capsys.readouterr().err
    one_kind = data / "onekind.jsonl"
    one_kind.write_text(val.read_text().splitlines()[1] + "\n")
    assert main(["--checkpoint", str(ckpt), "--data", str(train), "--val", str(one_kind), "--work", str(work)]) == 2
    assert "needs tampered and authentic" in capsys.readouterr().err
    assert main(["--checkpoint", str(ckpt), "--data", str(tmp_path / "none.jsonl"), "--val", str(val),
                 "--work", str(work)]) == 2
    assert "none.jsonl" in capsys.readouterr().err


def test_export_copies_the_forensic_network_and_writes_the_same_tokenizer_compactly(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from loupe_vlm.finetune.export import export
    from tests.assistant.test_aux import _tiny

    model, lp = _tiny(1.0)
    model.save_pretrained(tmp_path / "ck", processor=lp.processor)
    save_forensic(ForensicNet(pretrained=False), tmp_path / "ck" / FORENSIC_FILE)
    export(tmp_path / "ck", tmp_path / "ex")
    assert (tmp_path / "ex" / FORENSIC_FILE).read_bytes() == (tmp_path / "ck" / FORENSIC_FILE).read_bytes()
    before, after = tmp_path / "ck" / "tokenizer.json", tmp_path / "ex" / "tokenizer.json"
    old, new = json.loads(before.read_text()), json.loads(after.read_text())
    assert "\n" not in after.read_text() and after.stat().st_size < before.stat().st_size
    if isinstance(old["model"].get("merges"), list) and old["model"]["merges"]:  # a BPE model: its merges as strings
        assert new["model"]["merges"] == [" ".join(m) if isinstance(m, list) else m for m in old["model"]["merges"]]
    a, b = PreTrainedTokenizerFast(tokenizer_file=str(before)), PreTrainedTokenizerFast(tokenizer_file=str(after))
    assert a.get_vocab() == b.get_vocab()
    for text in ("The image is tampered: a pasted region <|mask|> in the top left.",
                 "Image A is better; the quality is poor (JPEG q=8), 12% of the image, déjà vu."):
        assert a.encode(text) == b.encode(text)


def test_train_forensic_trains_without_a_model_and_writes_into_one_later_without_training(tmp_path, capsys,
                                                                                       tiny_checkpoint, monkeypatch):
    import shutil

    from loupe_vlm.finetune import forensic
    from loupe_vlm.finetune.forensic import main

    data = tmp_path / "data"
    train, val = _forgery_split(data, "train", 6, 0), _forgery_split(data, "val", 4, 1)
    work = tmp_path / "work"
    common = ["--data", str(train), "--val", str(val), "--work", str(work), "--batch-size", "4", "--no-progress",
              "--epochs", "2"]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "epoch 2: auc" in out and "no --checkpoint" in out and str(work / "best.safetensors") in out
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)

    def no_reading(*a, **k):
        raise AssertionError("a finished run read its data again")

    monkeypatch.setattr(forensic, "read_forgery", no_reading)
    assert main(common + ["--checkpoint", str(ckpt)]) == 0
    assert "not trained again" in capsys.readouterr().out
    assert (ckpt / FORENSIC_FILE).read_bytes() == (work / "best.safetensors").read_bytes()
    assert load_forensic_model(ckpt) is not None
    # more epochs than the finished run's: it trains on (and so reads the data)
    with pytest.raises(AssertionError, match="read its data again"):
        main(common[:-1] + ["3", "--checkpoint", str(ckpt)])
