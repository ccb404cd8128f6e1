"""The wheel installs one root package (loupe_vlm) and the loupe script, with the embedded model and recipes."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(out)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr and "setuptools" in proc.stderr:
        pytest.skip("setuptools is not installed in this environment")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("loupe_vlm-*.whl")
    return zipfile.ZipFile(path)


def test_only_the_root_package_lands_in_site_packages(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    assert tops == {"loupe_vlm", next(t for t in tops if t.endswith(".dist-info"))}
    for sub in ("prompts", "assistant", "data_builders", "finetune", "demo"):
        assert f"loupe_vlm/{sub}/__init__.py" in wheel.namelist()
    assert not any(n.startswith("loupe_vlm/tests") for n in wheel.namelist())


def test_the_loupe_script_and_package_data_ship(wheel):
    names = set(wheel.namelist())
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "loupe = loupe_vlm.cli:main" in wheel.read(entry).decode()
    weights = ROOT / "assistant" / "weights"
    for f in weights.rglob("*"):
        if f.is_file():
            assert f"loupe_vlm/assistant/weights/{f.relative_to(weights).as_posix()}" in names
    for f in (ROOT / "finetune" / "recipes").iterdir():
        assert f"loupe_vlm/finetune/recipes/{f.name}" in names
