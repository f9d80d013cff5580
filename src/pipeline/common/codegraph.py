"""The package's own import graph, read from the source (standard library only: the Snakefile uses it).

Every rule lists as input the code its command runs: ``code_of("pipeline.learning.train")`` is the
command's module and every ``pipeline`` module it imports, directly or through others, at module
level or inside functions. The input is not those files but their fingerprint
(``fingerprint_file``): one line per module with the hash of its syntax tree without docstrings
(comments and line numbers are not in the tree), rewritten only when a line changes. So editing
code reruns the jobs that run it; editing a docstring or a comment, or a module the command never
imports, reruns nothing.

>>> from pipeline.common.locations import PACKAGE
>>> files = code_of("pipeline.intake.split")
>>> PACKAGE / "intake" / "split.py" in files and PACKAGE / "common" / "errors.py" in files
True
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
from pathlib import Path

from pipeline.common import atomic, jsoncache
from pipeline.common.locations import PACKAGE, USER_CACHE

ROOT = "pipeline"
# Modules that only describe outputs: the TSVs' data dictionaries (their column meanings). They are
# left out of the fingerprint, so rewording or adding a column's description reruns no job (every
# stage writes TSVs, and would otherwise rerun, preprocessing and training included); a dictionary
# is rewritten with its table, the next time that table is.
DESCRIPTIVE = ("pipeline.common.columns",)


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
    return {name for name in parsed(path)[0] if module_file(name, package)}


def parsed(path: Path) -> tuple[frozenset[str], str]:
    """The module at ``path``: (every ``pipeline`` name it imports, a module or not, and for
    ``from pipeline.x import y`` both ``pipeline.x`` and ``pipeline.x.y``; its ``semantic_hash``).
    Kept in the user's cache (``CACHE``) by the file's content, so a Snakemake start (each dry run,
    each cluster job) parses only the modules that changed."""
    source = path.read_bytes()
    key = f"{hashlib.sha256(source).hexdigest()}:{sys.version_info[0]}.{sys.version_info[1]}"
    cache = read_cache()
    USED.add(key)
    if key not in cache:
        names, digest = parse(source, path)
        cache[key] = [sorted(names), digest]
        UNSAVED.add(key)
    names, digest = cache[key]
    return frozenset(names), digest


def parse(source: bytes, path: Path) -> tuple[frozenset[str], str]:
    """``parsed``'s result from the module's source: one walk over the syntax tree finds the imports
    and drops the docstrings, then the tree without positions is hashed."""
    tree = ast.parse(source, filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == ROOT:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            drop_docstring(node)
    return frozenset(found), hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).hexdigest()


# Parsed modules across processes, by the SHA-256 of their source and the Python version (the syntax
# tree's form), in the user's cache; unreadable or unwritable, modules are parsed every time.
CACHE = USER_CACHE / "codegraph.json"


CACHE_LIMIT = 2000  # entries; beyond it only this process's modules are kept
UNSAVED: set[str] = set()
USED: set[str] = set()


@functools.lru_cache(maxsize=1)
def read_cache() -> dict:
    cache = jsoncache.read(CACHE)
    return cache if isinstance(cache, dict) else {}


def save_cache() -> None:
    """Write the modules parsed since the last save into ``CACHE`` (quietly nothing when it cannot)."""
    if not UNSAVED:
        return
    try:
        cache = read_cache()
        if len(cache) > CACHE_LIMIT:
            cache = {key: cache[key] for key in USED}
        jsoncache.write(CACHE, cache)
        UNSAVED.clear()
    except OSError:
        pass


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
    save_cache()
    return sorted(module_file(m, package) for m in modules)


def drop_docstring(node: ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
    """Remove the docstring of a module, class or function node (in place)."""
    first = node.body[0] if node.body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        node.body = node.body[1:] or [ast.Pass()]


def semantic_hash(path: Path) -> str:
    """SHA-256 of the module's syntax tree without docstrings, comments and positions: what it does."""
    return parsed(path)[1]


def fingerprint(*names: str, package: Path = PACKAGE) -> str:
    """``<hash>  <module file>`` per module of ``code_of(names)`` but the ``DESCRIPTIVE`` ones (paths
    relative to the package's parent)."""
    descriptive = {module_file(m, package) for m in DESCRIPTIVE}
    return "".join(f"{semantic_hash(path)}  {path.relative_to(package.parent).as_posix()}\n"
                   for path in code_of(*names, package=package) if path not in descriptive)


def fingerprint_file(name: str, folder: Path, package: Path = PACKAGE) -> Path:
    """``folder/<name>.sha256`` holding ``fingerprint(name)``; written (atomically) only when it
    differs, so its modification time moves only when the code's behaviour may have."""
    path = folder / f"{name}.sha256"
    text = fingerprint(name, package=package)
    if not path.is_file() or path.read_text() != text:
        folder.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
    return path
