"""The ``Sample`` record: one JSONL line of a Loupe dataset (the data contract of DESIGN.md).

A dataset folder holds ``images/``, ``masks/``, ``train.jsonl``, ``val.jsonl``, ``test.jsonl`` and
``card.md``. Paths inside a record are relative to that folder. ``load_jsonl`` validates every line
and raises ``SampleError`` naming the file, the line and the field; ``iter_jsonl(..., errors=list)``
collects bad lines instead, for tools that must skip them and go on.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .templates import IMAGE_ROLES, TASKS
from .tokens import MASK_TOKEN


class SampleError(ValueError):
    """A record that breaks the data contract. ``str()`` names file, line and field."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None,
                 field_name: str | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field_name
        self.reason = message
        where = []
        if self.path:
            where.append(self.path)
        if line is not None:
            where.append(f"line {line}")
        if field_name:
            where.append(f"field '{field_name}'")
        prefix = ": ".join([", ".join(where)]) + ": " if where else ""
        super().__init__(prefix + message)


@dataclass
class Sample:
    """One instruction example: images, a chat in the transformers ``messages`` shape, masks, ground truth."""

    id: str
    task: str
    images: list[str]
    image_roles: list[str]
    messages: list[dict[str, Any]]
    masks: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- derived views -------------------------------------------------------------------------
    def assistant_texts(self) -> list[str]:
        """The text of every assistant turn, in order."""
        return [_text_of(m) for m in self.messages if m.get("role") == "assistant"]

    def answer(self) -> str:
        """The last assistant turn's text."""
        texts = self.assistant_texts()
        return texts[-1] if texts else ""

    def mask_token_count(self) -> int:
        return sum(t.count(MASK_TOKEN) for t in self.assistant_texts())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    # ---- checks --------------------------------------------------------------------------------
    def validate(self, root: str | os.PathLike | None = None) -> None:
        """Raise ``SampleError`` (naming the field) if the record breaks the contract.

        With ``root``, image and mask files must also exist under it.
        """
        if not isinstance(self.id, str) or not self.id:
            raise SampleError("must be a non-empty string", field_name="id")
        if self.task not in TASKS:
            raise SampleError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}",
                              field_name="task")
        if not isinstance(self.images, list) or not self.images:
            raise SampleError("must be a non-empty list of relative paths", field_name="images")
        if not isinstance(self.image_roles, list) or len(self.image_roles) != len(self.images):
            raise SampleError(f"needs one role per image ({len(self.images)})", field_name="image_roles")
        for role in self.image_roles:
            if role not in IMAGE_ROLES:
                raise SampleError(f"unknown role {role!r}; expected one of {', '.join(IMAGE_ROLES)}",
                                  field_name="image_roles")
        if len(set(self.image_roles)) != len(self.image_roles):
            raise SampleError("roles must not repeat", field_name="image_roles")
        for name, paths in (("images", self.images), ("masks", self.masks)):
            if not isinstance(paths, list):
                raise SampleError("must be a list", field_name=name)
            for p in paths:
                _check_relative(p, name)
                if root is not None and not (Path(root) / p).is_file():
                    raise SampleError(f"file {p!r} not found under {root}", field_name=name)
        self._validate_messages()
        n_tokens = self.mask_token_count()
        if n_tokens != len(self.masks):
            raise SampleError(f"{n_tokens} mask token(s) in the assistant turns but {len(self.masks)} mask "
                              f"file(s); they must match one to one", field_name="masks")
        if not isinstance(self.meta, dict):
            raise SampleError("must be an object", field_name="meta")

    def _validate_messages(self) -> None:
        if not isinstance(self.messages, list) or not self.messages:
            raise SampleError("must be a non-empty list", field_name="messages")
        n_images = 0
        for i, msg in enumerate(self.messages):
            fname = f"messages[{i}]"
            if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
                raise SampleError("each message needs role system|user|assistant", field_name=fname)
            content = msg.get("content")
            if not isinstance(content, list):
                raise SampleError("content must be a list of parts", field_name=fname + ".content")
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image":
                    if msg["role"] != "user":
                        raise SampleError("images may only appear in user turns",
                                          field_name=f"{fname}.content[{j}]")
                    n_images += 1
                elif kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise SampleError("text part needs a string 'text'", field_name=f"{fname}.content[{j}]")
                    if MASK_TOKEN in part["text"] and msg["role"] != "assistant":
                        raise SampleError("the mask token may only appear in assistant turns",
                                          field_name=f"{fname}.content[{j}]")
                else:
                    raise SampleError("part type must be 'image' or 'text'", field_name=f"{fname}.content[{j}]")
        if n_images != len(self.images):
            raise SampleError(f"{n_images} image part(s) but {len(self.images)} image path(s)",
                              field_name="messages")
        roles = [m["role"] for m in self.messages if m["role"] != "system"]
        if not roles or roles[-1] != "assistant":
            raise SampleError("the last message must be the assistant's answer", field_name="messages")
        for a, b in zip(roles, roles[1:]):
            if a == b:
                raise SampleError("user and assistant turns must alternate", field_name="messages")

    @classmethod
    def from_dict(cls, data: Any) -> "Sample":
        if not isinstance(data, dict):
            raise SampleError("a record must be a JSON object")
        required = ("id", "task", "images", "image_roles", "messages")
        for key in required:
            if key not in data:
                raise SampleError("is missing", field_name=key)
        unknown = set(data) - {"id", "task", "images", "image_roles", "messages", "masks", "meta"}
        if unknown:
            raise SampleError(f"unknown field(s) {sorted(unknown)}", field_name=sorted(unknown)[0])
        return cls(id=data["id"], task=data["task"], images=data["images"], image_roles=data["image_roles"],
                   messages=data["messages"], masks=data.get("masks", []) or [], meta=data.get("meta", {}) or {})


def _text_of(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message.get("content", []) if isinstance(p, dict)
                   and p.get("type") == "text")


def _check_relative(p: Any, field_name: str) -> None:
    if not isinstance(p, str) or not p:
        raise SampleError("paths must be non-empty strings", field_name=field_name)
    pp = PurePosixPath(p.replace("\\", "/"))
    if pp.is_absolute() or ".." in pp.parts or (len(p) > 1 and p[1] == ":"):
        raise SampleError(f"path {p!r} must be relative to the dataset folder and stay inside it",
                          field_name=field_name)


def iter_jsonl(path: str | os.PathLike, errors: list[SampleError] | None = None,
               check_files: bool = False) -> Iterator[tuple[int, Sample]]:
    """Yield ``(line_number, Sample)`` for each valid line of a JSONL file.

    Without ``errors`` the first bad line raises ``SampleError``; with a list, bad lines are
    appended to it and skipped. Blank lines are ignored. ``check_files`` checks that image and mask
    files exist next to the JSONL file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such dataset file; build one with `loupe build-data`")
    root = path.parent if check_files else None
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SampleError(f"malformed JSON ({exc.msg} at column {exc.colno})") from None
                sample = Sample.from_dict(data)
                sample.validate(root)
            except SampleError as exc:
                err = SampleError(exc.reason, path, lineno, exc.field)
                if errors is None:
                    raise err from None
                errors.append(err)
                continue
            yield lineno, sample


def load_jsonl(path: str | os.PathLike, check_files: bool = False) -> list[Sample]:
    """Read and validate every line; the first bad line raises ``SampleError``."""
    return [s for _, s in iter_jsonl(path, check_files=check_files)]


def save_jsonl(samples: list[Sample], path: str | os.PathLike, append: bool = False) -> None:
    """Validate and write samples, one per line, flushed and fsynced so a kill loses no written line."""
    for s in samples:
        s.validate()
    with Path(path).open("a" if append else "w", encoding="utf-8") as fh:
        for s in samples:
            fh.write(s.to_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
