"""Plugins use aligntk's public API only, as a third-party plugin would.

The public API is ``aligntk.__all__`` plus the test harness ``aligntk.testing``. Every
module of the built-in plugins (``plugins/``) and of the example third-party plugin is
parsed (not imported), and each ``from aligntk... import`` / ``import aligntk...`` and
each ``aligntk.<name>`` attribute is checked: the module must be ``aligntk`` or
``aligntk.testing``, and a name taken from ``aligntk`` must be in ``aligntk.__all__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import aligntk
import aligntk.testing

ROOT = Path(__file__).resolve().parents[1]
#: The modules a plugin may import from.
PUBLIC_MODULES = {"aligntk", "aligntk.testing"}
PLUGIN_FILES = sorted(
    [*(ROOT / "plugins").rglob("*.py"), *(ROOT / "tests" / "plugins" / "aligntk-example").rglob("*.py")]
)


def private_uses(tree: ast.AST) -> list[str]:
    """``line: what`` for every use of aligntk outside its public API in a parsed module."""
    found: list[str] = []
    aliases: set[str] = set()  # local names bound to the aligntk package itself
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "aligntk":
                continue
            if node.module not in PUBLIC_MODULES:
                found.append(f"{node.lineno}: from {node.module} import ...")
                continue
            for alias in node.names:
                if node.module == "aligntk" and alias.name not in aligntk.__all__:
                    found.append(f"{node.lineno}: from aligntk import {alias.name} (not in aligntk.__all__)")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "aligntk":
                    continue
                if alias.name not in PUBLIC_MODULES:
                    found.append(f"{node.lineno}: import {alias.name}")
                elif alias.name == "aligntk":
                    aliases.add(alias.asname or "aligntk")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            public = node.attr in aligntk.__all__ or node.attr == "testing"
            if not public:
                found.append(f"{node.lineno}: aligntk.{node.attr} (not in aligntk.__all__)")
    return found


def test_there_are_plugin_modules() -> None:
    assert len(PLUGIN_FILES) >= 20, PLUGIN_FILES


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_plugin_imports_only_the_public_api(path: Path) -> None:
    found = private_uses(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    assert not found, f"{path.relative_to(ROOT)} uses aligntk beyond its public API:\n  " + "\n  ".join(found)


def test_every_public_name_exists() -> None:
    assert len(set(aligntk.__all__)) == len(aligntk.__all__), "a name is listed twice in aligntk.__all__"
    missing = [name for name in aligntk.__all__ if not hasattr(aligntk, name)]
    assert not missing, f"aligntk.__all__ lists names aligntk does not have: {missing}"


def test_no_method_vocabulary_in_the_core_api() -> None:
    # Advantage estimators, KL estimators and PGR live in the plugins that use them.
    for name in ("Scored", "AdvantageEstimator", "KLEstimator", "Aggregation"):
        assert name not in aligntk.__all__ and not hasattr(aligntk, name)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("from aligntk.datafiles import read_rows", "from aligntk.datafiles import"),
        ("from aligntk import Registry", "not in aligntk.__all__"),
        ("import aligntk.engine", "import aligntk.engine"),
        ("import aligntk as at\nat.metrics.load_metric('x')", "aligntk.metrics"),
    ],
)
def test_the_check_catches_private_uses(source: str, problem: str) -> None:
    found = private_uses(ast.parse(source))
    assert found and problem in found[0], found


@pytest.mark.parametrize(
    "source",
    ["from aligntk import read_rows, token_logps", "from aligntk.testing import tiny_model", "import aligntk\naligntk.train"],
)
def test_the_check_lets_public_uses_pass(source: str) -> None:
    assert private_uses(ast.parse(source)) == []
