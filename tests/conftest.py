"""Shared fixtures: a tiny trained Loupe checkpoint (built once per test session, offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path to a tiny Qwen2.5-VL Loupe checkpoint overfit on three examples (see tests/helpers.py)."""
    from tests.helpers import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def tiny_assistant(tiny_checkpoint):
    from loupe_vlm.assistant.inference import Assistant

    return Assistant.from_pretrained(tiny_checkpoint)
