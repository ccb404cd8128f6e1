"""finetune/recipes/*.sh: the build scripts parse, and build-loupe-smol.sh's test for the external set's photos
says yes only where benchmarks/external_corruptions.py would find some (a quick run's small split may have
none, and the script then skips that set instead of stopping)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "finetune/recipes/build-loupe-smol.sh"


@pytest.mark.parametrize("script", sorted((ROOT / "finetune/recipes").glob("*.sh")), ids=lambda p: p.name)
def test_the_recipe_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _external_photos(data: Path, records: list[dict]) -> int:
    """Exit status of the script's ``external_photos`` on a quality test split of ``records``."""
    (data / "quality").mkdir(parents=True)
    (data / "quality/test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = SCRIPT.read_text()
    found = re.search(r"^EXTERNAL_SOURCES=.*?^}\n", text, re.S | re.M)
    assert found, "build-loupe-smol.sh defines EXTERNAL_SOURCES and external_photos() together"
    venv = data / ".venv/bin"  # the function calls .venv/bin/python, relative to the repository root
    venv.mkdir(parents=True)
    (venv / "python").symlink_to(sys.executable)
    snippet = f'DATA="{data}"\n{found.group(0)}external_photos'
    return subprocess.run(["bash", "-c", snippet], cwd=data, capture_output=True, text=True).returncode


def _record(photo: str, roles: list[str]) -> dict:
    return {"id": photo, "task": "quality.assess", "images": [f"{r}.png" for r in roles], "image_roles": roles,
            "meta": {"source_photo": photo}}


def test_external_photos_needs_a_reference_view_from_the_external_sources(tmp_path):
    assert _external_photos(tmp_path / "a", [_record("opencv-doc:leuvenA", ["reference", "A"])]) == 0
    assert _external_photos(tmp_path / "b", [_record("gcompris-qt-data:x", ["reference", "A"]),
                                             _record("tuxpaint:y", ["A"])]) == 0


def test_external_photos_says_no_for_other_sources_or_no_reference(tmp_path):
    assert _external_photos(tmp_path / "a", [_record("tuxpaint:y", ["reference", "A"])]) == 1
    assert _external_photos(tmp_path / "b", [_record("opencv-doc:leuvenA", ["A"])]) == 1
    assert _external_photos(tmp_path / "c", []) == 1
