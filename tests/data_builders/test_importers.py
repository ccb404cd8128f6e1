"""Importers: name-rule pairing (never file order), mask normalisation, reports, containment.

Each test builds a tiny folder in a dataset's real naming convention. Every tampered image gets a
rectangle mask at its own position, so a wrong pairing shows up as a wrong region box.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from loupe_vlm.data_builders import importers as I
from loupe_vlm.prompts import load_jsonl
from loupe_vlm.prompts.parsing import count_mask_tokens, parse_verdict

H, W = 48, 64


def _img(path: Path, seed: int, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = cv2.resize(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), (size[1], size[0]),
                     interpolation=cv2.INTER_LINEAR)
    assert cv2.imwrite(str(path), img)


def _rect(k: int) -> tuple[int, int, int, int]:
    """A distinct box [x0, y0, x1, y1) for pair k."""
    x0, y0 = 4 + 6 * (k % 6), 4 + 5 * (k // 6 % 5)
    return x0, y0, x0 + 14, y0 + 10


def _mask(path: Path, k: int, *, inverted: bool = False, soft: bool = False, channels: int = 1,
          size: tuple[int, int] = (H, W), scale01: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = _rect(k)
    fy, fx = h / H, w / W
    m[round(y0 * fy):round(y1 * fy), round(x0 * fx):round(x1 * fx)] = 255
    if soft:
        m = cv2.GaussianBlur(m, (5, 5), 1.0)
    if inverted:
        m = 255 - m
    if scale01:
        m = (m > 127).astype(np.uint8)
    if channels == 3:
        m = np.dstack([m] * 3)
    assert cv2.imwrite(str(path), m)


def _import(layout: str, root: Path, out: Path, **kw) -> tuple[dict, list]:
    cfg = I.ImportConfig(layout=layout, root=root, out=out, fractions=(0.0, 0.0, 1.0), **kw)
    summary = I.import_dataset(cfg)
    samples = [s for split in ("train", "val", "test") for s in load_jsonl(out / f"{split}.jsonl", check_files=True)]
    for s in samples:
        assert count_mask_tokens(s.answer()) == len(s.masks)
        assert parse_verdict(s.answer()) == ("tampered" if s.meta["tampered"] else "authentic")
    return summary, samples


def _by_source(samples: list) -> dict:
    return {s.meta["source"].split(":", 1)[1]: s for s in samples}


def _box(s) -> list[int]:
    """The union box of a sample's regions."""
    boxes = np.array([r["bbox"] for r in s.meta["regions"]])
    return [int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())]


def _problems(summary: dict) -> dict:
    return {p: r for p, r in summary["problems"]}


def test_casia_pairs_by_name_and_groups_sources(tmp_path):
    root = tmp_path / "CASIA2"
    _img(root / "Au" / "Au_ani_00018.jpg", 1)
    _img(root / "Au" / "Au_sec_00096.jpg", 2)
    _img(root / "Tp" / "Tp_D_CND_M_N_ani00018_sec00096_00138.tif", 3)
    _img(root / "Tp" / "Tp_S_NRN_S_N_arc00013_arc00013_01234.jpg", 4)
    _img(root / "Tp" / "Tp_D_NRD_S_N_txt00001_cha00002_10001.jpg", 5)  # no mask
    _img(root / "v1" / "Sp_D_NRN_A_cha0011_sec0011_0542.jpg", 6)  # CASIA v1 naming
    _img(root / "misc" / "holiday.jpg", 7)
    gt = root / "CASIA 2 Groundtruth"
    _mask(gt / "Tp_A_zzz_first_gt.png", 9)  # sorts first: order-based pairing would shift everything
    _mask(gt / "Tp_D_CND_M_N_ani00018_sec00096_00138_gt.png", 1, soft=True)
    _mask(gt / "Tp_S_NRN_S_N_arc00013_arc00013_01234_gt.png", 2, channels=3)
    _mask(gt / "Sp_D_NRN_A_cha0011_sec0011_0542_gt.png", 3)
    summary, samples = _import("casia", root, tmp_path / "out")
    got = _by_source(samples)
    splice = got["Tp/Tp_D_CND_M_N_ani00018_sec00096_00138.tif"]
    assert splice.meta["manipulation"] == "splice" and _box(splice) == list(_rect(1))
    cm = got["Tp/Tp_S_NRN_S_N_arc00013_arc00013_01234.jpg"]
    assert cm.meta["manipulation"] == "copy_move" and _box(cm) == list(_rect(2))
    assert _box(got["v1/Sp_D_NRN_A_cha0011_sec0011_0542.jpg"]) == list(_rect(3))
    assert not got["Au/Au_ani_00018.jpg"].meta["tampered"] and got["Au/Au_ani_00018.jpg"].masks == []
    # The splice and both of its authentic sources share one split group.
    assert (splice.meta["source_photo"] == got["Au/Au_ani_00018.jpg"].meta["source_photo"]
            == got["Au/Au_sec_00096.jpg"].meta["source_photo"])
    problems = _problems(summary)
    assert "no ground-truth mask" in problems["Tp/Tp_D_NRD_S_N_txt00001_cha00002_10001.jpg"]
    assert "without a matching" in problems["CASIA 2 Groundtruth/Tp_A_zzz_first_gt.png"]
    assert "not a CASIA image" in problems["misc/holiday.jpg"]
    report = (tmp_path / "out" / "import_report.md").read_text()
    assert "Tp_A_zzz_first_gt.png" in report and "holiday.jpg" in report
    assert any("anti-aliased" in k for k in summary["fixes"]) and any("RGB" in k for k in summary["fixes"])


def test_columbia_green_region_of_the_edge_mask(tmp_path):
    root = tmp_path / "columbia"
    _img(root / "4cam_auth" / "canong3_02_sub_01.tif", 1)
    _img(root / "4cam_splc" / "canong3_canonxt_sub_01.tif", 2)
    _img(root / "4cam_splc" / "canong3_kodakdcs330_sub_05.tif", 3)  # no edge mask
    edge = np.zeros((H, W, 3), np.uint8)
    edge[:, :] = (0, 0, 255)  # BGR red: the first camera's region
    edge[10:30, 40:60] = (0, 255, 0)  # green: the spliced region
    (root / "4cam_splc" / "edgemask").mkdir(parents=True)
    cv2.imwrite(str(root / "4cam_splc" / "edgemask" / "canong3_canonxt_sub_01_edgemask.jpg"), edge,
                [cv2.IMWRITE_JPEG_QUALITY, 80])
    summary, samples = _import("columbia", root, tmp_path / "out")
    got = _by_source(samples)
    s = got["4cam_splc/canong3_canonxt_sub_01.tif"]
    assert s.meta["manipulation"] == "splice" and s.meta["regions"][0]["location"] == "right"
    x0, y0, x1, y1 = s.meta["regions"][0]["bbox"]
    assert abs(x0 - 40) <= 2 and abs(y0 - 10) <= 2 and abs(x1 - 60) <= 2 and abs(y1 - 30) <= 2
    assert not got["4cam_auth/canong3_02_sub_01.tif"].meta["tampered"]
    assert "no edge mask" in _problems(summary)["4cam_splc/canong3_kodakdcs330_sub_05.tif"]


def test_coverage_forged_mask(tmp_path):
    root = tmp_path / "COVERAGE"
    for n in (1, 2):
        _img(root / "image" / f"{n}.tif", n)
        _img(root / "image" / f"{n}t.tif", 10 + n)
    _mask(root / "mask" / "1forged.tif", 4)
    _mask(root / "mask" / "1copy.tif", 8)
    _mask(root / "mask" / "1paste.tif", 9)
    summary, samples = _import("coverage", root, tmp_path / "out")
    got = _by_source(samples)
    assert _box(got["image/1t.tif"]) == list(_rect(4)) and got["image/1t.tif"].meta["manipulation"] == "copy_move"
    assert got["image/1t.tif"].meta["source_photo"] == got["image/1.tif"].meta["source_photo"]
    assert "2forged" in _problems(summary)["image/2t.tif"]
    assert len(samples) == 3


def test_nist16_pairs_through_the_csv_and_inverts(tmp_path):
    root = tmp_path / "NC2016_Test0613"
    _img(root / "probe" / "NC2016_0001.jpg", 1)
    _img(root / "probe" / "NC2016_0002.jpg", 2)
    _img(root / "probe" / "NC2016_0003.jpg", 3)
    _mask(root / "reference" / "manipulation" / "mask" / "NC2016_9876.png", 5, inverted=True)
    outside = tmp_path / "secret.png"
    _mask(outside, 1)
    header = ("TaskID|ProbeFileID|ProbeFileName|ProbeMaskFileName|DonorFileID|DonorFileName|DonorMaskFileName|"
              "IsTarget|ProbePostProcessed|DonorPostProcessed|ManipulationQuality|IsManipulationTypeRemoval|"
              "IsManipulationTypeSplice|IsManipulationTypeCopyClone|Collection|BaseFileName|Lang")
    cols = header.split("|")

    def row(**kw: str) -> str:
        return "|".join(kw.get(c, "") for c in cols)

    rows = [row(TaskID="manipulation", ProbeFileID="NC2016_0001", ProbeFileName="probe/NC2016_0001.jpg",
                ProbeMaskFileName="reference/manipulation/mask/NC2016_9876.png", IsTarget="Y",
                IsManipulationTypeRemoval="N", IsManipulationTypeSplice="Y", IsManipulationTypeCopyClone="N",
                BaseFileName="basefile1"),
            row(TaskID="manipulation", ProbeFileID="NC2016_0002", ProbeFileName="probe/NC2016_0002.jpg",
                IsTarget="N", BaseFileName="basefile2"),
            row(TaskID="manipulation", ProbeFileID="NC2016_0003", ProbeFileName="probe/NC2016_0003.jpg",
                ProbeMaskFileName="../secret.png", IsTarget="Y", IsManipulationTypeRemoval="Y",
                BaseFileName="basefile3")]
    ref = root / "reference" / "manipulation" / "NC2016-manipulation-ref.csv"
    ref.write_text("\n".join([header] + rows) + "\n")
    summary, samples = _import("nist16", root, tmp_path / "out")
    got = _by_source(samples)
    s = got["probe/NC2016_0001.jpg"]
    assert s.meta["manipulation"] == "splice" and _box(s) == list(_rect(5))  # the black area, not the white
    assert s.meta["source_photo"] == "nist16:basefile1"
    assert not got["probe/NC2016_0002.jpg"].meta["tampered"]
    assert "probe/NC2016_0003.jpg" not in got  # its mask lies outside the root
    assert "outside the root" in _problems(summary)["probe/NC2016_0003.jpg"]
    assert any("inverted" in k for k in summary["fixes"])


def test_imd2020_folders_and_resized_masks(tmp_path):
    root = tmp_path / "IMD2020"
    _img(root / "1a1ogs" / "1a1ogs_orig.jpg", 1)
    _img(root / "1a1ogs" / "c8tf5mq_0.png", 2)
    _mask(root / "1a1ogs" / "c8tf5mq_0_mask.png", 6)
    _img(root / "1a3oag" / "1a3oag_orig.jpg", 3)
    _img(root / "1a3oag" / "c8tt7fg_0.jpg", 4)
    _mask(root / "1a3oag" / "c8tt7fg_0_mask.png", 7, size=(H // 2, W // 2))  # half-size mask
    _img(root / "1a3oag" / "c8tt7fg_1.jpg", 5)  # no mask
    _img(root / "1a3oag" / "c8tt7fg_2.jpg", 6)
    _mask(root / "1a3oag" / "c8tt7fg_2_mask.png", 2, size=(H, H))  # wrong aspect
    summary, samples = _import("imd2020", root, tmp_path / "out")
    got = _by_source(samples)
    assert _box(got["1a1ogs/c8tf5mq_0.png"]) == list(_rect(6))
    assert got["1a1ogs/c8tf5mq_0.png"].meta["source_photo"] == got["1a1ogs/1a1ogs_orig.jpg"].meta["source_photo"]
    resized = got["1a3oag/c8tt7fg_0.jpg"]
    assert resized.meta["manipulation"] is None
    assert np.abs(np.array(_box(resized)) - np.array(_rect(7))).max() <= 2
    assert any("resized" in k for k in summary["fixes"])
    problems = _problems(summary)
    assert "no mask" in problems["1a3oag/c8tt7fg_1.jpg"] and "aspect" in problems["1a3oag/c8tt7fg_2.jpg"]


def test_folder_layout_name_rules_polarity_and_containment(tmp_path):
    root = tmp_path / "mine"
    for k, name in enumerate(["a", "b", "c", "e"]):
        _img(root / "images" / f"{name}.png", k)
    _mask(root / "masks" / "a_mask.png", 0)
    _mask(root / "masks" / "b.jpg", 1, scale01=False, soft=True)
    _mask(root / "masks" / "c_gt.png", 2, inverted=True)  # no polarity given: detected
    _mask(root / "masks" / "d.png", 3)  # orphan
    outside = tmp_path / "outside.png"
    _img(outside, 99)
    os.symlink(outside, root / "images" / "link.png")
    summary, samples = _import("folder", root, tmp_path / "out", manipulation="splice")
    got = _by_source(samples)
    assert set(got) == {"images/a.png", "images/b.png", "images/c.png"}
    for k, name in enumerate("abc"):
        assert _box(got[f"images/{name}.png"]) == list(_rect(k)), name
        assert got[f"images/{name}.png"].meta["manipulation"] == "splice"
    problems = _problems(summary)
    assert "--unmasked authentic" in problems["images/e.png"]
    assert "without a matching image" in problems["masks/d.png"]
    assert "outside the root" in problems["images/link.png"]
    assert any("looked inverted" in k for k in summary["fixes"])
    # With --unmasked authentic, e.png is imported as authentic.
    _, samples2 = _import("folder", root, tmp_path / "out2", unmasked="authentic")
    e = _by_source(samples2)["images/e.png"]
    assert not e.meta["tampered"] and e.masks == []


def test_normalise_mask_cases():
    base = np.zeros((20, 30), np.uint8)
    base[5:10, 5:12] = 255
    m, notes = I.normalise_mask(base, (20, 30))
    assert np.array_equal(m, base) and notes == []
    m, notes = I.normalise_mask(255 - base, (20, 30))
    assert np.array_equal(m, base) and "inverted" in notes[0]
    m, _ = I.normalise_mask(255 - base, (20, 30), invert=False)
    assert np.array_equal(m, 255 - base)
    m, notes = I.normalise_mask(np.dstack([base] * 3), (20, 30))
    assert np.array_equal(m, base)
    m, notes = I.normalise_mask((base.astype(np.uint16) * 257), (20, 30))
    assert np.array_equal(m, base) and "uint16" in notes[0]
    m, _ = I.normalise_mask((base > 0).astype(np.uint8), (20, 30))
    assert np.array_equal(m, base)
    m, _ = I.normalise_mask(cv2.resize(base, (60, 40), interpolation=cv2.INTER_NEAREST), (20, 30))
    assert np.array_equal(m, base)
    with pytest.raises(I.MaskProblem, match="rotated"):
        I.normalise_mask(base.T.copy(), (20, 30))
    with pytest.raises(I.MaskProblem, match="aspect"):
        I.normalise_mask(np.zeros((20, 20), np.uint8), (20, 30))


def test_split_regions_union_is_the_mask():
    m = np.zeros((40, 40), np.uint8)
    m[2:10, 2:10] = 255
    m[30:38, 25:35] = 255
    m[20, 20] = 255  # a speck joins the largest region
    regions = I.split_regions(m)
    assert len(regions) == 2
    assert np.array_equal(np.maximum.reduce(regions), m)
    assert regions[0][5, 5] == 255  # top region first
    many = np.zeros((40, 40), np.uint8)
    many[::8, ::8] = 255
    many = cv2.dilate(many, np.ones((3, 3), np.uint8))
    assert len(I.split_regions(many)) == 1


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert I.main(["--layout", "nist16", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "NC2016-manipulation-ref.csv" in capsys.readouterr().err
    assert I.main(["--layout", "folder", "--root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_max_side_downscales_image_and_mask_together(tmp_path):
    root = tmp_path / "big"
    _img(root / "images" / "a.png", 0)
    _mask(root / "masks" / "a.png", 0)
    _, samples = _import("folder", root, tmp_path / "out", max_side=32)
    (s,) = samples
    img = cv2.imread(str(tmp_path / "out" / s.images[0]))
    mask = cv2.imread(str(tmp_path / "out" / s.masks[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape[:2] == mask.shape == (24, 32)
    x0, y0, x1, y1 = _rect(0)
    assert np.abs(np.array(s.meta["regions"][0]["bbox"]) - np.array([x0, y0, x1, y1]) / 2).max() <= 1
