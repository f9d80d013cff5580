"""A results folder proven writable before work starts (files are written by ``pipeline.common.atomic``)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.common.errors import InputError


def check_writable(folder: Path, key: str = "results_dir", create: bool = True) -> Path:
    """Create ``folder`` (and parents) and write a test file in it; InputError naming the folder
    and the config ``key`` that sets it when that fails. Without ``create`` nothing is created:
    the test file goes to ``folder`` or, when it does not exist yet, its nearest existing parent."""
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        where = next(p for p in (folder, *folder.absolute().parents) if p.exists())
        if not where.is_dir():
            raise NotADirectoryError(20, "a file, not a folder", str(where))
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise InputError(f"Cannot write to {folder} ({exc.strerror or exc}). Make it writable, or set `{key}` "
                         "in config to a folder you can write.") from None
    return folder
