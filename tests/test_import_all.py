"""Every module under ``rlhfkit`` imports: a syntax error, a missing name at module level or a
circular import in a module no other test touches still fails the suite."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
import re
from pathlib import Path

import pytest

import rlhfkit

# Optional dependencies a module may import at module level, with why they are optional. A module that
# fails to import because one of these is absent passes; any other import failure is a bug. Only
# packages from pyproject's optional extras belong here (checked below), never a core dependency.
OPTIONAL_DEPS = {
    "vllm": "rollout generation backend (extra 'vllm'): needs a CUDA GPU, absent on CPU machines and in CI",
}


def all_modules() -> list[str]:
    names = [rlhfkit.__name__]
    for info in pkgutil.walk_packages(rlhfkit.__path__, prefix="rlhfkit.", onerror=lambda name: names.append(name)):
        names.append(info.name)
    return sorted(set(names))


def installed(dist: str) -> bool:
    return importlib.util.find_spec(dist) is not None


@pytest.mark.parametrize("name", all_modules())
def test_module_imports(name):
    if name.rsplit(".", 1)[-1] == "__main__":
        # `python -m pkg` entry points run their command when imported: compile them instead
        spec = importlib.util.find_spec(name)
        compile(Path(spec.origin).read_text(), spec.origin, "exec")
        return
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing in OPTIONAL_DEPS and not installed(missing):
            return  # allowed: see OPTIONAL_DEPS[missing]
        raise


def test_walk_finds_the_foundation_modules():
    names = all_modules()
    for expected in ("rlhfkit.cli", "rlhfkit.config", "rlhfkit.models.loading", "rlhfkit.data.chat",
                     "rlhfkit.train.sft", "rlhfkit.train.runtime", "rlhfkit.tracking"):
        assert expected in names
    assert len(names) >= 20


def test_optional_deps_are_really_optional_extras():
    # requirements of the installed rlhfkit: 'vllm>=0.6; extra == "vllm"' for an extra's, no marker for core
    extras, core = set(), set()
    for req in importlib.metadata.requires("rlhfkit") or []:
        name = re.split(r"[<>=!~\[; ]", req)[0].lower()
        (extras if "extra ==" in req else core).add(name)
    assert "torch" in core
    for dep in OPTIONAL_DEPS:
        assert dep in extras and dep not in core, f"{dep} is not an optional extra in pyproject.toml"
