"""The forgery builder end to end on a tiny folder: contract, consistency, determinism, splits, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest

from loupe_vlm.data_builders import forgery as F
from loupe_vlm.data_builders.forgery_text import region_facts
from loupe_vlm.prompts import MASK_TOKEN, load_jsonl
from loupe_vlm.prompts.parsing import count_mask_tokens, parse_locations, parse_manipulation, parse_verdict


def _build(out: Path, folder: Path, n: int = 40, seed: int = 0, **kw) -> dict:
    cfg = F.BuildConfig(out=out, n=n, images=[str(folder)], seed=seed, size=96, **kw)
    return F.build(cfg)


@pytest.fixture(scope="module")
def built(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("forgery") / "ds"
    summary = _build(out, image_folder)
    return out, summary


def _all(out: Path) -> list[tuple[str, object]]:
    return [(split, s) for split in ("train", "val", "test") for s in load_jsonl(out / f"{split}.jsonl",
                                                                                 check_files=True)]


def test_every_record_keeps_the_contract(built):
    out, summary = built
    samples = _all(out)
    assert summary["failures"] == [] and len(samples) == 40
    kinds = Counter(s.meta["manipulation"] or "authentic" for _, s in samples)
    assert set(kinds) == {"authentic", "splice", "copy_move", "removal", "aigc_edit"}
    assert 12 <= kinds["authentic"] <= 28, kinds  # about half
    for _, s in samples:
        text = s.answer()
        assert count_mask_tokens(text) == len(s.masks) == len(s.meta["regions"])
        assert parse_verdict(text) == ("tampered" if s.meta["tampered"] else "authentic")
        assert s.meta["tampered"] == bool(s.masks)
        assert s.meta["labeller"].startswith("template@")
        assert s.messages[0]["content"][0] == {"type": "image"}


def test_masks_are_exact_binary_and_match_the_explanation(built):
    out, _ = built
    for _, s in _all(out):
        img = cv2.imread(str(out / s.images[0]))
        text = s.answer()
        assert parse_locations(text) == [r["location"] for r in s.meta["regions"]]
        if s.meta["tampered"]:
            assert parse_manipulation(text) == s.meta["manipulation"]
        for rel, region in zip(s.masks, s.meta["regions"]):
            m = cv2.imread(str(out / rel), cv2.IMREAD_UNCHANGED)
            assert m.ndim == 2 and m.shape == img.shape[:2]
            assert set(np.unique(m)) <= {0, 255}
            facts = region_facts(m)
            assert facts["location"] == region["location"] and facts["bbox"] == region["bbox"]
            assert abs(facts["area"] - region["area"]) < 1e-4
            assert f"{round(100 * region['area'])}%" in text or s.meta["detail"] == "brief" or region["area"] < 0.01


def test_split_by_source_photo(built):
    out, _ = built
    photos: dict[str, set] = {}
    for split, s in _all(out):
        photos.setdefault(split, set()).add(s.meta["source_photo"])
        donor = s.meta.get("tamper", {}).get("donor")
        if donor and donor.startswith("file:"):
            photos[split].add(donor)
    assert len(photos) == 3
    assert not (photos["train"] & photos["val"]) and not (photos["train"] & photos["test"])
    assert not (photos["val"] & photos["test"])


def test_same_seed_same_dataset_and_resume(built, tmp_path, image_folder):
    out, _ = built
    other = tmp_path / "again"
    _build(other, image_folder, n=15)  # a shorter run, then resumed to 40
    _build(other, image_folder, n=40)
    for split in ("train", "val", "test"):
        assert (out / f"{split}.jsonl").read_text() == (other / f"{split}.jsonl").read_text()
    for rel in sorted(p.relative_to(out) for p in (out / "images").glob("*.png"))[:10]:
        assert (out / rel).read_bytes() == (other / rel).read_bytes()
    third = tmp_path / "seed1"
    _build(third, image_folder, n=10, seed=1)
    first_line = (out / "train.jsonl").read_text().splitlines()[0]
    assert (third / "train.jsonl").read_text().splitlines()[0] != first_line  # another seed, another dataset


def test_card_counts(built):
    out, _ = built
    card = (out / "card.md").read_text()
    for word in ("Samples per manipulation", "splice", "copy_move", "removal", "aigc_edit", "authentic",
                 "Post-processing", "Samples per domain", "face_swap", "does **not** imitate"):
        assert word in card


def test_cli_contact_sheet_and_bad_flags(tmp_path, image_folder, capsys):
    out = tmp_path / "cli"
    sheet = tmp_path / "sheet.png"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png at all")
    rc = F.main(["--out", str(out), "--n", "8", "--images", str(image_folder), str(bad), "--size", "64", "--post",
                 "--manipulations", "copy_move", "--contact-sheet", str(sheet)])
    assert rc == 0
    samples = [s for split in ("train", "val", "test") for s in load_jsonl(out / f"{split}.jsonl")]
    assert {s.meta["manipulation"] for s in samples} <= {"copy_move", None}
    assert all(s.meta["post"] == [] for s in samples) and len(samples) == 8
    assert "broken.png: not an image" in (out / "card.md").read_text()
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[0] > 64
    assert F.main(["--out", str(tmp_path / "x"), "--n", "4", "--manipulations", "face_swap"]) == 2
    assert "face_swap" in capsys.readouterr().err


def test_openai_acceptance_check():
    meta = {"tampered": True, "manipulation": "splice", "regions": [{"location": "top_left"}, {"location": "bottom"}]}
    good = (f"This image has been tampered with: splicing in the top-left {MASK_TOKEN} and the bottom centre "
            f"{MASK_TOKEN}.")
    assert F.agrees(good, meta) is None
    assert "verdict" in F.agrees("This image appears authentic. " + good, meta)
    assert "mask tokens" in F.agrees(good.replace(f" {MASK_TOKEN} and", " and"), meta)
    assert "locations" in F.agrees(good.replace("bottom centre", "top centre"), meta)
    assert "manipulation" in F.agrees(good.replace("splicing", "copy-move"), meta)
    assert F.agrees("This image appears authentic.", {"tampered": False, "regions": []}) is None


class _FakeClient:
    """Stands in for OpenAILabeller at the edge (the HTTP client itself is tested with the labeller)."""

    model = "fake"

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def complete(self, messages, variant=0):
        self.calls.append((messages, variant))
        return self.replies.pop(0)


def test_openai_labeller_keeps_only_agreeing_replies(built):
    out, _ = built
    ctx = F.make_context(F.BuildConfig(out=out, n=40, images=[str(Path(_all(out)[0][1].meta["source"][5:]).parent)],
                                       size=96))
    made = next(m for m in (F.build_one(ctx, i, keep_arrays=True) for i in range(40)) if m.sample.meta["tampered"])
    loc = made.sample.meta["regions"][0]["location"]
    from loupe_vlm.prompts import LOCATIONS
    good = " ".join(f"in the {LOCATIONS[r['location']].text} {MASK_TOKEN}" for r in made.sample.meta["regions"])
    lab = F.ForgeryOpenAILabeller(_FakeClient(["This image appears authentic.", f"This image was tampered: {good}."]))
    lab.relabel(made)
    assert lab.accepted == 1 and lab.rejected["verdict"] == 1
    assert made.sample.answer().startswith("This image was tampered")
    from loupe_vlm.prompts.forgery_labeller import FORGERY_LABELLER_VERSION
    assert made.sample.meta["labeller"] == f"openai:fake@{FORGERY_LABELLER_VERSION}"
    msgs = lab.client.calls[0][0]
    assert msgs[1]["content"][0]["type"] == "image_url" and LOCATIONS[loc].text in msgs[1]["content"][1]["text"]
    lab2 = F.ForgeryOpenAILabeller(_FakeClient(["nonsense", "still nonsense"]))
    before = made.sample.answer()
    lab2.relabel(made)
    assert lab2.fallbacks == 1 and made.sample.answer() == before


_SEEN: set[str] = set()


def _forgery_reply(body: dict, n: int) -> tuple[int, str, float]:
    """An obedient model for the forgery facts that forgets a mask token the first time it sees a request."""
    import re

    text = "".join(p.get("text", "") for p in body["messages"][-1]["content"] if p.get("type") == "text")
    assert body["messages"][-1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    if "verdict: authentic" in text:
        return 200, "This image appears authentic: noise and lighting are consistent.", 0.0
    manip = re.search(r"- manipulation: (.+?) \(", text).group(1)
    locs = re.findall(r"location: ([^;]+);", text)
    places = " and ".join(f"the {loc} {MASK_TOKEN}" for loc in locs)
    reply = f"This image has been tampered with: {manip} in {places}."
    key = json.dumps(body["messages"], sort_keys=True)
    if key not in _SEEN:
        _SEEN.add(key)
        reply = reply.replace(f" {MASK_TOKEN}", "", 1)
    return 200, reply, 0.0


def test_build_with_openai_labeller_through_a_local_server(tmp_path, image_folder):
    from .llm_server import Server

    with Server(_forgery_reply) as server:
        cfg = F.BuildConfig(out=tmp_path / "oa", n=10, images=[str(image_folder)], size=64, labeller="openai",
                            openai_base_url=server.base_url, openai_model="test-model", post=())
        F.build(cfg)
        first = server.requests
        F.build(cfg)  # resumed: everything is written, nothing is asked again
        assert server.requests == first
    samples = _all(tmp_path / "oa")
    assert len(samples) == 10
    kept = [s for _, s in samples if s.meta["labeller"].startswith("openai:test-model")]
    assert kept, "agreeing replies are kept"
    for s in kept:
        assert F.agrees(s.answer(), s.meta) is None
        assert s.answer().startswith(("This image has been tampered with:", "This image appears authentic:"))
    card = (tmp_path / "oa" / "card.md").read_text()
    assert "OpenAI labeller" in card and "rejected replies (mask tokens disagreed)" in card
    assert any(s.meta.get("labeller_rejected") == ["mask tokens"] for _, s in samples)


def test_workers_give_the_same_dataset(tmp_path, image_folder):
    one, two = tmp_path / "one", tmp_path / "two"
    _build(one, image_folder, n=12)
    _build(two, image_folder, n=12, workers=2)
    for split in ("train", "val", "test"):
        assert (one / f"{split}.jsonl").read_text() == (two / f"{split}.jsonl").read_text()


def test_contact_sheet_cli_forgery_option(built, tmp_path):
    from loupe_vlm.data_builders import contact_sheet

    out, _ = built
    png = tmp_path / "forgery_sheet.png"
    assert contact_sheet.main(["--out", str(png), "--forgery", str(out), "--tile", "64"]) == 0
    sheet = cv2.imread(str(png))
    assert sheet is not None and sheet.shape[1] == 6 * 64
    # Tampered tiles carry the red tint of their masks.
    assert (sheet[..., 2].astype(int) - sheet[..., 1] > 80).any()
