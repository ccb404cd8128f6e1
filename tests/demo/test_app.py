"""The gradio demo, driven through gradio_client on 127.0.0.1 with the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.demo.conftest import assert_schema, decode_mask
from tests.helpers import ASSETS


@pytest.fixture(scope="module")
def client(demo_url):
    from gradio_client import Client

    return Client(demo_url, verbose=False)


def _analyse(client, image, mode, image_b=None, question=""):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)), handle_file(str(image_b)) if image_b else None, None, mode,
                          question, api_name="/analyse")


def test_quality_result_is_schema_valid_and_matches_the_assistant(client, tiny_assistant):
    rec = _analyse(client, ASSETS / "noisy.png", "Auto")
    assert_schema(rec, "quality")
    direct = tiny_assistant.assess(ASSETS / "noisy.png")
    assert rec["text"] == direct.text and rec["quality"]["rating"] == "poor"
    assert rec["quality"]["score"] == pytest.approx(direct.quality.score, abs=1e-3)
    assert rec["images"] == ["noisy.png"]


def test_forgery_result_has_the_assistants_mask(client, tiny_assistant):
    rec = _analyse(client, ASSETS / "tampered.png", "Forgery")
    assert_schema(rec, "forgery")
    direct = tiny_assistant.detect_forgery(ASSETS / "tampered.png", detail=True)
    assert rec["forgery"]["tampered"] is True and rec["text"] == direct.text
    mask = decode_mask(rec["forgery"]["mask"])
    assert mask.shape == (96, 128) and np.array_equal(mask, direct.forgery.mask)


def test_compare_result_is_schema_valid(client, tiny_assistant):
    rec = _analyse(client, ASSETS / "clean.png", "Compare", image_b=ASSETS / "noisy.png")
    assert_schema(rec, "compare")
    direct = tiny_assistant.compare(ASSETS / "clean.png", ASSETS / "noisy.png", detail=True)
    assert rec["images"] == ["clean.png", "noisy.png"] and rec["text"] == direct.text
    assert rec["comparison"]["better"] == direct.comparison.better


def test_auto_routes_a_tampering_question_to_forgery(client):
    rec = _analyse(client, ASSETS / "clean.png", "Auto", question="Was this photo edited?")
    assert_schema(rec, "forgery")


def test_chat_answers_without_the_mask_token_and_fills_the_report(client):
    from gradio_client import handle_file

    history, report, overlay, mask_file, record, *_ = client.predict(
        handle_file(str(ASSETS / "tampered.png")), None, None, "Forgery", "", [], api_name="/chat")
    answer = history[-1]
    assert answer["role"] == "assistant"
    text = " ".join(p["text"] for p in answer["content"]) if isinstance(answer["content"], list) else answer["content"]
    assert text == record["text"] and "tampered" in text and "<|mask|>" not in text
    assert "P(tampered)" in report and "Confidence" in report
    assert Image.open(mask_file).size == (128, 96)
    assert np.asarray(Image.open(overlay)).shape[:2] == (96, 128)


def test_too_many_pixels_are_refused_with_a_clear_message(client, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (5000, 4000)).save(big)  # 20 MP, but a small file
    with pytest.raises(Exception, match="megapixels"):
        _analyse(client, big, "Auto")


def test_uploads_over_the_byte_cap_are_refused_with_a_clear_message(client, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(10_500_000))
    with pytest.raises(Exception, match="maximum file size"):
        _analyse(client, big, "Auto")


def test_demo_main_exits_2_with_a_clear_message_without_a_model(tmp_path, capsys):
    from loupe_vlm.demo.app import main

    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "loupe demo:" in capsys.readouterr().err


def test_demo_without_a_model_asks_for_the_default_model(capsys, monkeypatch, tmp_path):
    from loupe_vlm.assistant import inference as assistant_inference
    from loupe_vlm.demo.app import main

    # as on a checkout where the embedded weights are missing
    monkeypatch.setattr(assistant_inference, "DEFAULT_MODEL_DIR", tmp_path / "no-loupe-tiny")
    assert main(["--port", "1"]) == 2
    assert f"make {assistant_inference.DEFAULT_MODEL_NAME}" in capsys.readouterr().err


def test_serve_main_exits_2_with_a_clear_message_without_a_model(tmp_path, capsys):
    from loupe_vlm.demo.serve import main

    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert "loupe serve:" in capsys.readouterr().err
    assert main(["--allow-files", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_model_calls_share_one_queue_slot_and_the_defaults_are_local(tiny_assistant):
    from loupe_vlm.demo.app import MODEL_CONCURRENCY_ID, build_demo, build_parser

    demo = build_demo(tiny_assistant)  # building loads nothing and starts nothing
    model_fns = [fn for fn in demo.fns.values() if fn.name in ("respond", "analyse")]
    assert len(model_fns) == 3  # Analyse button, Enter in the question box, the analyse API
    assert all(fn.queue and fn.concurrency_id == MODEL_CONCURRENCY_ID and fn.concurrency_limit == 1
               for fn in model_fns)
    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.model is None
