"""Fixtures for the demo and API tests: the demo and the API server on free ports of 127.0.0.1."""

from __future__ import annotations

import base64
import socket
import threading
import time

import pytest

from tests.helpers import ASSETS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


@pytest.fixture(scope="session")
def demo_url(tiny_assistant):
    """The gradio demo around the tiny assistant, launched as ``loupe demo`` launches it."""
    from loupe_vlm.demo.app import build_demo, launch_options

    demo = build_demo(tiny_assistant)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="session")
def api_url(tiny_assistant):
    """``loupe serve``'s app (with the demo at /ui) under uvicorn in a thread; files allowed under tests/assets."""
    import uvicorn

    from loupe_vlm.demo.serve import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(tiny_assistant, allow_files=ASSETS), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


RECORD_KEYS = {"id", "task", "images", "reference", "text", "confidence", "quality", "comparison", "forgery",
               "error", "model", "seconds"}


def assert_schema(rec: dict, task: str) -> None:
    """``rec`` follows DESIGN.md's result schema for ``task``, with the mask (if any) as base64 PNG."""
    from loupe_vlm.prompts import RATINGS

    assert set(rec) == RECORD_KEYS, set(rec) ^ RECORD_KEYS
    assert rec["task"] == task and rec["error"] is None
    assert isinstance(rec["text"], str) and rec["text"] and "<|mask|>" not in rec["text"]
    assert rec["confidence"] is None or 0.0 <= rec["confidence"] <= 1.0
    assert isinstance(rec["model"], str) and rec["seconds"] >= 0
    for other in {"quality", "comparison", "forgery"} - {{"quality": "quality", "compare": "comparison",
                                                           "forgery": "forgery"}[task]}:
        assert rec[other] is None, other
    if task == "quality":
        q = rec["quality"]
        assert set(q) == {"rating", "score", "distortions"}
        assert q["rating"] is None or q["rating"] in {r.id for r in RATINGS}
        assert q["score"] is None or 1.0 <= q["score"] <= 5.0
        assert all({"name", "category", "severity"} <= set(d) for d in q["distortions"])
    elif task == "compare":
        c = rec["comparison"]
        assert {"better", "probability"} <= set(c)
        assert c["better"] in (None, "A", "B")
        assert (c["better"] is None) == (c["probability"] is None)
        assert c["probability"] is None or 0.5 <= c["probability"] <= 1.0
    else:
        f = rec["forgery"]
        assert {"tampered", "probability", "mask", "manipulation", "area"} <= set(f)
        assert f["probability"] is None or 0.0 <= f["probability"] <= 1.0
        if f["mask"] is not None:
            assert base64.b64decode(f["mask"])[:8] == b"\x89PNG\r\n\x1a\n"


def decode_mask(b64: str):
    """A base64 PNG mask -> bool HxW array."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64)))) > 127
