"""Data: label masking in the collator, bad records, bucketing and mixing weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from loupe_vlm.assistant.processing import IGNORE_INDEX, LoupeProcessor
from loupe_vlm.finetune.data import (
    BadRecords,
    Collator,
    DataError,
    LoupeDataset,
    Record,
    Split,
    epoch_batches,
    mixture_counts,
    padding_fraction,
    read_split,
)
from tests.finetune.conftest import TRAIN, write_dataset
from tests.helpers import TAMPERED_ANSWER, tiny_model


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def lp() -> LoupeProcessor:
    return tiny_model()[1]


def test_collator_labels_only_the_answer(dataset, lp):
    split = read_split([dataset], "train", lp, BadRecords(0), max_length=512)
    ds = LoupeDataset(split, lp, 512)
    ids = [i for i, r in enumerate(split.records) if r.sample.id in ("f-tampered", "q-ab")]
    batch = Collator(lp)([ds[i] for i in ids]).data
    tok = lp.tokenizer
    for row in range(len(ids)):
        input_ids, labels = batch["input_ids"][row], batch["labels"][row]
        labelled = labels != IGNORE_INDEX
        first = int(labelled.nonzero()[0])
        assert not labelled[:first].any()
        # everything before the answer (system/user turns, image and low-level tokens) is masked
        assert "<|im_start|>assistant" in tok.decode(input_ids[:first])
        assert not labelled[input_ids == lp.lowlevel_token_id].any()
        assert not labelled[input_ids == tok.convert_tokens_to_ids("<|image_pad|>")].any()
        assert torch.equal(labels[labelled], input_ids[labelled])
        answer = tok.decode(input_ids[labelled])
        assert answer.endswith("<|im_end|>")  # the end token is learnt, so the model stops
        assert not labelled[batch["attention_mask"][row] == 0].any()  # padding
    answer = tok.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX])
    assert TAMPERED_ANSWER in answer or answer.startswith("Image A is better")
    masks = [m for m in batch["masks"] if m is not None]
    assert len(masks) == 1 and masks[0].shape[0] == 1 and masks[0].max() == 1.0


def test_bad_records_are_skipped_and_counted(tmp_path, lp, caplog):
    root = tmp_path / "data"
    broken = dict(TRAIN[0], id="q-missing", images=["images/nowhere.png"])
    truncated = dict(TRAIN[1], id="q-trunc", images=["images/truncated.png"])
    write_dataset(root, extra_lines=["{not json", json.dumps(broken), json.dumps(truncated)])
    data = (root / "images" / "clean.png").read_bytes()
    (root / "images" / "truncated.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut off

    bad = BadRecords(limit=5)
    with caplog.at_level(logging.WARNING, logger="loupe_vlm.finetune.data"):
        split = read_split([root], "train", lp, bad, max_length=512)
        ds = LoupeDataset(split, lp, 512)
        batch = Collator(lp)([ds[i] for i in range(len(ds))])
        for item in batch.bad:
            bad.add(item)
    assert len(split.records) == len(TRAIN) + 1  # the truncated image is only found when decoded
    assert batch.size == len(TRAIN) and len(batch.bad) == 1
    assert bad.count == 3
    train_jsonl = root / "train.jsonl"
    for line in (7, 8, 9):
        assert any(f"{train_jsonl}:{line}" in r.getMessage() for r in caplog.records), line

    with pytest.raises(DataError, match="over the limit of 1"):
        read_split([root], "train", lp, BadRecords(limit=1), max_length=512)


def test_a_run_stops_past_the_bad_record_limit(tmp_path, capsys):
    from loupe_vlm.finetune.train import main

    root = write_dataset(tmp_path / "data", extra_lines=["{not json", "[]"])
    recipe = str(Path(__file__).resolve().parents[2] / "finetune" / "recipes" / "tiny-smoke.yaml")
    assert main(["--config", recipe, "--data", str(root), "--output", str(tmp_path / "run"),
                 "--max_bad_records", "1"]) == 2
    err = capsys.readouterr().err
    assert "over the limit of 1" in err and "train.jsonl:8" in err


def _split(lengths_per_source: list[list[int]]) -> Split:
    records, by_source = [], []
    for src, lengths in enumerate(lengths_per_source):
        by_source.append([])
        for n in lengths:
            by_source[-1].append(len(records))
            records.append(Record(sample=None, root=Path("."), where="-", length=n, source=src))
    return Split(records, by_source)


def test_bucketing_lowers_padding():
    g = torch.Generator().manual_seed(0)
    split = _split([torch.randint(60, 900, (400,), generator=g).tolist()])
    lengths = [r.length for r in split.records]
    plain = epoch_batches(split, 8, epoch=0, seed=0, bucketing=False)
    bucketed = epoch_batches(split, 8, epoch=0, seed=0, bucketing=True)
    assert sorted(i for b in plain for i in b) == sorted(i for b in bucketed for i in b)
    assert padding_fraction(bucketed, lengths) < 0.5 * padding_fraction(plain, lengths)


def test_plans_are_reproducible_and_sharded():
    split = _split([[100] * 30])
    a = epoch_batches(split, 4, epoch=3, seed=1)
    assert a == epoch_batches(split, 4, epoch=3, seed=1)
    assert a != epoch_batches(split, 4, epoch=4, seed=1)
    two = epoch_batches(split, 4, epoch=0, seed=1, world_size=2)
    assert len(two) % 2 == 0 and all(len(b) == 4 for b in two)


def test_mixing_weights_set_each_folders_share():
    assert mixture_counts([90, 10], None) == [90, 10]
    assert mixture_counts([90, 10], [1, 1]) == [50, 50]
    split = _split([[100] * 90, [100] * 10])
    batches = epoch_batches(split, 10, epoch=0, seed=0, weights=[1, 3])
    drawn = [split.records[i].source for b in batches for i in b]
    assert drawn.count(1) == 75 and drawn.count(0) == 25  # the small folder is repeated 7.5x
