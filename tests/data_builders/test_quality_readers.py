"""Public quality-set readers (KADID-10k, TID2013, KonIQ-10k) on tiny folders made in their layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loupe_vlm.data_builders.quality_readers import QualityImportError, import_quality, main, rating_for
from loupe_vlm.prompts import load_jsonl


def _png(path: Path, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).save(path, format=fmt)


def test_kadid10k(tmp_path):
    root = tmp_path / "kadid10k"
    rows = [("I01_01_03.png", 3.2), ("I01_10_05.png", 1.4), ("I01_04_02.png", 4.1), ("I02_11_01.png", 4.6)]
    for k, (name, _) in enumerate(rows):
        _png(root / "images" / name, k)
    _png(root / "images" / "I01.png", 10)
    _png(root / "images" / "I02.png", 11)
    (root / "dmos.csv").write_text("dist_img,ref_img,dmos,var\n" + "".join(
        f"{n},{n[:3]}.png,{m},0.5\n" for n, m in rows) + "I03_01_01.png,I03.png,3.0,0.1\n")
    out = tmp_path / "out"
    assert main(["--layout", "kadid10k", "--root", str(root), "--out", str(out), "--pairs", "2"]) == 0
    samples = {s.id: s for s in load_jsonl(out / "test.jsonl", check_files=True)}
    s = samples["kadid10k-I01_01_03"]
    assert s.task == "quality.assess" and s.images == ["images/I01_01_03.png"]
    assert (out / "images" / "I01_01_03.png").is_symlink()
    assert s.meta["mos"] == 3.2 and s.meta["reference_group"] == "I01"
    assert s.meta["distortions"] == [{"name": "blur_gaussian", "category": "blur", "severity": 3}]
    assert samples["kadid10k-I01_10_05"].meta["distortions"][0]["name"] == "compression_jpeg"
    unmapped = samples["kadid10k-I01_04_02"].meta  # colour diffusion has no counterpart
    assert "distortions" not in unmapped and unmapped["source_distortion"]["mapped"] is False
    pairs = [x for x in samples.values() if x.task == "quality.rate"]
    assert len(pairs) == 2
    for p in pairs:  # within one reference, better = higher MOS
        assert p.meta["better"] == ("A" if p.meta["mos_A"] > p.meta["mos_B"] else "B")
        assert p.meta["reference_group"] == "I01"
    card = (out / "card.md").read_text()
    assert "I03_01_01.png: image not found" in card and "| 4 | color diffusion | unmapped |" in card
    # full-reference variant: the reference comes first, copied in
    out2 = tmp_path / "out2"
    import_quality("kadid10k", root, out2, copy=True, with_reference=True, progress=False)
    s2 = load_jsonl(out2 / "test.jsonl", check_files=True)[0]
    assert s2.image_roles == ["reference", "A"] and s2.images[0] == "images/I01.png"
    assert not (out2 / "images" / "I01.png").is_symlink()


def test_tid2013_names_match_case_insensitively(tmp_path):
    root = tmp_path / "tid2013"
    _png(root / "distorted_images" / "i01_08_1.bmp", 0, "BMP")
    _png(root / "distorted_images" / "I01_17_4.BMP", 1, "BMP")
    _png(root / "reference_images" / "I01.BMP", 2, "BMP")
    (root / "mos_with_names.txt").write_text("5.51429 i01_08_1.bmp\n3.0 i01_17_4.bmp\n")
    out = tmp_path / "out"
    res = import_quality("tid2013", root, out, progress=False)
    assert res["counts"] == {"test": 2}
    samples = {s.id: s for s in load_jsonl(out / "test.jsonl", check_files=True)}
    blur = samples["tid2013-i01_08_1"].meta
    assert blur["distortions"] == [{"name": "blur_gaussian", "category": "blur", "severity": 1}]
    assert blur["mos_range"] == [0.0, 9.0] and blur["rating"] == rating_for(5.51429, 0, 9) == "good"
    assert samples["tid2013-I01_17_4"].meta["source_distortion"] == {
        "type": 17, "name": "contrast change", "level": 4, "mapped": False}


def test_koniq10k_with_official_sets(tmp_path):
    root = tmp_path / "koniq"
    for k, name in enumerate(("1.jpg", "2.jpg", "3.jpg")):
        _png(root / "1024x768" / name, k, "JPEG")
    (root / "koniq10k_scores_and_distributions.csv").write_text(
        "image_name,c1,c2,c3,c4,c5,c_total,MOS,SD,MOS_zscore\n"
        "1.jpg,0,0,1,2,3,6,4.33,0.7,80\n2.jpg,3,2,1,0,0,6,1.67,0.7,20\n3.jpg,0,3,3,0,0,6,2.5,0.5,40\n")
    (root / "koniq10k_distributions_sets.csv").write_text("image_name,set\n1.jpg,training\n2.jpg,test\n3.jpg,test\n")
    out = tmp_path / "out"
    import_quality("koniq10k", root, out, progress=False)
    assert [s.id for s in load_jsonl(out / "train.jsonl")] == ["koniq10k-1"]
    test = load_jsonl(out / "test.jsonl", check_files=True)
    assert [s.meta["mos"] for s in test] == [1.67, 2.5]
    assert all("distortions" not in s.meta for s in test)  # authentic distortions carry no labels


def test_wrong_layout_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["--layout", "tid2013", "--root", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    assert "mos_with_names.txt" in capsys.readouterr().err
    with pytest.raises(QualityImportError, match="no such folder"):
        import_quality("kadid10k", tmp_path / "missing", tmp_path / "o")
