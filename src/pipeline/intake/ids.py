"""Entity labels with and without their prefix: ``01`` → ``sub-01``, ``ses-01`` → ``01``."""

from __future__ import annotations


def with_sub_prefix(label: str) -> str:
    """``01`` or ``sub-01`` → ``sub-01``."""
    label = str(label).strip()
    return label if label.startswith("sub-") else f"sub-{label}"


def strip_prefix(label: str, prefix: str) -> str:
    """``ses-01`` or ``01`` → ``01`` (for ``prefix`` ``ses``)."""
    label = str(label).strip()
    return label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label
