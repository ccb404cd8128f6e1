"""The contact sheet: every distortion function x 5 severities on one photo, in one PNG."""

from __future__ import annotations

from loupe_vlm.data_builders.contact_sheet import main
from loupe_vlm.data_builders.sources import load_rgb, save_png
from loupe_vlm.prompts import DISTORTIONS


def test_contact_sheet_grid(tmp_path, photo):
    save_png(tmp_path / "p.png", photo)
    out = tmp_path / "sheet.png"
    assert main(["--out", str(out), "--image", str(tmp_path / "p.png"), "--tile", "40"]) == 0
    sheet = load_rgb(out)
    assert sheet.shape == (40 * len(DISTORTIONS), 40 * 6, 3)
    # the first column is the pristine crop on every row; the others differ from it
    row = sheet[:40]
    assert (row[20:, :40] != row[20:, 40:80]).any()
    assert (sheet[20:40, :40] == sheet[60:80, :40]).all()
