"""Image sources: loading, built-in pool filtering, splits by photo, random views."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from loupe_vlm.data_builders import sources as S


def test_load_rgb_reads_png_and_gz(tmp_path, photo):
    S.save_png(tmp_path / "a.png", photo)
    assert np.array_equal(S.load_rgb(tmp_path / "a.png"), photo)
    (tmp_path / "b.png.gz").write_bytes(gzip.compress((tmp_path / "a.png").read_bytes()))
    assert np.array_equal(S.load_rgb(tmp_path / "b.png.gz"), photo)


def test_load_rgb_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        S.load_rgb(tmp_path / "missing.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        S.load_rgb(tmp_path / "bad.jpg")


def test_from_folders_and_manifest(tmp_path, image_folder):
    srcs = S.from_folders([image_folder])
    assert len(srcs) == 8 and len({s.group for s in srcs}) == 8
    assert len(S.from_folders([str(image_folder / "photo1*.png")])) == 1
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        S.from_folders([str(tmp_path / "nothing-here" / "*.png")])
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(json.dumps({"path": str(image_folder / f"photo{i}.png"), "group": f"g{i // 2}",
                                         "licence": "CC0"}) for i in range(4)))
    ms = S.from_manifest(man)
    assert [s.group for s in ms] == ["g0", "g0", "g1", "g1"] and ms[0].licence == "CC0"


def _assert_disjoint(splits):
    groups = {k: {s.group for s in v} for k, v in splits.items()}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]


def test_split_by_source_keeps_groups_whole_and_is_deterministic():
    srcs = [S.SourceImage(id=f"x:{i}", source="x" if i < 60 else "y", group=f"g{i // 3}", origin="", licence="")
            for i in range(90)]
    a = S.split_by_source(srcs, seed=1)
    b = S.split_by_source(srcs, seed=1)
    c = S.split_by_source(srcs, seed=2)
    _assert_disjoint(a)
    assert {k: [s.id for s in v] for k, v in a.items()} == {k: [s.id for s in v] for k, v in b.items()}
    assert {k: [s.id for s in v] for k, v in a.items()} != {k: [s.id for s in v] for k, v in c.items()}
    assert sum(len(v) for v in a.values()) == 90
    assert all(len(a[k]) > 0 for k in S.SPLITS)
    for src in ("x", "y"):  # stratified: each pool part reaches every split
        assert all(any(s.source == src for s in a[k]) for k in S.SPLITS)


def test_random_view_deterministic_and_sized(photo):
    big = np.vstack([np.hstack([photo] * 6)] * 6)
    v1 = S.random_view(big, np.random.default_rng(5), 64)
    v2 = S.random_view(big, np.random.default_rng(5), 64)
    v3 = S.random_view(big, np.random.default_rng(6), 64)
    assert v1.shape == (64, 64, 3) and v1.dtype == np.uint8
    assert np.array_equal(v1, v2) and not np.array_equal(v1, v3)
    assert S.random_view(big, np.random.default_rng(0), (48, 80)).shape == (48, 80, 3)


def test_procedural_scenes_are_deterministic_and_natural_looking():
    for kind in S.PROCEDURAL_KINDS:
        a, b = S.procedural(kind, 7, 96), S.procedural(kind, 7, 96)
        assert np.array_equal(a, b) and not np.array_equal(a, S.procedural(kind, 8, 96))
        assert a.std() > 5, kind  # not flat
    with pytest.raises(ValueError, match="unknown procedural kind"):
        S.procedural("plasma", 0)


@pytest.mark.skipif(not S.OPENCV_DOC_DATA.is_dir(), reason="Debian opencv-doc not installed (make system-deps)")
def test_builtin_photos_filter_and_group():
    photos = S.builtin_photos()
    ids = {p.id for p in photos}
    assert 20 <= len(photos) <= 60
    # grey scans, charts, logos and non-pristine examples are out
    for bad in ("opencv-doc:chessboard", "opencv-doc:left01", "opencv-doc:opencv-logo", "skimage:camera",
                "opencv-doc:ela_modified", "opencv-doc:starry_night"):
        assert bad not in ids
    assert {"skimage:astronaut", "opencv-doc:fruits"} <= ids
    group = {p.id: p.group for p in photos}
    assert group["opencv-doc:aloeL"] == group["opencv-doc:aloeR"]  # a stereo pair is one photo


@pytest.mark.skipif(not S.TUXPAINT_STAMPS.is_dir(), reason="Debian tuxpaint-stamps-default not installed")
def test_tuxpaint_stamps_are_photographic_and_scenes_disjoint():
    stamps = S.tuxpaint_stamps()
    assert len(stamps) > 100
    assert not any("/cartoon/" in p for p in stamps)
    assert not any("/alphabets/" in p for p in stamps)  # flat glyphs are filtered by colour statistics
    scenes = S.stamp_pool()
    used = [p for s in scenes for p in s.stamps]
    assert len(used) == len(set(used))  # no stamp in two scenes, so none in two splits
    img = scenes[0].load()
    assert img.shape == (S.PROCEDURAL_SIZE, S.PROCEDURAL_SIZE, 3)
