"""House rules that keep the studies thin and the hook names in one place.

* A study reads like a methods section over library calls: at most 200 lines
  (`studies/replicate.py`, the main job, 300; the benchmark and smoke scripts 250).
* Hook names are built by `mechbiqa_hooks.names` only: no string literal outside
  ``hooks/names.py`` and the model files that declare the hooks (``mechbiqa/model/``)
  spells one (docstrings and comments may).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from mechbiqa_hooks import names

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"replicate.py": 300, "smoke_7b.py": 250}
HOOK_LITERAL = re.compile(r"\bhook_[a-z]|(^|\.)blocks\.(\d+|\{l\})\.")


def _limit(path: Path) -> int:
    return LIMITS.get(path.name, 250 if path.name.startswith("bench_") else 200)


def _studies() -> list:
    return [p for p in sorted((REPO / "studies").glob("*.py")) if p.name != "__init__.py"]


@pytest.mark.parametrize("path", _studies(), ids=lambda p: p.name)
def test_study_is_short(path):
    n = len(path.read_text(encoding="utf-8").splitlines())
    assert n <= _limit(path), f"{path.name}: {n} lines > {_limit(path)}; move its logic into the library"


def _literals(source: str) -> list[tuple[int, str]]:
    """Every string constant of a module except bare string statements (docstrings, attribute notes)."""
    tree = ast.parse(source)
    bare = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in bare
    ]


def _checked_files() -> list[Path]:
    files = [
        *(REPO / "mechbiqa").rglob("*.py"),
        *(REPO / "studies").glob("*.py"),
        *(REPO / "hooks").glob("*.py"),
    ]
    model = REPO / "mechbiqa" / "model"
    return sorted(p for p in files if model not in p.parents and p != REPO / "hooks" / "names.py")


def test_hook_names_are_built_by_names():
    found = [
        f"{path.relative_to(REPO)}:{line}: {text!r}"
        for path in _checked_files()
        for line, text in _literals(path.read_text(encoding="utf-8"))
        if HOOK_LITERAL.search(text)
    ]
    assert not found, "hook names spelt outside hooks/names.py (use its functions):\n" + "\n".join(found)


def test_the_rules_catch_what_they_forbid():
    assert _literals('"""doc"""\nX = "llm.blocks.{l}.hook_resid_post"\n') == [
        (2, "llm.blocks.{l}.hook_resid_post")
    ]
    spelt = _literals(
        'def f(i):\n    """Reads llm.blocks.3.hook_z."""\n    return f"llm.blocks.{i}.attn.hook_z"\n'
    )
    assert [t for _, t in spelt if HOOK_LITERAL.search(t)] == [".attn.hook_z"]  # the f-string's tail
    for name in (names.resid_post(3), names.pattern(names.EACH), names.LOGITS, names.IMAGE_TOKENS):
        assert HOOK_LITERAL.search(name), name
    assert not HOOK_LITERAL.search("mechbiqa_hooks.names") and not HOOK_LITERAL.search("the blocks. 3")
    assert _limit(Path("bench_cache.py")) == 250 and _limit(Path("logit_lens.py")) == 200
