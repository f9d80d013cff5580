"""Cheap fingerprints of a BIDS dataset's file tree (standard library only: the Snakefile imports it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SKIPPED_FOLDERS = {"derivatives", "sourcedata", "code"}
MISSING = -1  # size and mtime of a broken symlink (e.g. git-annex content that was never fetched)


def scan_tree(root: Path, folders: dict[str, int] | None = None, stat: bool = True) -> list[tuple[str, int, int]]:
    """Every file under ``root`` as ``(relative posix path, size in bytes, mtime in ns)``, sorted by path.

    Derivatives, sourcedata, code and dot-folders are left out at any depth; symlinks are followed
    (as pybids does) and a broken one is listed with size and mtime ``MISSING``. Without ``stat``
    files are not stat'ed (size and mtime 0: a listing of names). When ``folders`` is given it
    receives each scanned folder's mtime (``"sub-01/anat/"``: ns, ``""`` for ``root``), read
    before the folder is listed.
    """
    files: list[tuple[str, int, int]] = []
    if folders is not None:
        folders[""] = os.stat(root).st_mtime_ns
    _scan(os.fspath(root), "", files, folders, stat)
    files.sort()
    return files


def _scan(folder: str, prefix: str, files: list, folders: dict | None, stat: bool) -> None:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                if not entry.name.startswith(".") and entry.name not in SKIPPED_FOLDERS:
                    name = f"{prefix}{entry.name}/"
                    if folders is not None:
                        folders[name] = entry.stat().st_mtime_ns
                    _scan(entry.path, name, files, folders, stat)
            elif not stat:
                files.append((prefix + entry.name, 0, 0))
            else:
                try:
                    info = entry.stat()
                    files.append((prefix + entry.name, info.st_size, info.st_mtime_ns))
                except FileNotFoundError:
                    files.append((prefix + entry.name, MISSING, MISSING))


def file_stamp(path: str) -> tuple[int, int]:
    """(size, mtime in ns) of a file, ``(MISSING, MISSING)`` when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return MISSING, MISSING
    return stat.st_size, stat.st_mtime_ns


def listing_fingerprint(files: list[tuple[str, int, int]], mtimes: bool = True) -> str:
    """SHA-1 of a ``scan_tree`` listing: paths and sizes, and mtimes when ``mtimes``."""
    if mtimes:
        lines = [f"{path}\0{size}\0{mtime}" for path, size, mtime in files]
    else:
        lines = [f"{path}\0{size}" for path, size, _ in files]
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()


def tree_fingerprint(bids_dir: Path, mtimes: bool = True) -> str:
    """SHA-1 of every file's relative path and size (and mtime when ``mtimes``), see ``scan_tree``.

    Without mtimes the fingerprint changes only when a file is added, removed, renamed or resized:
    touching files keeps it.
    """
    return listing_fingerprint(scan_tree(Path(bids_dir)), mtimes)
