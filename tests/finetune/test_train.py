"""The training loop end to end on the tiny-smoke recipe: a loadable checkpoint, exact resume, overfitting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loupe_vlm.finetune import train as train_mod
from loupe_vlm.finetune.train import main
from tests.finetune.conftest import one_thread, trunk_run_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(out) if "split" not in r}


@pytest.fixture(scope="module")
def smoke_run(dataset, tmp_path_factory) -> Path:
    """tiny-smoke.yaml straight through: 4 steps, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    with one_thread():
        assert main(["--config", RECIPE, "--data", str(dataset), "--output", str(out), "--task_eval_every", "4",
                     "--task_eval_samples", "1"]) == 0
    return out


def test_tiny_smoke_writes_a_loadable_checkpoint(smoke_run, dataset):
    from loupe_vlm.assistant.inference import Assistant

    losses = train_losses(smoke_run)
    assert sorted(losses) == [1, 2, 3, 4]
    assert (smoke_run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (smoke_run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    cfg = json.loads((smoke_run / "loupe_config.json").read_text())
    training = cfg["training"]
    assert training["steps"] == 4 and training["config"]["base"] == "scratch:test"
    assert training["datasets"][0]["card_md_sha256"] and len(training["datasets"][0]["card_md_sha256"]) == 64
    task_rows = [r for r in metrics(smoke_run) if r.get("split") == "task_eval"]  # loupe eval's metrics
    assert len(task_rows) == 1 and "data/run.errors" in task_rows[0]
    assistant = Assistant.from_pretrained(smoke_run, max_new_tokens=8)
    assert assistant.name.startswith("tiny-smoke@")
    result = assistant.assess(dataset / "images" / "noisy.png")
    assert result.error is None and isinstance(result.text, str)


def test_kill_and_resume_gives_the_same_losses(dataset, tiny_base, tmp_path, monkeypatch):
    # LoRA with dropout and grad accumulation: resuming must restore the RNG and the data position exactly
    args = ["--config", RECIPE, "--data", str(dataset), "--base", str(tiny_base), "--method", "lora",
            "--lora_dropout", "0.3", "--grad_accum", "2", "--max_steps", "5", "--save_every", "2", "--eval_every", "0"]
    straight, out = tmp_path / "straight", tmp_path / "killed"
    assert main(args + ["--output", str(straight)]) == 0
    real_log = train_mod.log_metrics

    def log_then_die(run, m):  # the process is "killed" right after logging step 3
        real_log(run, m)
        if m.get("step") == 3 and "split" not in m:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "log_metrics", log_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output", str(out)])
    monkeypatch.setattr(train_mod, "log_metrics", real_log)
    assert sorted(train_losses(out)) == [1, 2, 3]
    assert main(args + ["--output", str(out), "--resume", "latest"]) == 0
    resumed, expected = train_losses(out), train_losses(straight)
    assert sorted(resumed) == [1, 2, 3, 4, 5]  # step 3 of the killed run was dropped and redone
    for step in (3, 4, 5):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_overfits_a_handful_of_samples(dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(out), "--batch_size", "6",
            "--max_steps", "12", "--eval_every", "4", "--save_every", "0", "--lr", "3e-3", "--warmup_steps", "0",
            "--schedule", "constant", "--val_samples", "3"]
    assert main(args) == 0
    rows = metrics(out)
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "val"]
    first, last = train_rows[0], train_rows[-1]
    assert last["ce"] < 0.75 * first["ce"]
    assert last["mask"] < first["mask"]
    assert val_rows[-1]["val_mask_iou"] > val_rows[0]["val_mask_iou"] + 0.2
    assert val_rows[-1]["val_token_accuracy"] > val_rows[0]["val_token_accuracy"]


def test_lowlevel_pretraining_runs_first_and_learns_the_aux_labels(dataset, tmp_path):
    out = tmp_path / "run"
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(out), "--aux_weight", "1",
            "--scratch.lowlevel_pretrain_steps", "10", "--max_steps", "2", "--log_every", "1", "--save_every", "0",
            "--batch_size", "6",
            "--lr", "1e-2", "--warmup_steps", "0", "--schedule", "cosine"]
    assert main(args) == 0
    rows = metrics(out)
    pre = [r for r in rows if r.get("split") == "lowlevel_pretrain"]
    assert [r["step"] for r in pre] == list(range(1, 11))
    lrs = [r["lr"] for r in pre]  # the run's schedule, over the stage's own steps: cosine decay
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 0.9e-2 and lrs[-1] < 0.1e-2
    assert rows.index(pre[-1]) < rows.index(next(r for r in rows if "split" not in r))  # before the main loop
    assert pre[-1]["aux"] < 0.8 * pre[0]["aux"]
    train_rows = [r for r in rows if "split" not in r]
    assert all("aux" in r for r in train_rows)  # the aux loss goes on in the main loop
    config = json.loads((out / "loupe_config.json").read_text())
    assert config["aux_weight"] == 1.0


def test_lowlevel_pretraining_needs_aux_weight(dataset, tmp_path, capsys):
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(tmp_path / "run"),
            "--scratch.lowlevel_pretrain_steps", "5"]
    assert main(args) == 2
    assert "aux_weight" in capsys.readouterr().err


def test_frozen_lowlevel_encoder_stays_fixed_but_its_token_projection_trains_and_resumes(dataset, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(out), "--aux_weight", "1",
            "--scratch.lowlevel_pretrain_steps", "2", "--scratch.lowlevel_freeze", "true", "--max_steps", "3", "--save_every", "1",
            "--keep_last", "3", "--batch_size", "6", "--lr", "1e-2", "--warmup_steps", "0", "--scratch.key_token_weight", "3"]
    assert main(args) == 0
    heads = [load_file(str(out / "checkpoints" / f"step-{s:07d}" / "heads.safetensors")) for s in (1, 3)]
    assert torch.equal(heads[0]["lowlevel.stem.0.0.weight"], heads[1]["lowlevel.stem.0.0.weight"])
    assert torch.equal(heads[0]["lowlevel.aux_head.0.weight"], heads[1]["lowlevel.aux_head.0.weight"])
    assert not torch.equal(heads[0]["lowlevel.to_tokens.0.weight"], heads[1]["lowlevel.to_tokens.0.weight"])
    config = json.loads((out / "loupe_config.json").read_text())
    assert config["scratch"]["key_token_weight"] == 3.0 and len(config["scratch"]["key_token_ids"]) > 10
    # resuming from step 1 restores the frozen encoder too (it is not rebuilt from the base)
    assert main(args + ["--resume", str(out / "checkpoints" / "step-0000001")]) == 0
    again = load_file(str(out / "checkpoints" / "step-0000003" / "heads.safetensors"))
    assert torch.equal(again["lowlevel.stem.0.0.weight"], heads[1]["lowlevel.stem.0.0.weight"])


def test_freezing_an_untrained_encoder_is_refused(dataset, tmp_path, capsys):
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(tmp_path / "run"), "--scratch.lowlevel_freeze", "true"]
    assert main(args) == 2
    assert "lowlevel_pretrain_steps" in capsys.readouterr().err


def test_lowlevel_init_starts_from_another_runs_encoder(dataset, tmp_path, capsys):
    from safetensors.torch import load_file

    first = tmp_path / "first"
    base = ["--config", RECIPE, "--data", str(dataset), "--aux_weight", "1", "--save_every", "0", "--batch_size", "6",
            "--warmup_steps", "0"]
    assert main(base + ["--output", str(first), "--scratch.lowlevel_pretrain_steps", "2", "--max_steps", "1"]) == 0
    second = tmp_path / "second"
    assert main(base + ["--output", str(second), "--scratch.lowlevel_init", str(first), "--scratch.lowlevel_freeze", "true",
                        "--max_steps", "1", "--scratch.evidence_tokens", "true"]) == 0
    a, b = (load_file(str(d / "heads.safetensors")) for d in (first, second))
    assert torch.equal(a["lowlevel.stem.0.0.weight"], b["lowlevel.stem.0.0.weight"])
    assert json.loads((second / "loupe_config.json").read_text())["n_lowlevel_tokens"] == 7
    # an encoder of another width is refused with the field named
    assert main(base + ["--output", str(tmp_path / "third"), "--scratch.lowlevel_init", str(first), "--lowlevel_width", "16",
                        "--max_steps", "1"]) == 2
    assert "lowlevel_init" in capsys.readouterr().err


def test_a_trunk_fine_tuned_by_stage_one_is_kept_and_restored_on_resume(dataset, tmp_path):
    # lowlevel_trunk: stage 1 fine-tunes the ImageEncoder trunk with the heads, then freezes it; a resumed
    # run must restore that trunk, not rebuild the initial one (which made the heads' verdicts chance)
    from safetensors.torch import load_file

    out = tmp_path / "run"
    key = "image_encoder.trunk.blocks.15._project_conv.weight"
    args = ["--config", RECIPE, "--data", str(dataset), "--output", str(out), "--base", "scratch:test:llama",
            "--image_trunk", "efficientnet-lite0", "--image_pretrained", "false", "--lowlevel_trunk", "true",
            "--min_pixels", "4096", "--max_pixels", "9216", "--aux_weight", "1",
            "--scratch.lowlevel_pretrain_steps", "3", "--scratch.lowlevel_freeze", "true", "--max_steps", "2",
            "--save_every", "1", "--keep_last", "3", "--batch_size", "4", "--lr", "1e-2", "--warmup_steps", "0"]
    assert main(args) == 0
    first = [load_file(str(out / "checkpoints" / f"step-{s:07d}" / "heads.safetensors"))[key] for s in (1, 2)]
    assert torch.equal(first[0], first[1])  # frozen in stage 2
    assert main(args + ["--resume", str(out / "checkpoints" / "step-0000001")]) == 0
    again = load_file(str(out / "checkpoints" / "step-0000002" / "heads.safetensors"))[key]
    assert torch.equal(again, first[1])


def test_lowlevel_init_brings_the_trunk_its_heads_read(dataset, tmp_path):
    # reusing stage 1 of an earlier run: with lowlevel_trunk the heads read the fine-tuned trunk, so
    # lowlevel_init must bring that trunk too, or the heads would read the untrained one
    from safetensors.torch import load_file

    key = "image_encoder.trunk.blocks.15._project_conv.weight"
    base = trunk_run_args(dataset)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(base + ["--output", str(first), "--scratch.lowlevel_pretrain_steps", "3"]) == 0
    assert main(base + ["--output", str(second), "--scratch.lowlevel_init", str(first), "--seed", "1"]) == 0
    a, b = (load_file(str(d / "heads.safetensors")) for d in (first, second))
    assert torch.equal(a[key], b[key]) and torch.equal(a["lowlevel.aux_head.0.weight"], b["lowlevel.aux_head.0.weight"])


def test_lowlevel_init_from_refitted_heads_brings_their_own_trunk(dataset, tmp_path):
    # heads refitted by `loupe train refit-heads` read their own copy of the trunk (heads_trunk.*): a run
    # started from them must read it too, and keep both trunks fixed in stage 2
    from safetensors.torch import load_file, save_file

    block = "blocks.15._project_conv.weight"
    base = trunk_run_args(dataset)
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(base + ["--output", str(first), "--scratch.lowlevel_pretrain_steps", "2"]) == 0
    state = load_file(str(first / "heads.safetensors"))
    for key in [k for k in state if k.startswith("image_encoder.trunk.")]:
        state["heads_trunk." + key[len("image_encoder.trunk."):]] = state[key] + 0.5  # a refitted copy
    save_file(state, str(first / "heads.safetensors"))
    assert main(base + ["--output", str(second), "--scratch.lowlevel_init", str(first), "--seed", "1"]) == 0
    after = load_file(str(second / "heads.safetensors"))
    assert torch.equal(after["heads_trunk." + block], state["heads_trunk." + block])
    assert torch.equal(after["image_encoder.trunk." + block], state["image_encoder.trunk." + block])
    assert json.loads((second / "loupe_config.json").read_text())["heads_trunk"] is True
