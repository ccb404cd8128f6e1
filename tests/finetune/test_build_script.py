"""finetune/recipes/*.sh: the build scripts parse (no test runs them whole; `make loupe-smol-check` does)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script", sorted((ROOT / "finetune/recipes").glob("*.sh")), ids=lambda p: p.name)
def test_the_recipe_scripts_parse(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
