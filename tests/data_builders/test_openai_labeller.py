"""The openai labeller against a local chat-completions server, through the real ``openai`` client:
filtering of wrong replies, the on-disk cache, retries on 429/500/timeouts/malformed bodies, and a
whole build with ``--labeller openai``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loupe_vlm.data_builders.labellers.base import ImageTruth, LabelJob
from loupe_vlm.data_builders.labellers.openai_client import LabellerError, OpenAILabeller
from loupe_vlm.data_builders.labellers.openai_quality import OpenAIQualityLabeller
from loupe_vlm.data_builders.quality import main
from loupe_vlm.data_builders.sources import encode_png
from loupe_vlm.prompts import load_jsonl

from .llm_server import Server, answer_from_notes, hallucinate

PNG = encode_png(np.full((16, 16, 3), 120, np.uint8))


def _jobs(n: int = 8) -> list[LabelJob]:
    out = []
    for i in range(n):
        a = ImageTruth([{"name": "blur_gaussian", "category": "blur", "severity": 1 + i % 5}],
                       ["good", "fair", "poor", "poor", "bad"][i % 5])
        b = ImageTruth([{"name": "noise_gaussian_rgb", "category": "noise", "severity": 5},
                        {"name": "compression_jpeg", "category": "compression", "severity": 4}], "bad")
        task = ["quality.identify", "quality.assess", "quality.compare", "quality.rate"][i % 4]
        pair = task in ("quality.compare", "quality.rate")
        job = LabelJob(task, task != "quality.identify" and i % 2 == 1 or task == "quality.compare", False,
                       f"scene {i}", a, b if pair else None, "A" if pair else None, key=str(i),
                       images={"A": PNG, "B": PNG} if pair else {"A": PNG})
        out.append(job)
    return out


def _labeller(server: Server, tmp_path, **kw) -> OpenAIQualityLabeller:
    client = OpenAILabeller(server.base_url, "test-model", api_key="k", cache_dir=tmp_path / "cache",
                            backoff=0.01, max_backoff=0.05, timeout=kw.pop("timeout", 5.0), **kw)
    return OpenAIQualityLabeller(client)


def test_good_replies_kept_and_wrong_ones_dropped(tmp_path):
    def behaviour(body, n):
        text = json.dumps(body)
        i = int(text.split("Content: scene ")[1].split(".")[0])
        if i % 4 == 0:
            return 200, hallucinate(body), 0
        if i % 4 == 1:
            return 200, "Sorry, I cannot assess this image.", 0
        return 200, answer_from_notes(body), 0

    with Server(behaviour) as server:
        lab = _labeller(server, tmp_path, max_workers=3)
        results = lab.label_many(_jobs(8))
    kept = [i for i, (t, _) in enumerate(results) if t is not None]
    assert kept == [2, 3, 6, 7]
    assert results[0][0] is None and "categories differ" in results[0][1]
    assert results[1] == (None, "refusal")
    assert lab.accepted == 4 and sum(lab.rejected.values()) == 4
    assert results[2][0].startswith("Image A is better.")


def test_never_tells_the_model_it_was_told_in_the_question(tmp_path):
    seen = []

    def behaviour(body, n):
        seen.append(body)
        return 200, answer_from_notes(body), 0

    with Server(behaviour) as server:
        _labeller(server, tmp_path).label(_jobs(2)[1])
    msgs = seen[0]["messages"]
    assert msgs[0]["role"] == "system" and "never" in msgs[0]["content"].lower()
    parts = msgs[1]["content"]
    assert parts[1]["type"] == "image_url" and parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert '"moderate Gaussian blur"' in parts[-1]["text"] and "Overall quality: fair." in parts[-1]["text"]


def test_cache_makes_reruns_free(tmp_path):
    with Server() as server:
        jobs = _jobs(6)
        first = _labeller(server, tmp_path).label_many(jobs)
        n = server.requests
        second_lab = _labeller(server, tmp_path)
        second = second_lab.label_many(jobs)
        assert server.requests == n == 6
        assert first == second and second_lab.client.stats.cache_hits == 6


def test_retries_429_500_timeout_and_malformed_then_succeeds(tmp_path):
    script = {1: (429, "slow down", 0), 2: (500, "boom", 0), 3: (200, "late", 1.5), 4: (200, "RAW:{not json", 0),
              5: (200, "RAW:" + json.dumps({"id": "x", "object": "chat.completion", "choices": []}), 0)}

    def behaviour(body, n):
        return script.get(n, (200, answer_from_notes(body), 0))

    with Server(behaviour) as server:
        lab = _labeller(server, tmp_path, timeout=0.5, max_retries=6)
        text, why = lab.label(_jobs(2)[1])
    assert why is None and text.endswith("Overall, the quality is fair.")
    assert lab.client.stats.retries == 5 and server.requests >= 6


def test_gives_up_after_retries_and_fails_fast_on_auth(tmp_path):
    with Server(lambda body, n: (500, "down", 0)) as server:
        lab = _labeller(server, tmp_path, max_retries=2)
        text, why = lab.label(_jobs(1)[0])
        assert text is None and why.startswith("request failed") and server.requests == 3
    with Server(lambda body, n: (401, "bad key", 0)) as server:
        client = OpenAILabeller(server.base_url, "m", api_key="wrong", backoff=0.01)
        with pytest.raises(LabellerError, match="OPENAI_API_KEY"):
            client.complete([{"role": "user", "content": "hi"}])
        assert server.requests == 1


def test_build_with_openai_labeller_filters_caches_and_resumes(tmp_path, image_folder):
    def behaviour(body, n):
        return (200, hallucinate(body), 0) if n % 5 == 0 else (200, answer_from_notes(body), 0)

    out = tmp_path / "q"
    with Server(behaviour) as server:
        argv = ["--out", str(out), "--n", "30", "--images", str(image_folder), "--image-size", "48",
                "--labeller", "openai", "--base-url", server.base_url, "--model", "m", "--no-progress"]
        assert main(argv) == 0
        kept = [s for split in ("train", "val", "test") for s in load_jsonl(out / f"{split}.jsonl", check_files=True)]
        dropped = (out / "dropped.jsonl").read_text().splitlines()
        assert len(kept) + len(dropped) == 30 and len(dropped) >= 3
        assert all(s.meta["labeller"] == "openai:m@prompts1" for s in kept)
        n = server.requests
        assert main(argv) == 0  # a rerun: nothing to do, nothing asked
        assert server.requests == n
    card = (out / "card.md").read_text()
    assert "openai:m@prompts1" in card and "dropped" in card
