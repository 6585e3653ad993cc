"""Package layering: journal <- replicator <- cdp.

* ``journal`` is the storage core: it imports neither ``replicator`` nor ``cdp``.
* ``replicator`` builds on ``journal`` only: it never imports ``cdp``.
* ``cdp`` (daemon, CLI, capture sources) may import both.

Checked statically with ``ast`` so that imports hidden behind ``TYPE_CHECKING``, inside
functions, or in modules no test imports are caught too.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGES = ("journal", "replicator", "cdp")

# top-level package -> top-level project packages it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "journal": frozenset({"replicator", "cdp"}),
    "replicator": frozenset({"cdp"}),
    "cdp": frozenset(),
}


@dataclass(frozen=True)
class Violation:
    module: str
    line: int
    imported: str

    def __str__(self) -> str:
        top = self.module.split(".")[0]
        return f"{self.module}:{self.line}: {top} must not import {self.imported}"


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute name of ``from <'.' * level><name> import ...`` written in ``module``.

    Going above the top-level package (invalid at run time) resolves to the names the
    author evidently meant, e.g. ``from .. import cdp`` in ``journal.x`` -> ``cdp``.
    """
    parts = module.split(".")
    package = parts if is_package else parts[:-1]
    base = package[: max(len(package) - (level - 1), 0)]
    if name:
        base = [*base, *name.split(".")]
    return ".".join(base)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``tree``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            else:
                base = node.module or ""
            if base:
                found.append((node.lineno, base))
            # `from . import cdp` / `from .. import replicator` name modules in the list
            found.extend(
                (node.lineno, f"{base}.{alias.name}" if base else alias.name)
                for alias in node.names
                if alias.name != "*"
            )
        elif isinstance(node, ast.Call):
            # importlib.import_module("cdp.x") / __import__("cdp") with a literal name
            func = node.func
            fname = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else None
            )
            if (
                fname in {"import_module", "__import__"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                found.append((node.lineno, node.args[0].value))
    return found


def check_source(source: str, module: str, is_package: bool = False) -> list[Violation]:
    """Layering violations in ``source``, the text of module ``module`` (e.g. ``journal.seg``)."""
    top = module.split(".")[0]
    forbidden = FORBIDDEN.get(top, frozenset())
    tree = ast.parse(source, filename=module)
    violations = []
    for line, name in _imported_names(tree, module, is_package):
        if name.split(".")[0] in forbidden:
            violations.append(Violation(module, line, name))
    return sorted(set(violations), key=lambda v: (v.line, v.imported))


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def _project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))


# --- the real tree --------------------------------------------------------------------------


@pytest.mark.parametrize("package", PACKAGES)
def test_package_exists(package: str) -> None:
    assert (REPO_ROOT / package / "__init__.py").is_file()


def test_project_layering() -> None:
    files = _project_files()
    assert files, "no .py files found under journal/ replicator/ cdp/"
    violations: list[Violation] = []
    for path in files:
        module, is_package = _module_name(path)
        violations += check_source(path.read_text(encoding="utf-8"), module, is_package)
    assert not violations, "layering violations:\n" + "\n".join(map(str, violations))


# --- the checker itself ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "is_package", "source", "imported"),
    [
        ("journal.segment", False, "import cdp\n", "cdp"),
        ("journal.segment", False, "import replicator.sender as s\n", "replicator.sender"),
        ("journal.segment", False, "from cdp.config import load\n", "cdp.config"),
        ("journal", True, "from replicator import wire\n", "replicator"),
        ("journal.index.rebuild", False, "import os\nimport cdp.api, json\n", "cdp.api"),
        ("replicator.sender", False, "from cdp import daemon\n", "cdp"),
        ("replicator.sender", False, "from .. import cdp\n", "cdp"),
        ("replicator.sender", False, "from ..cdp.api import x\n", "cdp.api"),
        (
            "journal.segment",
            False,
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cdp.api import A\n",
            "cdp.api",
        ),
        ("journal.segment", False, "def f():\n    import cdp.cli\n", "cdp.cli"),
        (
            "journal.segment",
            False,
            "import importlib\nm = importlib.import_module('replicator.wire')\n",
            "replicator.wire",
        ),
    ],
)
def test_checker_catches_violation(
    module: str, is_package: bool, source: str, imported: str
) -> None:
    violations = check_source(source, module, is_package)
    assert imported in {v.imported for v in violations}, violations


@pytest.mark.parametrize(
    ("module", "is_package", "source"),
    [
        ("journal.segment", False, "import os\nimport msgpack\nfrom . import frame\n"),
        ("journal.segment", False, "from .index import Index\nfrom journal.frame import F\n"),
        ("journal", True, "from . import segment\nfrom .segment import Segment\n"),
        ("journal.segment", False, "import cdpx\nimport replicators\nfrom cdp_tools import x\n"),
        ("replicator.sender", False, "import journal\nfrom journal.segment import Segment\n"),
        ("replicator.sender", False, "from .wire import encode\nfrom ..journal import seg\n"),
        ("cdp.daemon", False, "import journal\nimport replicator\nfrom cdp import cli\n"),
    ],
)
def test_checker_allows(module: str, is_package: bool, source: str) -> None:
    assert check_source(source, module, is_package) == []


def test_checker_reports_location() -> None:
    (v,) = check_source("import os\n\nimport cdp.api\n", "journal.segment")
    assert (v.module, v.line, v.imported) == ("journal.segment", 3, "cdp.api")
    assert "journal must not import cdp.api" in str(v)
