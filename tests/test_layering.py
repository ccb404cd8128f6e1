"""Imports go one way: prompts <- assistant <- finetune, demo; data_builders -> prompts only."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prompts", "assistant", "data_builders", "finetune", "demo", "tests")
ALLOWED = {
    "prompts": set(),
    "assistant": {"prompts"},
    "data_builders": {"prompts"},
    "finetune": {"prompts", "assistant"},
    "demo": {"prompts", "assistant"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


def test_imports_go_one_way():
    problems = []
    for pkg, allowed in ALLOWED.items():
        for path in (ROOT / pkg).rglob("*.py"):
            bad = _imports(path) - allowed - {pkg}
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_prompts_has_no_torch():
    for path in (ROOT / "prompts").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(str(n).startswith("torch") for n in names), path
