"""Imports go one way: prompts <- assistant <- finetune, demo; data_builders -> prompts only.

Everything is imported through the one root package (``loupe_vlm.assistant``...). A bare top-level
import (``from prompts import ...``) would only work from a source checkout, so it is an error here.
Verbs dispatched by ``"module:function"`` strings (``loupe_vlm.cli``, ``data_builders.cli``) count as
imports of those modules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("prompts", "assistant", "data_builders", "finetune", "demo")
ALLOWED = {
    "prompts": set(),
    "assistant": {"prompts"},
    "data_builders": {"prompts"},
    "finetune": {"prompts", "assistant"},
    "demo": {"prompts", "assistant"},
}
_DISPATCH = re.compile(r"^loupe_vlm\.(\w+)(\.\w+)*(:\w+)?$")


def imports_of(path: Path) -> tuple[set[str], list[str]]:
    """(subpackages of loupe_vlm that ``path`` imports or dispatches to, bare top-level imports found)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    bare: list[str] = []

    def note(module: str, line: int) -> None:
        parts = module.split(".")
        if parts[0] == "loupe_vlm":
            if len(parts) > 1:
                found.add(parts[1])
        elif parts[0] == "tests":
            found.add("tests")
        elif parts[0] in SUBPACKAGES:
            bare.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line} imports {module}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                note(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            note(node.module, node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _DISPATCH.match(node.value)
            if m and m.group(1) in SUBPACKAGES:
                found.add(m.group(1))
    return found, bare


def _source_files():
    for pkg in (*SUBPACKAGES, "loupe_vlm", "tests", "benchmarks"):
        yield pkg, sorted((ROOT / pkg).rglob("*.py"))


def test_imports_go_one_way():
    problems = []
    for pkg, allowed in ALLOWED.items():
        for path in (ROOT / pkg).rglob("*.py"):
            found, _ = imports_of(path)
            bad = found - allowed - {pkg}
            if bad:
                problems.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not problems, "\n".join(problems)


def test_no_bare_top_level_imports():
    problems = [b for _, paths in _source_files() for p in paths for b in imports_of(p)[1]]
    assert not problems, "import through the root package (loupe_vlm.X):\n" + "\n".join(problems)


def test_checker_catches_a_bare_import_and_a_dispatch_string(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from prompts import SPECIAL_TOKENS\nVERBS = {'x': 'loupe_vlm.demo.app:main'}\n")
    found, bare = imports_of(bad)
    assert found == {"demo"}
    assert len(bare) == 1 and "prompts" in bare[0]


def test_the_dispatcher_lives_in_the_root_and_sees_every_verb_module():
    """The CLI dispatches to demo and finetune by string; it lives in loupe_vlm/, not in assistant/."""
    from loupe_vlm.cli import VERBS

    found, _ = imports_of(ROOT / "loupe_vlm" / "cli.py")
    assert found == {"assistant", "demo", "data_builders", "finetune"}
    assert {target.split(".")[1] for target, _ in VERBS.values()} == found
    assert not (ROOT / "assistant" / "cli.py").exists()


def test_prompts_has_no_torch():
    for path in (ROOT / "prompts").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(str(n).startswith("torch") for n in names), path
