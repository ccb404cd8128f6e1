"""TrainConfig: recipes map one-to-one onto fields, CLI overrides, one error naming every bad field."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import pytest
import yaml

from loupe_vlm.assistant.modeling import LoupeConfig, ModelOptions, ScratchOptions
from loupe_vlm.finetune.config import ConfigError, TrainConfig, field_docs, field_names, load_config
from loupe_vlm.finetune.train import main, parse_args

RECIPES = Path(__file__).resolve().parents[2] / "finetune" / "recipes"
SMOKE = str(RECIPES / "tiny-smoke.yaml")


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_maps_onto_fields(recipe):
    raw = yaml.safe_load((RECIPES / recipe).read_text())
    names = {f.name for f in fields(TrainConfig)}
    assert set(raw) <= names, f"{recipe}: keys that are not TrainConfig fields: {set(raw) - names}"
    cfg = load_config(RECIPES / recipe, {"data": ["somewhere"]} if "data" not in raw else None)
    for key, value in raw.items():
        if key == "scratch":
            got = asdict(cfg.scratch)
            assert {k: got[k] for k in value} == value, key
        else:
            assert getattr(cfg, key) == value, key


def test_shipped_recipes_are_there():
    names = {p.name for p in RECIPES.glob("*.yaml")}
    assert {"tiny-smoke.yaml", "loupe-tiny.yaml", "qwen2.5vl-3b-lora.yaml", "qwen2.5vl-7b-qlora.yaml",
            "qwen3vl-4b-lora.yaml"} <= names
    assert load_config(RECIPES / "qwen2.5vl-7b-qlora.yaml", {"data": ["d"]}).resolved_method == "qlora"
    assert load_config(RECIPES / "loupe-tiny.yaml", {"data": ["d"]}).resolved_method == "full"


def test_every_field_is_documented():
    docs = field_docs()
    names = field_names()
    assert "scratch.fusion_lr" in names and "decoder_width" in names and "scratch" not in names
    assert all(docs.get(n) for n in names), set(names) - set(docs)


def test_cli_overrides_the_recipe():
    cfg = parse_args(["--config", SMOKE, "--data", "a", "b", "--data-weights", "1", "3", "--lr", "1e-4",
                      "--gradient-checkpointing", "--bucketing", "false", "--max_steps", "7", "--resume"])
    assert cfg.data == ["a", "b"] and cfg.data_weights == [1.0, 3.0]
    assert cfg.lr == 1e-4 and cfg.max_steps == 7 and cfg.batch_size == 2  # batch_size from the recipe
    assert cfg.gradient_checkpointing is True and cfg.bucketing is False and cfg.resume == "latest"


def test_all_problems_in_one_error_naming_the_fields(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("base: scratch:test\nlr: fast\nbatch_sizes: 4\ndata: [d]\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    text = str(err.value)
    assert "lr:" in text and "batch_sizes:" in text and str(recipe) in text and len(err.value.problems) == 2
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", SMOKE, "--data", "d", "--lr", "-1", "--batch_size", "0", "--schedule", "wavy",
                    "--data-weights", "1", "2", "--method", "qlora"])
    named = {p.split(":")[0] for p in err.value.problems}
    assert named == {"lr", "batch_size", "schedule", "data_weights", "method"}


def test_main_reports_config_problems(capsys):
    assert main(["--config", SMOKE, "--lr", "0"]) == 2
    err = capsys.readouterr().err
    assert "lr: must be > 0" in err and "data: give at least one dataset folder" in err


def test_saved_config_loads_back(tmp_path):
    cfg = parse_args(["--config", SMOKE, "--data", "x", "--data-weights", "2"])
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_model_fields_are_declared_once_and_derived():
    """TrainConfig and LoupeConfig share ModelOptions; neither repeats its fields, and the scratch knobs
    are a group of their own, not core fields."""
    shared = {f.name for f in fields(ModelOptions)}
    assert issubclass(TrainConfig, ModelOptions) and issubclass(LoupeConfig, ModelOptions)
    for knob in ("evidence_fusion", "fusion_scope", "key_token_weight", "mask_prior", "lowlevel_context"):
        assert knob not in {f.name for f in fields(TrainConfig)} | {f.name for f in fields(LoupeConfig)}
        assert knob in {f.name for f in fields(ScratchOptions)}
    cfg = parse_args(["--config", SMOKE, "--data", "d", "--decoder_width", "24", "--scratch.mask_prior", "true",
                      "--aux_weight", "1"])
    derived = cfg.model_fields()
    assert set(derived) == shared | {"scratch"} and derived["decoder_width"] == 24
    assert derived["scratch"] == ScratchOptions(mask_prior=True)


def test_scratch_group_from_yaml_cli_and_legacy_flat_keys(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("base: scratch:test\ndata: [d]\naux_weight: 1.0\nscratch:\n  fusion_lr: 0.01\n"
                      "  evidence_fusion: true\nmask_prior: true\n")  # mask_prior: flat, as before the group
    cfg = load_config(recipe, {"scratch.fusion_scope": "vocab"})
    assert cfg.scratch.fusion_lr == 0.01 and cfg.scratch.evidence_fusion and cfg.scratch.mask_prior
    assert cfg.scratch.fusion_scope == "vocab"
    cfg.save(tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml") == cfg


def test_cross_field_checks_are_the_same_for_recipes_and_checkpoints():
    """One check, written once: a recipe and a checkpoint config with the same mistake say the same thing."""
    with pytest.raises(ConfigError) as err:
        parse_args(["--config", SMOKE, "--data", "d", "--scratch.mask_prior", "true", "--aux_weight", "0",
                    "--scratch.fusion_scope", "all"])
    problems = err.value.problems
    assert any(p.startswith("scratch.mask_prior: ") for p in problems)
    assert any(p.startswith("scratch.fusion_scope: ") for p in problems)
    ckpt = LoupeConfig(aux_weight=0.0)
    ckpt.scratch.mask_prior, ckpt.scratch.fusion_scope = True, "all"
    with pytest.raises(ValueError) as err2:
        ckpt.check()
    for p in problems:
        if p.startswith("scratch."):
            assert p in str(err2.value)
