"""The package's own import graph, read from the source (standard library only: the Snakefile uses it).

Every rule lists as input the code its command runs: ``code_of("pipeline.train")`` is the
command's module and every ``pipeline`` module it imports, directly or through others, at module
level or inside functions. Editing any of them reruns the jobs that run it; editing a module the
command never imports does not.

>>> from pipeline.common.locations import PACKAGE
>>> files = code_of("pipeline.split")
>>> PACKAGE / "intake" / "split.py" in files and PACKAGE / "common" / "errors.py" in files
True
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from pipeline.common.locations import PACKAGE

ROOT = "pipeline"


def module_file(name: str, package: Path = PACKAGE) -> Path | None:
    """The file of dotted module ``name`` (``pipeline.x.y``), or None when it is not a module of the package."""
    parts = name.split(".")
    if parts[0] != ROOT:
        return None
    base = package.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path, package: Path = PACKAGE) -> set[str]:
    """Dotted names of the package modules that the module at ``path`` imports, anywhere in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == ROOT:
            found.add(node.module)
            # ``from pipeline.x import y``: y may be a module of its own
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if module_file(f"{node.module}.{alias.name}", package)}
    return {name for name in found if module_file(name, package)}


def parents(name: str) -> list[str]:
    """The packages a module's import runs first: ``pipeline.a.b`` → ``pipeline``, ``pipeline.a``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.lru_cache(maxsize=None)
def closure(name: str, package: Path = PACKAGE) -> frozenset[str]:
    """``name`` and every package module it imports, transitively (with their parent packages)."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop()
        if current in seen or module_file(current, package) is None:
            continue
        seen.add(current)
        todo += [*imported(module_file(current, package), package), *parents(current)]
    return frozenset(seen)


def code_of(*names: str, package: Path = PACKAGE) -> list[Path]:
    """The files of the modules ``names`` and of everything they import, sorted."""
    modules = set().union(*(closure(n, package) for n in names))
    return sorted(module_file(m, package) for m in modules)
