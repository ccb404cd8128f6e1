"""The Debian photo packages: the .rcc / .pzl / DEP-5 readers on files made here, decoding, the
lists, missing packages, and (when the packages are installed) the whole pool, its licences and splits."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe_vlm.data_builders import photo_pool as P
from loupe_vlm.data_builders import quality
from loupe_vlm.data_builders import sources as S
from loupe_vlm.data_builders.photo_pool import readers as R

LISTED = {"gcompris-qt-data": 273, "lomiri-wallpapers-16.04": 14, "kphotoalbum": 24, "jigzo-data": 11,
          "palapeli-data": 5}


def _encode(img: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **kw)
    return buf.getvalue()


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour ramps plus a few blocks: survives JPEG well, and no two regions look alike."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1), 128 + 0 * xx], -1)
    rng = np.random.default_rng(seed)
    for _ in range(6):
        y, x = int(rng.integers(0, h - h // 5)), int(rng.integers(0, w - w // 5))
        img[y:y + h // 5, x:x + w // 5] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


# ---- a Qt resource file, written by the documented layout ----------------------------------------

def make_rcc(files: dict[str, bytes], compress: set[str] = frozenset(), zstd: set[str] = frozenset(),
             version: int = 3) -> bytes:
    """An .rcc holding ``files`` (inner path -> bytes); paths in ``compress`` are zlib-compressed."""
    tree: dict = {}
    for path in files:
        d = tree
        *dirs, leaf = path.split("/")
        for part in dirs:
            d = d.setdefault(part, {})
        d[leaf] = path
    names = bytearray()
    name_off: dict[str, int] = {}

    def name(n: str) -> int:
        if n not in name_off:
            name_off[n] = len(names)
            names.extend(struct.pack(">HI", len(n), zlib.crc32(n.encode())) + n.encode("utf-16-be"))
        return name_off[n]

    data = bytearray()
    data_off: dict[str, int] = {}
    for path, raw in files.items():
        payload = struct.pack(">I", len(raw)) + zlib.compress(raw) if path in compress else raw
        data_off[path] = len(data)
        data.extend(struct.pack(">I", len(payload)) + payload)
    # nodes in breadth-first order, each directory's children contiguous (as rcc writes them)
    nodes: list[bytes] = [b""]
    queue = [(0, "", tree)]
    while queue:
        index, n, d = queue.pop(0)
        first = len(nodes)
        nodes.extend([b""] * len(d))
        for k, (child, value) in enumerate(sorted(d.items())):
            if isinstance(value, dict):
                queue.append((first + k, child, value))
            else:
                flags = (1 if value in compress else 0) | (4 if value in zstd else 0)
                nodes[first + k] = struct.pack(">IHHHI", name(child), flags, 0, 1, data_off[value])
        nodes[index] = struct.pack(">IHII", name(n) if index else 0, 2, len(d), first)
    if version > 1:
        nodes = [nd + b"\0" * 8 for nd in nodes]  # modification time, later versions
    header = 20 + (4 if version >= 3 else 0)
    d_off, n_off = header, header + len(data)
    t_off = n_off + len(names)
    head = b"qres" + struct.pack(">4I", version, t_off, d_off, n_off) + (b"\0" * 4 if version >= 3 else b"")
    return head + bytes(data) + bytes(names) + b"".join(nodes)


@pytest.mark.parametrize("version", [1, 3])
def test_rcc_reader_lists_reads_and_inflates(tmp_path, version):
    photo = _pattern(48, 64)
    webp = _encode(photo, "WEBP", lossless=True)
    qml = b"import QtQuick 2.0\n" * 40
    rcc = tmp_path / "a.rcc"
    rcc.write_bytes(make_rcc({"gcompris/src/activities/x/resource/fish1.webp": webp,
                              "gcompris/src/activities/x/Main.qml": qml, "top.txt": b"hi"},
                             compress={"gcompris/src/activities/x/Main.qml"}, version=version))
    a = R.RccArchive(rcc)
    assert a.version == version
    assert a.names() == ["gcompris/src/activities/x/Main.qml", "gcompris/src/activities/x/resource/fish1.webp",
                         "top.txt"]
    assert a.entries["gcompris/src/activities/x/Main.qml"].flags & 1  # really stored compressed
    assert a.read("gcompris/src/activities/x/Main.qml") == qml
    assert a.read(":/top.txt") == b"hi"
    assert a.read("gcompris/src/activities/x/resource/fish1.webp") == webp
    img = P.decode(str(rcc), "gcompris/src/activities/x/resource/fish1.webp")
    assert img.dtype == np.uint8 and np.array_equal(img, photo)  # lossless WebP: exact pixels back
    with pytest.raises(KeyError, match="no resource"):
        a.read("gcompris/missing.webp")


def test_rcc_reader_refuses_bad_files(tmp_path):
    (tmp_path / "bad.rcc").write_bytes(b"PK\x03\x04 not a resource file at all....")
    with pytest.raises(R.RccError, match="qres"):
        R.RccArchive(tmp_path / "bad.rcc")
    (tmp_path / "v9.rcc").write_bytes(b"qres" + struct.pack(">4I", 9, 20, 20, 20))
    with pytest.raises(R.RccError, match="version 9"):
        R.RccArchive(tmp_path / "v9.rcc")
    (tmp_path / "z.rcc").write_bytes(make_rcc({"a.webp": b"abc"}, zstd={"a.webp"}))
    with pytest.raises(R.RccError, match="zstd"):
        R.RccArchive(tmp_path / "z.rcc").read("a.webp")
    with pytest.raises(ValueError, match="not a readable image"):  # decode names the file and entry
        P.decode(str(tmp_path / "z.rcc"), "a.webp")


# ---- a jigzo puzzle -------------------------------------------------------------------------------

def make_pzl(inner: str, atlas: bytes) -> bytes:
    entries = [(f"{inner}.map", b"#texture map data\ncrop000 0 0 10 10\n"),
               (f"{inner}-t.jpg", _encode(_pattern(32, 32, 9), "JPEG")),
               (f"{inner}.png", _encode(np.zeros((16, 16, 3), np.uint8), "PNG")),
               (f"{inner}.jpg", atlas)]
    out = b"PzlF\n0.1\nbike-3x4\nhttp://www.example.org/puzzle/\n"
    for n, b in entries:
        out += n.encode() + b"\n" + str(len(b)).encode() + b"\n" + b
    return out


def test_pzl_reader_takes_the_full_texture_and_crops_it(tmp_path):
    atlas = np.zeros((256, 256, 3), np.uint8)
    atlas[:120, :160] = _pattern(120, 160, 3)  # the photo; the rest of the atlas is black
    pzl = tmp_path / "bike-3x4.pzl"
    pzl.write_bytes(make_pzl("05AMWABR", _encode(atlas, "JPEG", quality=95)))  # inner name != file name
    entries = R.pzl_entries(pzl)
    assert sorted(entries) == ["05AMWABR-t.jpg", "05AMWABR.jpg", "05AMWABR.map", "05AMWABR.png"]
    assert R.pzl_texture_name(pzl) == "05AMWABR.jpg"
    img = P.decode(str(pzl), "05AMWABR.jpg", crop=(160, 120))
    assert img.shape == (120, 160, 3)
    assert np.abs(img.astype(int) - atlas[:120, :160]).mean() < 4  # the photo, none of the black atlas
    with pytest.raises(ValueError, match="smaller than the crop"):
        P.decode(str(pzl), "05AMWABR.jpg", crop=(300, 120))
    (tmp_path / "x.pzl").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="PzlF"):
        R.pzl_entries(tmp_path / "x.pzl")


def test_decode_rotates_clockwise_and_shrinks_large_jpegs(tmp_path):
    img = _pattern(200, 400, 5)
    img[:40, :40] = (255, 0, 0)  # a red top-left corner
    (tmp_path / "a.jpg").write_bytes(_encode(img, "JPEG", quality=95))
    r = P.decode(str(tmp_path / "a.jpg"), rotate=90)
    assert r.shape == (400, 200, 3)
    assert r[:40, -40:].mean(axis=(0, 1))[0] > 200 and r[:40, -40:].mean(axis=(0, 1))[2] < 60  # now top-right
    assert P.decode(str(tmp_path / "a.jpg"), rotate=270)[-40:, :40, 0].mean() > 200  # bottom-left
    big = np.kron(_pattern(250, 500, 6), np.ones((8, 8, 1), np.uint8))  # 4000 x 2000
    (tmp_path / "big.jpg").write_bytes(_encode(big, "JPEG", quality=90))
    s = P.decode(str(tmp_path / "big.jpg"), long_side=500)
    assert s.shape == (250, 500, 3)
    ref = S.cv2.resize(big, (500, 250), interpolation=S.cv2.INTER_AREA)
    assert np.abs(s.astype(int) - ref).mean() < 4  # reduced decode + INTER_AREA ~ a full-size shrink


# ---- DEP-5 licences -------------------------------------------------------------------------------

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: demo

Files: *
Copyright: 2014 Many Developers
           2015 Someone Else
License: GPL-3+

Files: src/animals/*.jpg
Copyright: Zoo Photographer
License: CC0-1.0

Files: src/animals/fish1.jpg
Copyright: Florin D
License: CC-BY-SA-3.0
Comment: https://commons.example.org/File:Fish.jpg

License: GPL-3+
 This program is free software.
"""


def test_licence_of_reads_dep5_last_match_wins(tmp_path):
    f = tmp_path / "copyright"
    f.write_text(COPYRIGHT)
    assert R.licence_of(f, "src/animals/fish1.webp", any_extension=True) == \
        "CC-BY-SA-3.0 (Florin D; https://commons.example.org/File:Fish.jpg)"
    assert R.licence_of(f, "src/animals/cat.webp", any_extension=True) == "CC0-1.0 (Zoo Photographer)"
    assert R.licence_of(f, "src/animals/cat.webp").startswith("GPL-3+ (the package's 'Files: *'")
    assert R.licence_of(f, "docs/readme.txt").startswith("GPL-3+")
    (tmp_path / "plain").write_text("This package was debianized by someone.\nLicense: GPL-2+\n")
    assert R.licence_of(tmp_path / "plain", "x.jpg") is None  # not DEP-5: the package summary is used


# ---- the lists and the package table --------------------------------------------------------------

def test_lists_ship_with_the_package_and_parse():
    counts = {}
    for pkg in P.PACKAGES:
        items = P.read_list(pkg)
        counts[pkg.name] = len(items)
        assert all(w >= 100 and h >= 100 for w, h in (it.size for it in items)), pkg.name
        assert len({(it.path, it.member) for it in items}) == len(items), pkg.name  # no file twice
    assert counts == LISTED
    gc = P.read_list(P.PACKAGES[0])
    assert all(it.path.endswith(".rcc") and it.member.endswith(".webp") for it in gc)
    jig = next(p for p in P.PACKAGES if p.name == "jigzo-data")
    assert not any("penguin" in it.path for it in P.read_list(jig))  # the non-commercial one stays out
    assert S.PHOTO_SOURCES >= set(P.PACKAGE_NAMES)


def test_gcompris_sizes_shrink_well_but_keep_the_default_view():
    gc = P.PACKAGES[0]
    assert P._long_side(gc, 1920, 1080) == 960  # 2x down
    assert P._long_side(gc, 1024, 768) == round(1024 * 448 / 768)  # down, short side kept at 448
    assert P._long_side(gc, 320, 240) is None  # small: as it is
    lomiri = P.PACKAGES[1]
    assert P._long_side(lomiri, 5312, 2988) == P.MAX_SIDE and P._long_side(lomiri, 1000, 800) is None


def test_gcompris_subjects_group_one_monument_under_two_names():
    assert P.gcompris_subject("TourEiffel_background") == P.gcompris_subject("eiffelTower")
    assert P.gcompris_subject("statueofLiberty") == P.gcompris_subject("statueOfLiberty")
    assert P.gcompris_subject("IndiaGate") != P.gcompris_subject("gatewayofIndia")  # two monuments


def test_missing_package_is_skipped_with_one_warning(tmp_path, monkeypatch, caplog):
    (tmp_path / "ghost.txt").write_text("/nonexistent/loupe-test/ghost.jpg\t640x480\n")
    monkeypatch.setattr(P, "LIST_DIR", tmp_path)
    ghost = P.Package("loupe-ghost-photos", "ghost.txt", "apt-get install loupe-ghost-photos", "CC0")
    with caplog.at_level(logging.WARNING, logger=P.__name__):
        assert P.candidates((ghost,)) == []
        assert P.candidates((ghost,)) == []
    warnings = [r.getMessage() for r in caplog.records if "loupe-ghost-photos" in r.getMessage()]
    assert len(warnings) == 1 and "apt-get install loupe-ghost-photos" in warnings[0]


def test_package_selection_by_environment(monkeypatch):
    monkeypatch.setenv(P.ENV_PACKAGES, "none")
    assert P.selected_packages() == () and S.package_photos() == []
    monkeypatch.setenv(P.ENV_PACKAGES, "palapeli-data, jigzo-data")
    assert [p.name for p in P.selected_packages()] == ["jigzo-data", "palapeli-data"]
    monkeypatch.setenv(P.ENV_PACKAGES, "gcompris")
    with pytest.raises(ValueError, match="unknown package"):
        P.selected_packages()
    monkeypatch.delenv(P.ENV_PACKAGES)
    assert P.selected_packages() == P.PACKAGES


def test_one_cache_variable_moves_the_pool_cache_and_the_bases(monkeypatch, tmp_path):
    from loupe_vlm.assistant.packaged_bases import cache_root

    monkeypatch.setenv("LOUPE_CACHE", str(tmp_path / "lc"))
    assert P.cache_base() == cache_root() == tmp_path / "lc"
    assert S._cache_file() == tmp_path / "lc" / "pool-index.json"
    assert P.kphotoalbum_root() == tmp_path / "lc" / "debian" / "kphotoalbum"
    monkeypatch.delenv("LOUPE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert P.cache_base() == cache_root() == tmp_path / "xdg" / "loupe"


def test_union_groups_joins_names_and_copies_transitively():
    rng = np.random.default_rng(0)
    t = [v / np.linalg.norm(v) for v in rng.standard_normal((5, 64)).astype(np.float32)]
    t[3] = t[2]  # c and d: one photo under two names
    g = S._union_groups(["a", "b", "c", "d", "e"], ["k1", "k2", "k3", "k4", "k1"], t)
    assert g == {"a": "a", "b": "b", "c": "c", "d": "c", "e": "a"}


# ---- the real packages (skipped where they are not installed) -------------------------------------

def _installed(name: str) -> bool:
    pkg = next(p for p in P.PACKAGES if p.name == name)
    root = P.package_root(pkg)
    return any((root / it.path.lstrip("/")).is_file() for it in P.read_list(pkg))


INSTALLED = [n for n in LISTED if _installed(n)]
needs_packages = pytest.mark.skipif(not INSTALLED, reason="no Debian photo package installed (make system-deps)")


@pytest.fixture(scope="module")
def pool():
    return S.package_photos()


@needs_packages
def test_pool_finds_the_listed_photos_with_licences(pool):
    by = {n: [s for s in pool if s.source == n] for n in INSTALLED}
    for name in INSTALLED:
        assert 0.95 * LISTED[name] <= len(by[name]) <= LISTED[name], (name, len(by[name]))
    assert {s.source for s in pool} == set(INSTALLED)
    assert len({s.id for s in pool}) == len(pool)
    for s in pool:
        assert s.licence and "unknown" not in s.licence.lower(), s.id
        assert s.source in s.origin, s.id
        assert quality._part_of(s) == "photos", s.id  # drawn by --mix photos=...
    for s in by.get("gcompris-qt-data", []):
        if s.licence.startswith("CC-BY"):
            assert "(" in s.licence and "Files: *" not in s.licence, s.id  # the author is named


@needs_packages
def test_every_photo_decodes_to_sane_rgb(pool):
    for s in pool:
        img = s.load()
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, s.id
        assert 110 <= min(img.shape[:2]) and max(img.shape[:2]) <= P.MAX_SIDE, (s.id, img.shape)
        assert img.std() > 10, s.id  # not blank
        if s.source == "jigzo-data":  # cropped off the atlas: no black padding along the edges
            assert img[-2:].mean() > 8 and img[:, -2:].mean() > 8, s.id


@pytest.mark.skipif("kphotoalbum" not in INSTALLED, reason="kphotoalbum not unpacked (make system-deps)")
def test_kphotoalbum_rotations_match_its_index(pool):
    import re
    pkg = next(p for p in P.PACKAGES if p.name == "kphotoalbum")
    index = (P.package_root(pkg) / "usr/share/kphotoalbum/demo/index.xml").read_text(errors="replace")
    angles = {Path(f).stem: int(a) for f, a in re.findall(r'file="([^"]+)"[^>]*?angle="(\d+)"', index)
              if int(a)}
    assert angles == P.KPHOTOALBUM_ROTATIONS
    wayne = next(s for s in pool if s.id == "kphotoalbum:wayne").load()
    assert wayne.shape[0] > wayne.shape[1]  # 800x600 on disk, portrait once turned


@needs_packages
def test_splits_keep_each_photo_group_in_one_split(pool):
    photos = S.builtin_pool(("photos",))
    assert len(photos) == len(S.builtin_photos()) + len(pool)
    splits = S.split_by_source(photos, seed=0)
    where: dict[str, set[str]] = {}
    for split, srcs in splits.items():
        for s in srcs:
            where.setdefault(s.group, set()).add(split)
    assert all(len(v) == 1 for v in where.values())
    assert sum(len(v) for v in splits.values()) == len(photos)
    for name in INSTALLED:  # stratified: each package reaches every split
        assert all(any(s.source == name for s in splits[k]) for k in S.SPLITS), name
    if "gcompris-qt-data" in INSTALLED:  # one photo under two names is one group
        g = {s.id: s.group for s in pool}
        assert g["gcompris-qt-data:categorization/resource/images/monuments/colosseum"] == \
            g["gcompris-qt-data:explore_monuments/resource/wonders/colosseum"]
        sizes = {}
        for group in g.values():
            sizes[group] = sizes.get(group, 0) + 1
        assert max(sizes.values()) <= 3  # one monument in three activities at most; no chained landscapes
        assert len(sizes) >= 0.85 * len(g)


@needs_packages
def test_second_build_reads_the_index_not_the_images(pool, monkeypatch):
    monkeypatch.setattr(S, "_PACKAGE_CACHE", {})
    monkeypatch.setattr(S, "_INDEX", None)  # as a new process: the index comes back from disk

    def no_decode(*a, **k):
        raise AssertionError("decoded an image although the pool index has it")

    monkeypatch.setattr(S.photo_pool, "decode", no_decode)
    again = S.package_photos()
    assert [(s.id, s.group) for s in again] == [(s.id, s.group) for s in pool]
