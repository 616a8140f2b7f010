"""The library's layout rules: no module reaches into another module's private names, and the map in
the package docstring lists every module and subpackage there is."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import sensitivity_lib

PACKAGE = Path(sensitivity_lib.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _owner_package(module: str) -> str:
    return module.rsplit(".", 1)[0]


def _allowed(importer: str, source: str) -> bool:
    """A private name may be used inside its own module, and a private module (``pkg._x``) is the
    internal API of its package: the modules of ``pkg`` may import anything from it."""
    if importer == source:
        return True
    last, pkg = source.rsplit(".", 1)[-1], _owner_package(source)
    return _private(last) and (importer == pkg or importer.startswith(pkg + "."))


def private_uses(source_code: str, importer: str) -> list[str]:
    """Every ``from sensitivity_lib.X import _y``, ``sensitivity_lib.X._y`` and ``alias._y`` (with
    ``alias`` bound to a library module) in ``source_code`` that breaks the rule."""
    tree = ast.parse(source_code)
    bad: list[str] = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sensitivity_lib"):
            for a in node.names:
                target = f"{node.module}.{a.name}"
                is_module = (PACKAGE.parent / Path(*target.split("."))).with_suffix(".py").is_file() or (
                    PACKAGE.parent / Path(*target.split(".")) / "__init__.py").is_file()  # fmt: skip
                if is_module:
                    aliases[a.asname or a.name] = target
                    if _private(a.name) and not _allowed(importer, target):
                        bad.append(f"{importer} imports the private module {target}")
                elif _private(a.name) and not _allowed(importer, node.module):
                    bad.append(f"{importer} imports {a.name} from {node.module}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("sensitivity_lib"):
                    aliases[a.asname or a.name.split(".")[0]] = a.asname and a.name or "sensitivity_lib"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            chain = []
            cur = node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                target = ".".join([aliases[cur.id], *reversed(chain)])
                if not _allowed(importer, target):
                    bad.append(f"{importer} uses {target}.{node.attr}")
    return bad


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_uses_another_modules_private_names(path):
    assert private_uses(path.read_text(), _module_name(path)) == []


def test_the_checker_catches_each_kind_of_reach():
    cases = {
        "from sensitivity_lib.graph import _bind": 1,
        "from sensitivity_lib import graph\ngraph._bind(None, (), {})": 1,
        "import sensitivity_lib.krylov\nsensitivity_lib.krylov._lanczos": 1,
        "from sensitivity_lib.condition import _common": 1,  # from outside the subpackage
        "from sensitivity_lib.graph import build_plan": 0,
    }
    for code, n in cases.items():
        assert len(private_uses(code, "sensitivity_lib.influence.measure")) == n, code
    # inside its own subpackage a private module is fair game
    inside = "from sensitivity_lib.condition._common import norms"
    assert private_uses(inside, "sensitivity_lib.condition.local") == []


def test_the_package_map_lists_every_module_and_subpackage():
    doc = sensitivity_lib.__doc__
    names = [m.name for m in pkgutil.iter_modules([str(PACKAGE)]) if not m.name.startswith("_")]
    missing = [n for n in names if n not in doc]
    assert not missing, f"the package docstring's map does not mention {missing}"
    for sub in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        subdoc = (sub / "__init__.py").read_text()
        mods = [m.name for m in pkgutil.iter_modules([str(sub)]) if not m.name.startswith("_")]
        assert all(m in subdoc for m in mods), (sub.name, mods)
