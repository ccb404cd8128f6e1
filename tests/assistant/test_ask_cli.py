"""`loupe ask` end to end on the tiny checkpoint, through main(argv) and the console script."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from loupe_vlm.assistant.ask import main
from loupe_vlm.cli import main as loupe
from tests.helpers import ASSETS


def test_ask_json_prints_a_schema_record(tiny_checkpoint, capsys, tmp_path):
    mask = tmp_path / "m.png"
    code = main([str(ASSETS / "tampered.png"), "--task", "forgery", "--model", str(tiny_checkpoint),
                 "--json", "--mask-out", str(mask)])
    assert code == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["task"] == "forgery" and rec["forgery"]["tampered"] is True and rec["forgery"]["mask"] == str(mask)
    saved = np.asarray(Image.open(mask))
    assert saved.shape == (96, 128) and set(np.unique(saved)) <= {0, 255}


def test_ask_quality_text(tiny_checkpoint, capsys):
    assert main([str(ASSETS / "noisy.png"), "--model", str(tiny_checkpoint)]) == 0
    out = capsys.readouterr().out
    assert "poor" in out and "score" in out


def test_ask_bad_image_is_a_clear_error(tiny_checkpoint, capsys, tmp_path):
    bad = tmp_path / "zero.png"
    bad.write_bytes(b"")
    assert main([str(bad), "--model", str(tiny_checkpoint)]) == 1
    assert "zero.png" in capsys.readouterr().err


def test_missing_model_is_a_clear_error(capsys, tmp_path):
    assert main([str(ASSETS / "noisy.png"), "--model", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_loupe_dispatcher_help_and_unknown_verb(capsys):
    assert loupe(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in ("ask", "caption", "demo", "build-data", "train", "eval"):
        assert verb in out
    assert loupe(["frobnicate"]) == 2


def test_console_script_runs(tiny_checkpoint):
    proc = subprocess.run([sys.executable, "-m", "loupe_vlm.cli", "ask", str(ASSETS / "noisy.png"), "--model",
                           str(tiny_checkpoint), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["quality"]["rating"] == "poor"
