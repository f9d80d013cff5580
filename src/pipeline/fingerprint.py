"""Cheap fingerprints of a BIDS dataset's file tree (standard library only: the Snakefile imports it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SKIPPED_FOLDERS = {"derivatives", "sourcedata", "code"}


def tree_fingerprint(bids_dir: Path, mtimes: bool = True) -> str:
    """SHA-1 of every file's relative path and size (and mtime when ``mtimes``).

    Derivatives, sourcedata, code and dot-folders are left out. Without mtimes the fingerprint
    changes only when a file is added, removed, renamed or resized: touching files keeps it.
    """
    digest = hashlib.sha1()
    for root, dirs, files in os.walk(bids_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        for name in sorted(files):
            path = os.path.join(root, name)
            stat = os.stat(path)
            rel = os.path.relpath(path, bids_dir)
            stamp = f"\0{stat.st_mtime_ns}" if mtimes else ""
            digest.update(f"{rel}\0{stat.st_size}{stamp}\n".encode())
    return digest.hexdigest()
