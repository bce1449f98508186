"""The package's imports run one way (README "Layout"; issue "One home for each job").

    ops, config, tracking -> data -> losses, models -> rollout -> train, evaluate, feedback, annotate
    -> pipelines -> cli

A module may import its own sub-package and any lower layer, never a higher layer or a sibling on its
own layer (train must not reach into evaluate, nor losses into models). ``losses/`` imports only torch,
the standard library and ``rlhfkit.ops``. An ``import rlhfkit...`` inside a function (the usual way to
dodge a cycle) is allowed only in ``cli/``, whose dispatcher loads one command's module on demand.
The test reads every module's source with ``ast``; nothing is imported.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rlhfkit"

LAYERS = [
    {"rlhfkit", "ops", "config", "tracking"},
    {"data"},
    {"losses", "models"},
    {"rollout"},
    {"train", "evaluate", "feedback", "annotate"},
    {"pipelines"},
    {"cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

# Sideways imports that are part of the design, each with its reason.
ALLOWED_SIDEWAYS = {
    # the statistics (bootstrap CIs, IQM) are plain numpy/scipy functions that every layer-4 package reports with
    ("annotate", "evaluate.stats"), ("feedback", "evaluate.stats"), ("train", "evaluate.stats"),
}

LOSSES_MAY_IMPORT = {"torch", "math", "dataclasses", "typing", "collections", "__future__", "rlhfkit.ops"}


def unit_of(module: str) -> str:
    """'rlhfkit.train.grpo' -> 'train'; 'rlhfkit.ops' -> 'ops'; 'rlhfkit' -> 'rlhfkit'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "rlhfkit"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path):
    """(imported module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path)
    is_pkg = path.name == "__init__.py"
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against this module's package
                    base = here.split(".") if is_pkg else here.split(".")[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                found.append((target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:  # alembic's own files, run by alembic
            continue
        here = module_name(path)
        src = unit_of(here)
        rel = path.relative_to(PACKAGE.parent)
        for target, line, in_function in imports(path):
            if src == "losses" and not any(target == m or target.startswith(m + ".") for m in LOSSES_MAY_IMPORT) \
                    and not target.startswith("rlhfkit.losses"):
                out.append(f"{rel}:{line}: losses/ imports {target} (only torch, the standard library and ops)")
            if not target.startswith("rlhfkit"):
                continue
            dst = unit_of(target)
            if in_function and src != "cli":
                out.append(f"{rel}:{line}: imports {target} inside a function (move it to the top)")
            if dst == src or dst not in RANK:
                continue
            rest = target.split(".", 1)[1] if "." in target else target
            if RANK[dst] > RANK[src]:
                out.append(f"{rel}:{line}: {src} (layer {RANK[src]}) imports {target} from a higher layer ({RANK[dst]})")
            elif RANK[dst] == RANK[src] and (src, rest) not in ALLOWED_SIDEWAYS and src != "rlhfkit" \
                    and dst != "rlhfkit":
                out.append(f"{rel}:{line}: {src} imports its sibling {target} (same layer {RANK[src]})")
    return out


def test_every_package_has_a_layer():
    units = {p.name for p in PACKAGE.iterdir() if (p.is_dir() and (p / "__init__.py").exists())}
    units |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert units <= set(RANK), f"packages without a layer: {sorted(units - set(RANK))}"


def test_imports_follow_the_layer_order():
    found = violations()
    assert not found, "imports against the layer order:\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from rlhfkit.train import grpo\n", "higher layer"),
    ("def f():\n    from rlhfkit.ops import exact_div\n", "inside a function"),
    ("from rlhfkit.evaluate import winrate\n", "sibling"),
])
def test_the_checker_catches_a_bad_import(tmp_path, monkeypatch, source, expected):
    """Teeth: a module in rollout/ (or train/ for the sibling case) with a bad import is reported."""
    fake = tmp_path / "rlhfkit"
    unit = "train" if expected == "sibling" else "rollout"
    (fake / unit).mkdir(parents=True)
    (fake / unit / "bad.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert any(expected in v for v in violations())
