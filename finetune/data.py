"""Training data: records from one or more dataset folders, mixed by weight, bucketed by length.

* ``read_split`` scans each folder's ``train.jsonl``/``val.jsonl`` (Sample records, DESIGN.md),
  skipping bad lines through ``BadRecords``, which warns with the file and line and stops the run
  once more than ``max_bad_records`` have been seen. It also estimates each record's token length
  from its text and its images' headers (no decoding), so batches can be planned up front.
* ``epoch_batches`` plans one epoch as a list of batches of record indices: each folder contributes
  records in proportion to its mixing weight, and with bucketing, records of similar length share a
  batch (transformers' ``get_length_grouped_indices``). The plan depends only on (seed, epoch), so
  a resumed run skips to the same batch and sees exactly what an uninterrupted run would have.
* ``LoupeDataset`` encodes a record with ``LoupeProcessor.encode_sample`` (chat template, labels on
  assistant turns only, low-level tensors, masks). A record that fails to load becomes a ``BadItem``
  instead of an exception, so it can be counted in the training process even with DataLoader workers.
* ``Collator`` drops bad items and pads the rest with ``LoupeProcessor.collate``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from loupe_vlm.assistant.processing import Encoded, ImageError, LoupeProcessor
from loupe_vlm.prompts import Sample, iter_jsonl

logger = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The data cannot be trained on: too many bad records, or no usable records at all."""


@dataclass
class BadItem:
    """A record that could not be encoded: where (file:line) and why."""

    where: str
    reason: str
    kind: str = "bad"  # "bad" counts toward max_bad_records; "too_long" is skipped without counting


class BadRecords:
    """Counts skipped records and warns with file and line; raises ``DataError`` past the limit."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0
        self.too_long = 0
        self.last = ""

    def add(self, item: BadItem, check: bool = True) -> None:
        """Count and log one skipped record; with ``check``, raise once past the limit."""
        if item.kind == "too_long":
            self.too_long += 1
            logger.warning("skipping %s: %s", item.where, item.reason)
            return
        self.count += 1
        self.last = f"{item.where}: {item.reason}"
        logger.warning("skipping bad record %s: %s (%d/%d allowed)", item.where, item.reason, self.count, self.limit)
        if check:
            self.check()

    def check(self) -> None:
        """Raise ``DataError`` if more bad records than the limit have been seen."""
        if self.count > self.limit:
            raise DataError(f"{self.count} bad records, over the limit of {self.limit} (max_bad_records); the "
                            f"last was {self.last}. Fix or rebuild the dataset, or raise the limit.")


@dataclass
class Record:
    """One usable record: its sample, where it came from, and its estimated token length."""

    sample: Sample
    root: Path
    where: str
    length: int
    source: int  # index of its dataset folder


@dataclass
class Split:
    """The records of one split across dataset folders; ``by_source[i]`` indexes ``records``."""

    records: list[Record]
    by_source: list[list[int]] = field(default_factory=list)


def estimate_length(sample: Sample, root: Path, lp: LoupeProcessor) -> int:
    """Token length of a record without decoding its images: text tokens + image tokens from the
    image headers and the pixel budget (the family's rule) + the chat template's overhead."""
    family = lp.family
    texts = [p.get("text", "") for m in sample.messages for p in m["content"] if p.get("type") == "text"]
    n = len(lp.tokenizer("".join(texts), add_special_tokens=False)["input_ids"])
    n += family.message_overhead() * len(sample.messages)
    for rel in sample.images:
        with Image.open(root / rel) as im:  # reads the header only
            w, h = im.size
        n += lp.image_token_count(w, h) + family.image_overhead() + lp.n_lowlevel_tokens
    return n


def read_split(folders: Sequence[str | Path], split: str, lp: LoupeProcessor, bad: BadRecords,
               max_length: int, required: bool = True) -> Split:
    """Read ``<folder>/<split>.jsonl`` of every folder. Bad lines go to ``bad``; records longer than
    ``max_length`` tokens are skipped. A folder without the split is an error when ``required``."""
    records: list[Record] = []
    by_source: list[list[int]] = []
    for src, folder in enumerate(folders):
        root = Path(folder)
        path = root / f"{split}.jsonl"
        if not path.is_file():
            if required:
                raise DataError(f"{path}: not found; a dataset folder needs {split}.jsonl (build one with "
                                "`loupe build-data`)")
            by_source.append([])
            continue
        errors: list = []
        mine = []
        for line, sample in iter_jsonl(path, errors=errors, check_files=True):
            where = f"{path}:{line}"
            try:
                length = estimate_length(sample, root, lp)
            except (OSError, ValueError) as exc:  # unreadable image header
                bad.add(BadItem(where, f"cannot read image ({exc})"))
                continue
            if length > max_length:
                bad.add(BadItem(where, f"about {length} tokens > max_length {max_length}", "too_long"))
                continue
            mine.append(len(records))
            records.append(Record(sample, root, where, length, src))
        for err in errors:
            bad.add(BadItem(f"{err.path}:{err.line}", f"{err.field + ': ' if err.field else ''}{err.reason}"))
        by_source.append(mine)
    return Split(records, by_source)


def first_records(split: Split, n: int) -> list[int]:
    """The first ``n`` record indices taken round-robin across folders (so every folder is validated)."""
    out: list[int] = []
    queues = [list(ix) for ix in split.by_source]
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def mixture_counts(sizes: Sequence[int], weights: Sequence[float] | None) -> list[int]:
    """Records each folder contributes per epoch: the epoch is as long as all folders together, and
    each folder's share follows its weight (a small folder with a big weight is repeated)."""
    total = sum(sizes)
    live = [i for i, s in enumerate(sizes) if s > 0]
    if not live:
        return [0] * len(sizes)
    if not weights:
        return list(sizes)
    wsum = sum(weights[i] for i in live)
    counts = [0] * len(sizes)
    for i in live:
        counts[i] = max(1, int(round(total * weights[i] / wsum)))
    return counts


def epoch_batches(split: Split, batch_size: int, *, epoch: int, seed: int, weights: Sequence[float] | None = None,
                  bucketing: bool = True, world_size: int = 1) -> list[list[int]]:
    """The batches (lists of record indices) of one epoch, the same for every process and every run
    with the same seed. Their number is a multiple of ``world_size`` so all processes step together."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    drawn: list[int] = []
    for ix, count in zip(split.by_source, mixture_counts([len(s) for s in split.by_source], weights)):
        reps = math.ceil(count / len(ix)) if ix else 0
        pool = [ix[j] for _ in range(reps) for j in torch.randperm(len(ix), generator=g).tolist()]
        drawn += pool[:count]
    if not drawn:
        raise DataError("no usable training records; check the dataset folders and the warnings above")
    if bucketing:
        from transformers.trainer_pt_utils import get_length_grouped_indices

        order = get_length_grouped_indices([split.records[i].length for i in drawn], batch_size * world_size,
                                           generator=g)
    else:
        order = torch.randperm(len(drawn), generator=g).tolist()
    ordered = [drawn[i] for i in order]
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()  # a short last batch would carry a different weight per record
    usable = len(batches) // world_size * world_size
    if usable == 0:
        raise DataError(f"{len(drawn)} records make {len(batches)} batch(es), fewer than the {world_size} processes")
    return batches[:usable]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded token grid that is padding, over a list of batches."""
    grid = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    real = sum(lengths[i] for b in batches for i in b)
    return 1 - real / grid if grid else 0.0


class LoupeDataset(torch.utils.data.Dataset):
    """Encodes records on demand; a record that fails becomes a ``BadItem`` rather than raising."""

    def __init__(self, split: Split, lp: LoupeProcessor, max_length: int):
        self.split = split
        self.lp = lp
        self.max_length = max_length

    def __len__(self) -> int:
        return len(self.split.records)

    def __getitem__(self, i: int) -> Encoded | BadItem:
        rec = self.split.records[i]
        try:
            enc = self.lp.encode_sample(rec.sample, rec.root, train=True)
        except (ImageError, ValueError, OSError) as exc:
            return BadItem(rec.where, str(exc))
        if enc.input_ids.numel() > self.max_length:
            return BadItem(rec.where, f"{enc.input_ids.numel()} tokens > max_length {self.max_length}", "too_long")
        return enc


@dataclass
class Batch:
    """A collated batch (None when every record in it was bad), the bad items, and the record count."""

    data: dict[str, Any] | None
    bad: list[BadItem]
    size: int


class Collator:
    """Drops bad items and pads the rest with ``LoupeProcessor.collate`` (right padding for training)."""

    def __init__(self, lp: LoupeProcessor):
        self.lp = lp

    def __call__(self, items: list[Encoded | BadItem]) -> Batch:
        good = [x for x in items if isinstance(x, Encoded)]
        bad = [x for x in items if isinstance(x, BadItem)]
        return Batch(self.lp.collate(good, padding_side="right") if good else None, bad, len(good))


def card_hashes(folders: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Each dataset folder with the SHA-256 of its card.md and train.jsonl (recorded in the checkpoint)."""
    out = []
    for folder in folders:
        entry: dict[str, Any] = {"path": str(Path(folder).resolve())}
        for name in ("card.md", "train.jsonl"):
            f = Path(folder) / name
            entry[name.replace(".", "_") + "_sha256"] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else None
        out.append(entry)
    return out


def corpus_texts(folders: Sequence[str | Path]) -> list[str]:
    """Every message text of every folder's train.jsonl: the corpus a scratch base's tokenizer is trained on."""
    texts: list[str] = []
    for folder in folders:
        path = Path(folder) / "train.jsonl"
        if not path.is_file():
            raise DataError(f"{path}: not found; a dataset folder needs train.jsonl (build one with `loupe build-data`)")
        for _, sample in iter_jsonl(path, errors=[]):  # bad lines are reported when the split is read
            texts += [p["text"] for m in sample.messages for p in m["content"] if p.get("type") == "text"]
    return texts
