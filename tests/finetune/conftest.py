"""Fixtures for the finetune tests: a tiny Sample-format dataset folder built from tests/assets.

Quality records (assess, identify, rate) and forgery records (one tampered image with its mask, one
authentic), so a run exercises text-only batches and batches with mask tokens alike.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers import ASSETS, AUTHENTIC_ANSWER, QUALITY_ANSWER, TAMPERED_ANSWER, chat

CLEAN_ANSWER = "The image is sharp and clean, with no visible distortion. Overall, the quality is good."
IDENTIFY_ANSWER = "The image has serious Gaussian noise."
RATE_ANSWER = "Image A is better: image B suffers from serious noise."


def record(id_: str, task: str, images: list[str], answer: str, masks: list[str] = (), meta: dict | None = None) -> dict:
    roles = ["A", "B"][:len(images)]
    return {"id": id_, "task": task, "images": images, "image_roles": roles,
            "messages": chat(task, answer, len(images)), "masks": list(masks), "meta": meta or {}}


TRAIN = [
    record("q-noisy", "quality.assess", ["images/noisy.png"], QUALITY_ANSWER, meta={"rating": "poor"}),
    record("q-clean", "quality.assess", ["images/clean.png"], CLEAN_ANSWER, meta={"rating": "good"}),
    record("q-id", "quality.identify", ["images/noisy.png"], IDENTIFY_ANSWER),
    record("q-ab", "quality.rate", ["images/clean.png", "images/noisy.png"], RATE_ANSWER, meta={"better": "A"}),
    record("f-tampered", "forgery.detect", ["images/tampered.png"], TAMPERED_ANSWER, ["masks/tampered.png"],
           meta={"tampered": True}),
    record("f-clean", "forgery.detect", ["images/clean.png"], AUTHENTIC_ANSWER, meta={"tampered": False}),
]
VAL = [TRAIN[0], TRAIN[4], TRAIN[5]]


def write_dataset(root: Path, train: list[dict] = TRAIN, val: list[dict] = VAL, extra_lines: list[str] = ()) -> Path:
    """Write a dataset folder (images/, masks/, train.jsonl, val.jsonl, card.md) at ``root``."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for name in ("clean.png", "noisy.png", "tampered.png"):
        shutil.copy(ASSETS / name, root / "images" / name)
    shutil.copy(ASSETS / "tampered_mask.png", root / "masks" / "tampered.png")
    lines = [json.dumps(r) for r in train] + list(extra_lines)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    (root / "card.md").write_text(f"# test dataset\n\n{len(train)} train / {len(val)} val records from tests/assets\n")
    return root



SMOKE_RECIPE = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")


def trunk_run_args(dataset: Path) -> list[str]:
    """A one-step run of a tiny model whose heads read an EfficientNet trunk (lowlevel_trunk), frozen after stage 1."""
    return ["--config", SMOKE_RECIPE, "--data", str(dataset), "--base", "scratch:test:llama", "--image_trunk",
            "efficientnet-lite0", "--image_pretrained", "false", "--lowlevel_trunk", "true", "--min_pixels", "4096",
            "--max_pixels", "9216", "--aux_weight", "1", "--save_every", "0", "--batch_size", "4", "--lr", "1e-2",
            "--warmup_steps", "0", "--max_steps", "1", "--scratch.lowlevel_freeze", "true"]

@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A tiny dataset folder of quality and forgery records."""
    return write_dataset(tmp_path_factory.mktemp("ds") / "data")


@contextlib.contextmanager
def one_thread():
    """One intra-op torch thread: on a busy 2-core machine, torch's spinning thread pool made these
    tiny models ~20x slower (1 s vs 0.05 s CPU per step)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` in a test module."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny pretrained-style base folder (a scratch:test Qwen2.5-VL saved as a plain transformers
    model + processor), standing in for a hub base such as Qwen/Qwen2.5-VL-3B-Instruct."""
    from loupe_vlm.assistant.bases import build_scratch_base

    path = tmp_path_factory.mktemp("base") / "tiny-base"
    vlm, processor = build_scratch_base("scratch:test", [r["messages"][1]["content"][0]["text"] for r in TRAIN], min_pixels=28 * 28, max_pixels=64 * 64)
    vlm.save_pretrained(path)
    processor.save_pretrained(path)
    return path
