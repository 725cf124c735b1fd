"""The package's shape: subpackages in layers, each importing only from layers below it.

The order is the one the README's Development section draws; this test reads every import (ast, so
imports inside functions count too) and fails on one that points up or sideways, on a cycle among the
modules of one subpackage, and on a module grown past the size a reader takes in at once.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ocec"
# lowest first; packages on one line may not import each other
LAYERS = [("core",), ("data", "models"), ("engine",), ("finetune",), ("training",), ("tools",), ("",)]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every ocec module `path` imports, as a dotted name (`from . import x` counts x when it is a module)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ocec"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ocec":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (ROOT / sub.replace(".", "/")).with_suffix(".py").exists()
                found.add(sub if is_module or (ROOT / sub.replace(".", "/")).is_dir() else target)
    return found


def subpackage(module: str) -> str:
    """'ocec.data.decode' -> 'data'; the modules at the top ('ocec.cli', 'ocec') -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_subpackage_has_a_layer_and_a_docstring_saying_what_lives_there():
    found = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert found == set(RANK) - {""}
    for name in found:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "may import" in doc.lower(), (
            f"ocec/{name}/__init__.py: say what lives there and what it may import"
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_only_to_lower_layers(path):
    mine = subpackage(module_name(path))
    wrong = []
    for target in sorted(imported_modules(path)):
        theirs = subpackage(target)
        if theirs != mine and RANK[theirs] >= RANK[mine]:
            wrong.append(f"{target} (layer {theirs or 'top'})")
    assert not wrong, f"{path.relative_to(ROOT)} (layer {mine or 'top'}) imports upward or sideways: {wrong}"


def test_no_import_cycle_among_the_modules_of_a_subpackage():
    imports = {module_name(p): imported_modules(p) for p in MODULES}
    ordered: set[str] = set()
    while len(ordered) < len(imports):
        ready = {m for m, deps in imports.items() if m not in ordered and deps - {m} <= ordered | _packages(deps)}
        assert ready, f"import cycle among {sorted(set(imports) - ordered)}"
        ordered |= ready


def _packages(deps: set[str]) -> set[str]:
    """A subpackage's __init__ only documents (it imports nothing), so importing it is never a cycle."""
    return {d for d in deps if (ROOT / d.replace(".", "/")).is_dir() and d != "ocec"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small_enough_to_read_at_once(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by responsibility"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule can fail: a data module importing the trainer is reported."""
    fake = tmp_path / "ocec" / "data"
    fake.mkdir(parents=True)
    (tmp_path / "ocec" / "training").mkdir()
    (tmp_path / "ocec" / "training" / "trainer.py").write_text("")
    bad = fake / "bad.py"
    bad.write_text("def f():\n    from ..training import trainer\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "ocec")
    assert imported_modules(bad) == {"ocec.training.trainer"}
    with pytest.raises(AssertionError, match="imports upward"):
        test_imports_point_only_to_lower_layers(bad)


def test_the_readme_map_lists_the_layers_in_order():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    positions = [section.index(f"\n  {name}/ ") for names in LAYERS[:-1] for name in names]
    assert positions == sorted(positions)
