"""``loupe train refit-heads`` (finetune/heads.py): the heads train further on their own trunk copy while
everything the language model reads stays as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loupe_vlm.finetune.train import main
from tests.finetune.conftest import trunk_run_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")


NOISE = [{"name": "noise_gaussian", "category": "noise", "severity": 4}]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """The finetune fixture's records, its quality ones with the builders' distortion labels."""
    from tests.finetune.conftest import TRAIN, write_dataset

    train = [dict(r, meta={**r["meta"], "distortions": NOISE if "noisy" in r["images"][-1] else []})
             if r["task"].startswith("quality.") and r["task"] != "quality.rate" else r for r in TRAIN]
    return write_dataset(tmp_path_factory.mktemp("labelled") / "data", train, [train[0], train[1], train[4], train[5]])


def trunk_args(dataset: Path, out: Path) -> list[str]:
    """``trunk_run_args`` with 2 steps of stage 1 before its step of stage 2, written to ``out``."""
    return trunk_run_args(dataset) + ["--output", str(out), "--scratch.lowlevel_pretrain_steps", "2"]


@pytest.fixture(scope="module")
def trunk_run(labelled, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refit") / "run"
    assert main(trunk_args(labelled, out)) == 0
    return out


def test_stage_one_alone_then_refit_then_stage_two_reads_the_refitted_heads(labelled, tmp_path, capsys):
    # make loupe-smol's order: stage 1 alone (--max_steps 0), the refit, then stage 2 over the refitted heads
    from safetensors.torch import load_file

    s1, refit, s2 = tmp_path / "s1", tmp_path / "refit", tmp_path / "s2"
    assert main(trunk_args(labelled, s1) + ["--max_steps", "0"]) == 0
    config = json.loads((s1 / "loupe_config.json").read_text())
    assert config["training"]["steps"] == 0
    rows = [json.loads(line) for line in (s1 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "lowlevel_pretrain"][-1] == 2
    assert not [r for r in rows if "split" not in r]  # no optimizer step of stage 2
    assert main(["refit-heads", "--checkpoint", str(s1), "--data", str(labelled), "--out", str(refit),
                 "--steps", "2", "--batch-size", "4", "--lr", "1e-2", "--head-lr", "1e-2", "--warmup", "1",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(trunk_args(labelled, s2) + ["--scratch.lowlevel_init", str(refit),
                                            "--scratch.lowlevel_pretrain_steps", "0"]) == 0
    a, b = (load_file(str(d / "heads.safetensors")) for d in (refit, s2))
    for k in ("heads_trunk.blocks.15._project_conv.weight", "lowlevel.aux_head.0.weight",
              "image_encoder.trunk.blocks.15._project_conv.weight"):
        assert torch.equal(a[k], b[k]), k
    assert json.loads((s2 / "loupe_config.json").read_text())["training"]["steps"] == 1
    # 0 steps without a stage 1 would train nothing: a config error
    assert main(trunk_args(labelled, tmp_path / "none") + ["--max_steps", "0", "--scratch.lowlevel_pretrain_steps",
                                                          "0", "--scratch.lowlevel_freeze", "false"]) == 2
    assert "max_steps" in capsys.readouterr().err


def test_refit_heads_moves_only_the_heads_and_their_own_trunk(trunk_run, labelled, tmp_path, capsys):
    from safetensors.torch import load_file

    dataset = labelled
    from loupe_vlm.assistant.modeling import ExplainableVLM

    out = tmp_path / "refit"
    assert main(["refit-heads", "--checkpoint", str(trunk_run), "--data", str(dataset), "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--lr", "1e-2", "--head-lr", "1e-2", "--warmup", "1",
                 "--save-every", "2", "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    after = report["val_after"]
    assert report["val_before"] is not None and (after["n_distorted"], after["n_clean"], after["n_forgery"]) == (1, 1, 2)
    assert 0 <= after["category_top1"] <= 1 and 0 <= after["tampered_accuracy"] <= 1
    a, b = (load_file(str(d / "heads.safetensors")) for d in (trunk_run, out))
    key = "blocks.15._project_conv.weight"
    # the image tokens' trunk, the branch's convolutions and the token projection are untouched ...
    for k in (f"image_encoder.trunk.{key}", "lowlevel.stem.0.0.weight", "lowlevel.to_tokens.0.weight",
              "mask_decoder.query.0.weight"):
        assert torch.equal(a[k], b[k]), k
    # ... while the heads and their own copy of the trunk (started from the one they read) have moved
    assert f"heads_trunk.{key}" in b and not torch.equal(b[f"heads_trunk.{key}"], a[f"image_encoder.trunk.{key}"])
    assert not torch.equal(a["lowlevel.aux_head.0.weight"], b["lowlevel.aux_head.0.weight"])
    model, _ = ExplainableVLM.from_pretrained(out)
    assert model.config.heads_trunk and model.heads_trunk_net is model.heads_trunk
    assert model.config.training["refit_heads"]["settings"]["steps"] == 3
    # the progress saved on the way names its step; a second call with the same --out has nothing left to do
    assert json.loads((out / "refit" / "state.json").read_text())["step"] == 3
    assert main(["refit-heads", "--checkpoint", str(trunk_run), "--data", str(dataset), "--out", str(out),
                 "--steps", "3", "--batch-size", "4", "--no-progress"]) == 0
    assert torch.equal(load_file(str(out / "heads.safetensors"))[f"heads_trunk.{key}"], b[f"heads_trunk.{key}"])


def test_refit_heads_refuses_a_model_whose_heads_read_no_trunk(dataset, tmp_path, capsys):
    from loupe_vlm.assistant.modeling import new_model
    from tests.finetune.conftest import TRAIN

    run = tmp_path / "plain"
    model, processor = new_model("scratch:test", corpus=[r["messages"][1]["content"][0]["text"] for r in TRAIN],
                                 aux_weight=1.0)
    model.save_pretrained(run, processor=processor)
    assert main(["refit-heads", "--checkpoint", str(run), "--data", str(dataset), "--out", str(tmp_path / "o"),
                 "--steps", "1", "--no-progress"]) == 2
    assert "lowlevel_trunk" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["refit-heads", "--checkpoint", str(run), "--data", str(dataset), "--out", str(tmp_path / "o"),
              "--steps", "0"])
