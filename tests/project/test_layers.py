"""The package's layers, enforced: each layer imports only the layers below it, and no module
takes part in an import cycle.

Every ``import``/``from ... import`` in every module counts, wherever it stands: at the top,
inside a function (a lazy import is still a dependency) and under ``if TYPE_CHECKING:`` (a
type-only import still ties the modules together). The table below is the one in
``docs/explanation/design.md`` (Layers):

======================  ====  ==================================================================
folder                  rank  what it holds
======================  ====  ==================================================================
``_core``               0     sans-I/O: fds, control messages, framing, the outbox, errors
``_kernel``             1     system calls, peer credentials, blocking helpers, socket files
``_asyncio``            2     transport, protocol, connection, client and server entry points
``_handoff``            3     the hand-off toolkit (must not import ``_lifecycle``)
``_lifecycle``          3     systemd activation, notify, reload (must not import ``_handoff``)
``_serve``              4     app adapters and the runner (must not import ``_fdholder``)
``_fdholder``           4     the fd holder (must not import ``_serve``)
``_tools``              5     CLI, bench, demo: imported by ``__main__`` only
``__init__``            6     re-exports every public name
``__main__``            6     ``python -m aioancillary``
======================  ====  ==================================================================

A module may import modules of its own folder (without cycles) and of any lower rank; never a
higher rank, never a sibling folder of the same rank. A folder not in the table fails the test:
give it a rank here (and in the design page) first.
"""

from __future__ import annotations

import ast
import functools
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "src" / "aioancillary"
PACKAGE = "aioancillary"

#: Folder (or top-level module) -> rank. Same rank, different folder: siblings, kept apart.
RANKS = {
    "_core": 0,
    "_kernel": 1,
    "_asyncio": 2,
    "_handoff": 3,
    "_lifecycle": 3,
    "_serve": 4,
    "_fdholder": 4,
    "_tools": 5,
    "__init__": 6,
    "__main__": 6,
}
#: Folders only some others may import, whatever their rank.
ONLY_FROM = {"_tools": {"__main__", "_tools"}}
# Files that are modules without Python source (a C extension such as _kernel/_speedups).
_MODULE_SUFFIXES = (".py", ".pyi", ".c", ".pyx", ".so")


@dataclass(frozen=True)
class Import:
    """One import statement: who imports what, where."""

    importer: str  # dotted module name
    target: str  # dotted module name it resolves to
    line: int
    type_only: bool


def module_name(root: Path, path: Path) -> str:
    """``aioancillary._asyncio._server`` for ``<root>/_asyncio/_server.py``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def _is_module(root: Path, dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of the tree (any kind of source)."""
    parts = dotted.split(".")[1:]
    base = root.joinpath(*parts) if parts else root
    if base.is_dir():
        return True
    return any(
        candidate.name.split(".")[0] == base.name
        for candidate in base.parent.glob(base.name + ".*")
        if candidate.name.endswith(_MODULE_SUFFIXES)
    )


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of statements under ``if TYPE_CHECKING:``."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for child in node.body:
                    for inner in ast.walk(child):
                        if hasattr(inner, "lineno"):
                            lines.add(inner.lineno)
    return lines


@functools.cache
def _parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def imports_of(root: Path, path: Path) -> Iterator[Import]:
    """Every import of a module of the package made by the module at ``path``."""
    importer = module_name(root, path)
    is_package = path.name == "__init__.py"
    tree = _parsed(path)
    type_only = _type_checking_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield Import(importer, alias.name, node.lineno, node.lineno in type_only)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: level 1 is the importer's own package.
                anchor = importer.split(".")
                drop = node.level - 1 if is_package else node.level
                if drop:
                    anchor = anchor[:-drop]
                base = ".".join(anchor + ([node.module] if node.module else []))
            elif node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module
            else:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                target = submodule if _is_module(root, submodule) else base
                yield Import(importer, target, node.lineno, node.lineno in type_only)


def layer_of(dotted: str) -> str:
    """The table entry of a module: its first folder, or the top-level file's name."""
    parts = dotted.split(".")
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def all_imports(root: Path) -> list[Import]:
    return [imp for path in sorted(root.rglob("*.py")) for imp in imports_of(root, path)]


def violations(root: Path) -> list[str]:
    """Every import against the layering, as readable lines (empty: the rule holds)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        layer = layer_of(module_name(root, path))
        if layer not in RANKS:
            found.append(f"{path.relative_to(root)}: folder {layer!r} has no rank in the table")
    for imp in all_imports(root):
        source, target = layer_of(imp.importer), layer_of(imp.target)
        if source not in RANKS or target not in RANKS:
            continue  # reported above
        where = f"{imp.importer} line {imp.line}{' (type-only)' if imp.type_only else ''}"
        allowed = ONLY_FROM.get(target)
        if allowed is not None and source not in allowed:
            found.append(f"{where}: imports {imp.target}, which only {sorted(allowed)} may")
        elif RANKS[target] > RANKS[source]:
            found.append(
                f"{where}: imports {imp.target} from a higher layer "
                f"({target} rank {RANKS[target]} > {source} rank {RANKS[source]})"
            )
        elif RANKS[target] == RANKS[source] and target != source:
            found.append(f"{where}: imports {imp.target}, a sibling layer ({target})")
    return found


def cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of modules that import each other (Tarjan), and self-imports."""
    graph: dict[str, set[str]] = {}
    for imp in all_imports(root):
        graph.setdefault(imp.importer, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph[node]:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


# -- the package --------------------------------------------------------------------------------


def test_every_import_goes_down_the_layers() -> None:
    found = violations(ROOT)
    assert not found, "imports against the layers:\n" + "\n".join(found)


def test_no_import_cycles() -> None:
    found = cycles(ROOT)
    assert not found, "modules importing each other: " + "; ".join(" <-> ".join(g) for g in found)


def test_imports_inside_the_package_are_relative() -> None:
    absolute = [
        f"{imp.importer} line {imp.line}"
        for path in sorted(ROOT.rglob("*.py"))
        for imp in imports_of(ROOT, path)
        if _absolute(path, imp.line)
    ]
    assert not absolute, f"absolute imports of the package: {absolute}"


def _absolute(path: Path, line: int) -> bool:
    for node in ast.walk(_parsed(path)):
        if isinstance(node, ast.ImportFrom) and node.lineno == line and not node.level:
            return True
        if isinstance(node, ast.Import) and node.lineno == line:
            return True
    return False


def test_the_layers_are_the_folders() -> None:
    """Every folder of the package is in the table, and only the top files live at the top."""
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert folders <= set(RANKS), f"folders without a rank: {folders - set(RANKS)}"
    top = {p.name for p in ROOT.glob("*.py")}
    assert top <= {"__init__.py", "__main__.py"}, f"modules outside the layers: {top}"


# -- the checker itself, on small trees ---------------------------------------------------------


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / PACKAGE
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root


def test_checker_finds_upward_type_only_and_function_level_imports(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "_core/_a.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from .._asyncio._x import X
                def f():
                    from .._kernel import _k
            """,
            "_kernel/_k.py": "from .._core._a import f\n",
            "_asyncio/_x.py": "X = 1\n",
            "_handoff/_h.py": "from .._lifecycle._l import L\n",
            "_lifecycle/_l.py": "L = 1\n",
            "_tools/_cli.py": "from .. import __version__\n",
            "_kernel/_uses_speedups.py": "from ._speedups import fast\n",
            "_kernel/_speedups.c": "/* C */\n",
            "_asyncio/_uses_tools.py": "def f():\n    from .._tools import _cli\n",
        },
    )
    found = "\n".join(violations(root))
    assert "aioancillary._core._a line 4 (type-only): imports aioancillary._asyncio._x" in found
    assert "aioancillary._core._a line 6: imports aioancillary._kernel._k" in found
    assert "aioancillary._handoff._h line 1: imports aioancillary._lifecycle._l, a sibling" in found
    assert "aioancillary._tools._cli line 1: imports aioancillary from a higher layer" in found
    assert "imports aioancillary._tools._cli, which only" in found
    assert "_speedups" not in found  # the extension is in the kernel layer: allowed
    assert len(found.splitlines()) == 5, found


def test_checker_finds_cycles_and_folders_without_a_rank(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "_asyncio/_a.py": "from . import _b\n",
            "_asyncio/_b.py": "def f():\n    from ._c import C\n",
            "_asyncio/_c.py": """
                from typing import TYPE_CHECKING
                if TYPE_CHECKING:
                    from ._a import A
                C = 1
            """,
            "_asyncio/_alone.py": "from . import _alone\n",
            "_new/_thing.py": "",
        },
    )
    assert cycles(root) == [
        ["aioancillary._asyncio._a", "aioancillary._asyncio._b", "aioancillary._asyncio._c"],
        ["aioancillary._asyncio._alone"],
    ]
    assert any("'_new' has no rank" in line for line in violations(root))


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("aioancillary", "__init__"),
        ("aioancillary.__main__", "__main__"),
        ("aioancillary._kernel._speedups", "_kernel"),
        ("aioancillary._serve._runner", "_serve"),
        ("aioancillary._fdholder", "_fdholder"),
    ],
)
def test_layer_of(module: str, layer: str) -> None:
    assert layer_of(module) == layer
