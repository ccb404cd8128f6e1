"""Readers for the containers the Debian photo packages use: Qt ``.rcc`` resources, jigzo ``.pzl``
puzzles, and DEP-5 (machine-readable) ``copyright`` files for per-file licences.

Hand-written because no library on PyPI or in Debian reads them without pulling a GUI stack:
``.rcc`` files are read by Qt itself (``QResource::registerResource``), which would mean PySide/PyQt
(hundreds of MB) for a few hundred photos; ``.pzl`` is jigzo's own format with no reader outside the
game; DEP-5 has ``python3-debian``'s ``debian.copyright`` in Debian, but not on PyPI (and it is not
a dependency of this project). Each reader is small and follows the format exactly as documented.
"""

from __future__ import annotations

import fnmatch
import os
import re
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

# ---- Qt resource files (.rcc) ---------------------------------------------------------------------

RCC_MAGIC = b"qres"
_RCC_DIR = 0x02
_RCC_ZLIB = 0x01
_RCC_ZSTD = 0x04


@dataclass(frozen=True)
class RccEntry:
    flags: int
    offset: int  # of the entry's data block, relative to the data section


class RccError(ValueError):
    pass


class RccArchive:
    """A Qt binary resource file (rcc versions 1-3), read without Qt.

    Layout: ``qres``, then big-endian uint32 version, tree offset, data offset, names offset. Tree
    nodes are 14 bytes (version 1) or 22 (later: + an 8-byte modification time): name offset (uint32),
    flags (uint16), then either child count and first child index (directories, ``flags & 2``) or
    country, language (uint16 each) and data offset (uint32). A name is uint16 length, uint32 hash and
    UTF-16-BE characters. A data block is uint32 size and the bytes; with ``flags & 1`` those are a
    uint32 uncompressed length and a zlib stream; ``flags & 4`` marks zstd.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, "rb") as f:
            self._head = f.read(20)
            if len(self._head) < 20 or self._head[:4] != RCC_MAGIC:
                raise RccError(f"{self.path}: not a Qt resource file (no 'qres' magic)")
            self.version, self._tree, self._data, self._names = struct.unpack(">4I", self._head[4:20])
            if self.version not in (1, 2, 3):
                raise RccError(f"{self.path}: rcc format version {self.version} is not supported (1-3)")
            size = os.fstat(f.fileno()).st_size
            if not all(20 <= off <= size for off in (self._tree, self._data, self._names)):
                raise RccError(f"{self.path}: section offsets lie outside the file")
            # The tree and the names are small; read each section once (data blocks are read on demand).
            f.seek(self._names)
            self._name_bytes = f.read(max(0, (self._tree if self._tree > self._names else size) - self._names))
            f.seek(self._tree)
            self._tree_bytes = f.read()
        self._node = 14 if self.version == 1 else 22
        self.entries: dict[str, RccEntry] = {}
        self._walk(0, "", depth=0)

    def _name(self, off: int) -> str:
        if off + 6 > len(self._name_bytes):
            raise RccError(f"{self.path}: name offset {off} outside the names section")
        (n,) = struct.unpack_from(">H", self._name_bytes, off)
        raw = self._name_bytes[off + 6:off + 6 + 2 * n]
        if len(raw) != 2 * n:
            raise RccError(f"{self.path}: truncated name at offset {off}")
        return raw.decode("utf-16-be")

    def _walk(self, index: int, prefix: str, depth: int) -> None:
        if depth > 64:
            raise RccError(f"{self.path}: directory tree deeper than 64 levels (corrupt file?)")
        base = index * self._node
        if base + 14 > len(self._tree_bytes):
            raise RccError(f"{self.path}: tree node {index} outside the tree section")
        name_off, flags = struct.unpack_from(">IH", self._tree_bytes, base)
        if flags & _RCC_DIR:
            count, first = struct.unpack_from(">II", self._tree_bytes, base + 6)
            here = prefix if index == 0 else prefix + self._name(name_off) + "/"
            for child in range(first, first + count):
                self._walk(child, here, depth + 1)
        else:
            (data_off,) = struct.unpack_from(">I", self._tree_bytes, base + 10)
            self.entries[prefix + self._name(name_off)] = RccEntry(flags, data_off)

    def names(self) -> list[str]:
        return sorted(self.entries)

    def read(self, inner: str) -> bytes:
        """The bytes of one resource (``inner`` as listed by ``names``, no leading ``:/``)."""
        entry = self.entries.get(inner.lstrip(":/"))
        if entry is None:
            raise KeyError(f"{self.path}: no resource {inner!r}")
        with open(self.path, "rb") as f:
            f.seek(self._data + entry.offset)
            head = f.read(4)
            if len(head) != 4:
                raise RccError(f"{self.path}: data of {inner!r} lies outside the file")
            (size,) = struct.unpack(">I", head)
            data = f.read(size)
        if len(data) != size:
            raise RccError(f"{self.path}: data of {inner!r} is truncated")
        if entry.flags & _RCC_ZSTD:
            raise RccError(f"{self.path}: {inner!r} is zstd-compressed, which this reader does not handle")
        if entry.flags & _RCC_ZLIB:
            try:
                (expect,) = struct.unpack(">I", data[:4])
                data = zlib.decompress(data[4:])
            except (struct.error, zlib.error) as exc:
                raise RccError(f"{self.path}: {inner!r} is not valid zlib data ({exc})") from None
            if len(data) != expect:
                raise RccError(f"{self.path}: {inner!r} inflated to {len(data)} bytes, expected {expect}")
        return data


@lru_cache(maxsize=32)
def _rcc(path: str, size: int, mtime: int) -> RccArchive:
    return RccArchive(path)


def rcc_archive(path: str | os.PathLike) -> RccArchive:
    """An ``RccArchive``, parsed once per process and file version."""
    st = os.stat(path)
    return _rcc(str(path), st.st_size, int(st.st_mtime))


def rcc_read(path: str | os.PathLike, inner: str) -> bytes:
    return rcc_archive(path).read(inner)


# ---- jigzo puzzles (.pzl) -------------------------------------------------------------------------

def pzl_entries(path: str | os.PathLike) -> dict[str, bytes]:
    """The named files inside a jigzo ``.pzl``: a header (``PzlF``, version, puzzle name, URL lines),
    then ``name\\nsize\\n<size bytes>`` entries. A line is taken as an entry name only when the next
    line is a decimal size, so header lines are skipped whatever their number."""
    data = Path(path).read_bytes()
    if not data.startswith(b"PzlF\n"):
        raise ValueError(f"{path}: not a jigzo puzzle (no 'PzlF' header)")
    out: dict[str, bytes] = {}
    pos = 5
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        nl2 = data.find(b"\n", nl + 1)
        if nl2 < 0:
            break
        size_line = data[nl + 1:nl2]
        if size_line.isdigit():
            size = int(size_line)
            start = nl2 + 1
            if start + size > len(data):
                raise ValueError(f"{path}: entry {data[pos:nl]!r} is truncated")
            out[data[pos:nl].decode("utf-8", "replace")] = data[start:start + size]
            pos = start + size
            if data[pos:pos + 1] == b"\n":  # tolerate a separator newline between entries
                pos += 1
        else:
            pos = nl + 1  # a header line
    return out


def pzl_texture_name(path: str | os.PathLike) -> str:
    """The name of a puzzle's full texture: its one ``<name>.jpg`` entry (``<name>-t.jpg`` is the
    thumbnail). ``<name>`` is the puzzle's inner name, which need not be the file's (``05AMWABR``)."""
    jpgs = [n for n in pzl_entries(path) if n.lower().endswith(".jpg")]
    full = [n for n in jpgs if not n.lower().endswith("-t.jpg")]
    if len(full) != 1:
        raise ValueError(f"{path}: expected one full-size .jpg texture, found {full or 'none'}")
    return full[0]


def pzl_read(path: str | os.PathLike, name: str) -> bytes:
    entries = pzl_entries(path)
    if name not in entries:
        raise KeyError(f"{path}: no entry {name!r} (has {', '.join(sorted(entries))})")
    return entries[name]


# ---- DEP-5 copyright files ------------------------------------------------------------------------

@dataclass(frozen=True)
class CopyrightStanza:
    patterns: tuple[str, ...]
    copyright: tuple[str, ...]
    licence: str
    comment: str


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    for block in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if fields:
            yield fields


@lru_cache(maxsize=16)
def copyright_stanzas(path: str) -> tuple[CopyrightStanza, ...]:
    """The ``Files`` stanzas of a DEP-5 copyright file, in file order (empty if it is not DEP-5)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    if not text.startswith("Format:"):
        return ()
    out = []
    for f in _stanzas(text):
        if "files" not in f:
            continue
        lines = [ln for ln in f.get("copyright", "").splitlines() if ln.strip()]
        out.append(CopyrightStanza(tuple(f["files"].split()), tuple(lines),
                                   f.get("license", "").splitlines()[0].strip() if f.get("license") else "",
                                   " ".join(f.get("comment", "").split())))
    return tuple(out)


def _stem(p: str) -> str:
    head, tail = p.rsplit("/", 1) if "/" in p else ("", p)
    if "." in tail and "*" not in tail.rsplit(".", 1)[1]:
        tail = tail.rsplit(".", 1)[0]
    return f"{head}/{tail}" if head else tail


@lru_cache(maxsize=32)
def _matchers(path: str, any_extension: bool) -> tuple[dict[str, int], tuple[tuple[int, re.Pattern], ...]]:
    """Stanza index by literal pattern (the last one wins), and the wildcard patterns compiled: a
    copyright file has hundreds of patterns and a package hundreds of photos."""
    literal: dict[str, int] = {}
    wild: list[tuple[int, re.Pattern]] = []
    for i, st in enumerate(copyright_stanzas(path)):
        for pat in st.patterns:
            pat = _stem(pat) if any_extension else pat
            if any(c in pat for c in "*?["):
                wild.append((i, re.compile(fnmatch.translate(pat))))
            else:
                literal[pat] = i
    return literal, tuple(wild)


def licence_of(copyright_file: str | os.PathLike, relpath: str, any_extension: bool = False) -> str | None:
    """The licence of ``relpath`` (a path in the upstream source tree) per a DEP-5 copyright file,
    as ``"LICENCE (copyright holder; comment)"``; the last matching stanza wins, as DEP-5 says.

    ``any_extension``: compare without file extensions (files converted at build time, e.g. a
    ``.jpg`` in the source tree installed as ``.webp``). ``None`` when nothing matches.
    """
    stanzas = copyright_stanzas(str(copyright_file))
    literal, wild = _matchers(str(copyright_file), any_extension)
    key = _stem(relpath) if any_extension else relpath
    best = max([literal.get(key, -1)] + [i for i, rx in wild if rx.match(key)])
    hit = stanzas[best] if best >= 0 else None
    if hit is None or not hit.licence:
        return None
    if hit.patterns == ("*",):  # the package-wide default: its copyright list names code authors
        return f"{hit.licence} (the package's 'Files: *' entry in {copyright_file})"
    who = hit.copyright[0] + (" et al." if len(hit.copyright) > 1 else "") if hit.copyright else ""
    extra = "; ".join(x for x in (who, hit.comment) if x)
    return f"{hit.licence} ({extra})" if extra else hit.licence
