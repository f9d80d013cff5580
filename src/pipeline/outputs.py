"""Writing outputs safely: a folder proven writable before work starts, files replaced whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from pipeline.errors import InputError


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


@contextlib.contextmanager
def replacing(path: Path):
    """Yield a temporary path beside ``path``: renamed onto ``path`` when the block succeeds,
    removed when it raises, so ``path`` is never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it a new file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
