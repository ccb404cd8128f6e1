"""``loupe serve``'s OpenAI-compatible API, driven by the official ``openai`` client on 127.0.0.1."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.demo.conftest import assert_schema, data_url, decode_mask
from tests.helpers import ASSETS

QUALITY_Q = "How is the quality of this image?"
FORGERY_Q = "Has this image been tampered with? If so, where?"


@pytest.fixture(scope="module")
def client(api_url):
    return openai.OpenAI(base_url=f"{api_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def _msgs(question, *images):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


@pytest.mark.parametrize("question, n_images, extra, task, roles", [
    ("How is the quality of this image?", 1, {}, "quality.assess", ["A"]),
    ("Was this photo edited?", 1, {}, "forgery.detect", ["A"]),
    ("Which is better?", 2, {}, "quality.rate", ["A", "B"]),
    ("Which is better?", 2, {"loupe_detail": True}, "quality.compare", ["A", "B"]),
    ("Which is better?", 3, {}, "quality.rate", ["reference", "A", "B"]),
    ("How good is it?", 2, {"loupe_task": "quality"}, "quality.assess", ["reference", "A"]),
])
def test_requests_are_routed_to_tasks(question, n_images, extra, task, roles):
    from loupe_vlm.demo.serve import _Images, build_request

    body = {"model": "m", "messages": _msgs(question, *[data_url(ASSETS / "clean.png")] * n_images), **extra}
    req = build_request(body, _Images(None))
    assert (req.task, req.roles) == (task, roles)


def test_a_conversation_with_an_assistant_turn_continues_as_chat():
    from loupe_vlm.demo.serve import _Images, build_request

    msgs = _msgs(QUALITY_Q, data_url(ASSETS / "noisy.png")) + [
        {"role": "assistant", "content": "The quality is poor."}, {"role": "user", "content": "Why?"}]
    req = build_request({"model": "m", "messages": msgs}, _Images(None))
    assert req.task == "chat" and len(req.images) == 1 and req.messages[-1]["content"][0]["text"] == "Why?"


def test_models_lists_the_one_model(client, tiny_assistant):
    assert [m.id for m in client.models.list().data] == [tiny_assistant.name]


def test_quality_answer_carries_text_and_the_structured_result(client, model_id, tiny_assistant):
    r = client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, data_url(ASSETS / "noisy.png")))
    direct = tiny_assistant.assess(ASSETS / "noisy.png")
    choice = r.choices[0]
    assert choice.message.content == direct.text and choice.finish_reason == "stop"
    rec = choice.model_extra["loupe"]
    assert_schema(rec, "quality")
    assert rec["quality"]["rating"] == "poor" and rec["text"] == direct.text


def test_streaming_forgery_answer_and_mask(client, tiny_assistant):
    stream = client.chat.completions.create(model="tiny-test", stream=True,  # the id without "@sha" works too
                                            messages=_msgs(FORGERY_Q, data_url(ASSETS / "tampered.png")))
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    direct = tiny_assistant.detect_forgery(ASSETS / "tampered.png", detail=False)
    assert len(chunks) > 3 and text == direct.text and "<|mask|>" not in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    rec = chunks[-1].choices[0].model_extra["loupe"]
    assert_schema(rec, "forgery")
    assert rec["forgery"]["tampered"] is True
    assert np.array_equal(decode_mask(rec["forgery"]["mask"]), direct.forgery.mask)


def test_two_images_compare_and_loupe_task_overrides_the_words(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=_msgs(
        "Which is better?", data_url(ASSETS / "clean.png"), data_url(ASSETS / "noisy.png")))
    rec = r.choices[0].model_extra["loupe"]
    assert_schema(rec, "compare")
    assert rec["images"] == ["image-1", "image-2"]
    r = client.chat.completions.create(model=model_id, messages=_msgs("Describe it.", data_url(ASSETS / "clean.png")),
                                       extra_body={"loupe_task": "forgery"})
    assert_schema(r.choices[0].model_extra["loupe"], "forgery")


def test_file_paths_only_inside_the_allowed_root(client, model_id, tiny_assistant):
    r = client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, "noisy.png"))
    assert r.choices[0].message.content == tiny_assistant.assess(ASSETS / "noisy.png").text
    for outside in ("/etc/hostname", "../conftest.py", f"file://{ASSETS.parent / 'helpers.py'}"):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, outside))
    with pytest.raises(openai.BadRequestError, match="not fetched"):
        client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, "http://127.0.0.1:1/x.png"))


def test_errors_have_the_openai_shape_and_status(client, model_id):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=_msgs(QUALITY_Q, data_url(ASSETS / "noisy.png")))
    assert info.value.code == "model_not_found" and "gpt-4o" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, "data:image/png;base64,bm9wZQ=="))
    assert info.value.code == "invalid_image"
    with pytest.raises(openai.BadRequestError, match="at least one image"):
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}])


def test_ten_megabytes_of_junk_is_refused_and_the_server_stays_up(client, model_id, api_url):
    junk = "data:image/png;base64," + __import__("base64").b64encode(os.urandom(10 * 1024 * 1024)).decode()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=model_id, messages=_msgs(QUALITY_Q, junk))
    assert info.value.status_code == 413 and "limit" in info.value.message  # refused before decoding
    raw = httpx.post(f"{api_url}/v1/chat/completions", content=os.urandom(10 * 1024 * 1024), timeout=60)
    assert raw.status_code in (413, 400) and "error" in raw.json()
    assert client.models.list().data[0].id == model_id  # still serving


def test_concurrent_requests_are_all_answered_correctly(client, model_id, tiny_assistant):
    cases = [("noisy.png", QUALITY_Q), ("tampered.png", FORGERY_Q), ("clean.png", FORGERY_Q)] * 2
    expected = {"noisy.png": tiny_assistant.assess(ASSETS / "noisy.png").text,
                "tampered.png": tiny_assistant.detect_forgery(ASSETS / "tampered.png", detail=False).text,
                "clean.png": tiny_assistant.detect_forgery(ASSETS / "clean.png", detail=False).text}

    def ask(case):
        name, q = case
        r = client.chat.completions.create(model=model_id, messages=_msgs(q, data_url(ASSETS / name)))
        return name, r.choices[0].message.content, r.choices[0].model_extra["loupe"]

    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        answers = list(pool.map(ask, cases))
    assert [a[1] for a in answers] == [expected[name] for name, _ in cases]
    assert [a[2]["forgery"]["tampered"] for a in answers if a[0] != "noisy.png"] == [True, False] * 2


def test_the_demo_is_mounted_at_ui(api_url):
    r = httpx.get(f"{api_url}/ui/", timeout=30)
    assert r.status_code == 200 and "gradio" in r.text.lower()
