"""Cache files as JSON: plain data only, so reading a cache can never run code.

Caches live in output folders that others may write to (in apply mode, the user's output
directory), which rules out formats that can carry code. A cache that is absent, unreadable,
truncated or not JSON reads as None and is rebuilt, never an error; its reader checks the shape of
what it gets. Writes are atomic (``pipeline.common.atomic``). Standard library only.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.common import atomic


def read(path: Path):
    """The JSON value stored at ``path``, or None when it is absent, unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except Exception:  # noqa: BLE001 - any unreadable cache is a stale cache
        return None


def write(path: Path, value) -> None:
    """Store ``value`` (dicts, lists, strings, numbers, None) at ``path`` as JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(value, separators=(",", ":")))
