"""The annotation package sits below the CLI in the layer order (issue 14): it may import only
``rlhfkit.data``, ``ops``, ``config``, ``tracking``, ``evaluate.stats`` and itself, and never
inside a function (an import there would hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import rlhfkit.annotate

ALLOWED = ("rlhfkit.annotate", "rlhfkit.data", "rlhfkit.ops", "rlhfkit.config", "rlhfkit.tracking",
           "rlhfkit.evaluate.stats")
PACKAGE = Path(rlhfkit.annotate.__file__).parent


def rlhfkit_imports(tree: ast.AST):
    """(module, line, inside a function) for every ``import rlhfkit...`` / ``from rlhfkit... import``."""
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(x) for f in functions for x in ast.walk(f)}
    for node in ast.walk(tree):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
        for name in names:
            if name == "rlhfkit" or name.startswith("rlhfkit."):
                yield name, node.lineno, id(node) in nested


def test_the_checker_sees_bad_imports():
    tree = ast.parse("import rlhfkit.train.ppo\ndef f():\n    from rlhfkit.annotate import store\n")
    assert list(rlhfkit_imports(tree)) == [("rlhfkit.train.ppo", 1, False), ("rlhfkit.annotate", 3, True)]


def test_annotate_imports_only_lower_layers():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    bad = []
    for path in files:
        for name, line, in_function in rlhfkit_imports(ast.parse(path.read_text(), str(path))):
            rel = f"{path.relative_to(PACKAGE.parent.parent)}:{line}"
            if not (name in ALLOWED or name.startswith(tuple(a + "." for a in ALLOWED))):
                bad.append(f"{rel}: {name} is above the annotate layer")
            if in_function:
                bad.append(f"{rel}: {name} imported inside a function")
    assert bad == []
