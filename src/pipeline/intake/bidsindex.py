"""The NIfTI files of a BIDS tree, parsed into entities with pybids' own rules, cached, and filtered.

pybids' ``BIDSLayout`` indexes every file into a SQL database, which takes minutes for large
cohorts. Ingest needs far less: the entities of the NIfTI files under ``sub-*/``. This module
applies the entity patterns of pybids' configuration (``bids``, plus ``derivatives`` for
derivative folders) to each file's path relative to the dataset root, exactly as
``bids.layout.parse_file_entities`` does, and caches the result (``load_index``).

Entity values are kept as written in the file name (``run`` ``"01"``), ``""`` when absent.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.common import jsoncache
from pipeline.common.errors import InputError
from pipeline.common.fingerprint import file_stamp, listing_fingerprint, scan_tree

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
CACHE_VERSION = 2  # 2: JSON (.json); the binary version-1 .pkl files are never read
RACY_NS = 2 * 10**9  # folders modified this close to a scan are scanned again next time


@dataclass(frozen=True)
class EntityRule:
    """One pybids entity: its name, compiled pattern, file-name key (``acq``) and dtype."""

    name: str
    regex: re.Pattern
    key: str | None
    dtype: str


@functools.cache
def entity_rules(configs: tuple[str, ...] = ("bids",)) -> dict[str, EntityRule]:
    """The entities of pybids' named configurations, in pybids' order (later configs add entities)."""
    from bids.layout.models import Config

    rules = {}
    for config in configs:
        for name, entity in Config.load(config).entities.items():
            key = re.search(r"([A-Za-z]+)-\(", entity.pattern)
            rules[name] = EntityRule(name, re.compile(entity.pattern), key and key[1], entity._dtype)
    return rules


def parse_entities(relpath: str, rules: dict[str, EntityRule]) -> dict[str, str]:
    """Entities of the file at ``relpath`` (relative to the dataset root), as pybids parses them.

    pybids matches its patterns against the absolute path; matching ``/relpath`` gives the same
    values without picking up ``sub-``/``ses-`` from the folders above the dataset.
    """
    return _parse("/" + relpath, _matchers(rules))


def _matchers(rules: dict[str, EntityRule]) -> list[tuple[str, str, object]]:
    """Per entity: name, a literal its pattern needs (``"acq-"``, or ``""``) and the search method."""
    return [(r.name, f"{r.key}-" if r.key else "", r.regex.search) for r in rules.values()]


def _parse(path: str, matchers: list) -> dict[str, str]:
    found = {}
    for name, literal, search in matchers:
        if literal in path:  # cheap pre-test: without its literal the pattern cannot match
            match = search(path)
            if match:
                found[name] = match.group(1)
    return found


def is_subject_nifti(relpath: str) -> bool:
    """True for a .nii/.nii.gz file inside a ``sub-*`` folder of the dataset root."""
    return relpath.startswith("sub-") and "/" in relpath and relpath.endswith(NIFTI_EXTENSIONS)


def index_listing(listing: list[tuple[str, int, int]], rules: dict[str, EntityRule]) -> pd.DataFrame:
    """One row per NIfTI file under ``sub-*/`` of a ``scan_tree`` listing: its relative path and entities.

    Entity columns (only those that occur) follow pybids' order; absent values are ``""``.
    """
    matchers = _matchers(rules)
    records = [{"path": path, **_parse("/" + path, matchers)} for path, _, _ in listing if is_subject_nifti(path)]
    table = pd.DataFrame.from_records(records, columns=None if records else ["path"])
    entities = [name for name in rules if name in table.columns]
    return table[["path", *entities]].fillna("").astype(str)


def load_index(root: Path, cache_dir: Path | None = None, configs: tuple[str, ...] = ("bids",)) -> pd.DataFrame:
    """``index_listing`` of the tree at ``root``, reused from ``cache_dir`` while the tree is unchanged.

    A warm cache is checked by stat'ing its folders (``unchanged``); otherwise the tree is listed,
    and parsed again only when the listing's fingerprint (``pipeline.common.fingerprint``, of names only:
    the index depends on nothing else) differs from the cached one. Nothing is written under ``root``.
    """
    root = Path(root)
    key = [CACHE_VERSION, importlib.metadata.version("pybids"), list(configs), str(root.resolve())]
    cache = Path(cache_dir) / f"index-{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}.json" if cache_dir else None
    cached = cached_index(jsoncache.read(cache), key) if cache else None
    if cached and unchanged(root, cached):
        return pd.DataFrame(cached["files"])
    started, folders = time.time_ns(), {}
    listing = scan_tree(root, folders, stat=False)
    fingerprint = listing_fingerprint(listing, mtimes=False)
    if cached and cached["fingerprint"] == fingerprint:
        files = pd.DataFrame(cached["files"])
    else:
        files = index_listing(listing, entity_rules(configs))
    if cache is not None:
        jsoncache.write(cache, {"key": key, "fingerprint": fingerprint, "scanned_at": started, "folders": folders,
                                "files": files.to_dict(orient="list")})
    return files


def cached_index(cached, key: list) -> dict | None:
    """``cached`` (a JSON value) when it is the index cache of ``key`` with fields of the right
    types, else None: a cache of another version, root or shape is rebuilt."""
    if not (isinstance(cached, dict) and cached.get("key") == key):
        return None
    folders, files = cached.get("folders"), cached.get("files")
    if not (isinstance(cached.get("fingerprint"), str) and isinstance(cached.get("scanned_at"), int)
            and isinstance(folders, dict) and all(isinstance(m, int) for m in folders.values())
            and isinstance(files, dict) and isinstance(files.get("path"), list)):
        return None
    rows = len(files["path"])
    return cached if all(isinstance(c, list) and len(c) == rows for c in files.values()) else None


def unchanged(root: Path, cached: dict) -> bool:
    """True when no folder's listing changed since the cached scan: one stat per folder.

    A folder's mtime changes whenever an entry is added, removed or renamed in it, and the index
    depends on names only (a file rewritten in place is caught by the header checks' own cache).
    Folders modified within ``RACY_NS`` of the scan are not trusted (timestamps are coarse), so
    the next run scans again. (A network file system whose server clock lags this machine's by
    more than that could hide a change made right after a scan: delete the cache folder then.)
    """
    trusted = cached["scanned_at"] - RACY_NS
    base = os.fspath(root) + "/"
    return all(mtime < trusted and file_stamp(base + folder)[1] == mtime for folder, mtime in cached["folders"].items())


@dataclass(frozen=True)
class Condition:
    """A filter on one entity: any of ``values``, absent when ``absent``, or a full ``regex`` match."""

    entity: str
    values: tuple[str, ...] = ()
    absent: bool = False
    regex: str | None = None
    numeric: bool = False  # compare as integers (pybids' int entities: run-1 == run-01)

    def mask(self, files: pd.DataFrame) -> pd.Series:
        """Which rows of an index satisfy the condition."""
        column = files[self.entity] if self.entity in files else pd.Series("", index=files.index)
        keep = pd.Series(False, index=files.index)
        if self.absent:
            keep |= column == ""
        if self.values and self.numeric:
            keep |= pd.to_numeric(column, errors="coerce").isin([int(v) for v in self.values])
        elif self.values:
            keep |= column.isin(self.values)
        if self.regex is not None:
            keep |= (column != "") & column.str.fullmatch(self.regex)
        return keep

    def __str__(self) -> str:
        parts = [repr(v) for v in self.values] + (["absent"] if self.absent else [])
        parts += [f"matching /{self.regex}/"] if self.regex is not None else []
        return " or ".join(parts)


def conditions(filters: dict | None, rules: dict[str, EntityRule], where: str) -> dict[str, Condition]:
    """Config filters (``{entity: value}``) as Conditions; ``where`` names the config key in errors.

    A value is a string (exact), an integer, a list (any of; ``null`` in it allows absence),
    ``null`` (the entity must be absent) or ``{regex: ...}`` (full match). As in pybids,
    extensions get a leading dot and ``run`` compares as an integer.
    """
    out = {}
    for entity, value in (filters or {}).items():
        if entity not in rules:
            hint = next((f" ({entity!r} is the file-name key of {r.name!r})" for r in rules.values() if r.key == entity), "")
            raise InputError(f"Unknown BIDS entity {entity!r} in {where}{hint}. Valid entities: {', '.join(rules)}.")
        out[entity] = condition(entity, value, rules[entity], where)
    return out


def condition(entity: str, value, rule: EntityRule, where: str) -> Condition:
    """One filter value as a Condition (see ``conditions``)."""
    numeric = rule.dtype == "int"
    if isinstance(value, dict):
        if set(value) != {"regex"} or not isinstance(value["regex"], str):
            raise InputError(f"{where}.{entity}: a mapping must be {{regex: PATTERN}}, got {value!r}.")
        try:
            re.compile(value["regex"])
        except re.error as exc:
            raise InputError(f"{where}.{entity}: invalid regex {value['regex']!r} ({exc}).") from None
        return Condition(entity, regex=value["regex"])
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int, type(None))):
            raise InputError(f"{where}.{entity}: {item!r} is not a label; use a string, a list, null or {{regex: ...}}.")
        if isinstance(item, int) and not numeric:
            raise InputError(f"{where}.{entity}: {item} is a number but {entity} labels are compared as text; "
                             f"quote it (e.g. {entity}: \"0{item}\" for {entity}-0{item}).")
        if item is not None:
            texts.append(str(item))
    if numeric and any(not t.isdigit() for t in texts):
        raise InputError(f"{where}.{entity}: {entity} is an integer entity; {texts} are not all integers.")
    if entity == "extension":
        texts = ["." + t.lstrip(".") for t in texts]
    return Condition(entity, tuple(texts), absent=None in items, numeric=numeric)


def select(files: pd.DataFrame, conds: dict[str, Condition]) -> pd.DataFrame:
    """The rows of an index that satisfy every condition."""
    keep = pd.Series(True, index=files.index)
    for cond in conds.values():
        keep &= cond.mask(files)
    return files[keep]


def explain_empty(files: pd.DataFrame, conds: dict[str, Condition], where: str) -> str:
    """Why ``select(files, conds)`` is empty: the first condition that removes every file, and the values that exist."""
    remaining = files
    for cond in conds.values():
        kept = remaining[cond.mask(remaining)]
        if kept.empty:
            before = f"{len(remaining)} NIfTI files pass the filters before it" if len(remaining) < len(files) else \
                f"the dataset has {len(files)} NIfTI files under sub-*/"
            return (f"{where} selects no file: none has {cond.entity} {cond}; {before}, "
                    f"with {cond.entity}: {value_counts(remaining, cond.entity)}.")
        remaining = kept
    return f"{where} selects no file."


def value_counts(files: pd.DataFrame, entity: str, limit: int = 12) -> str:
    """``'T1w' (120 files), absent (3 files), …`` for one entity of an index."""
    column = files[entity] if entity in files else pd.Series("", index=files.index)
    counts = column.value_counts().sort_index().sort_values(ascending=False, kind="stable")  # ties alphabetical
    shown = [f"{'absent' if v == '' else repr(v)} ({n} file{'s' * (n != 1)})" for v, n in counts.head(limit).items()]
    more = f", and {len(counts) - limit} more values" if len(counts) > limit else ""
    return ", ".join(shown) + more
