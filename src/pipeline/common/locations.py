"""Where the package's code and its workflow are: the one place that knows the repository layout.

The workflow (``workflow/``: Snakefile, rules, schema, profiles) sits beside ``src/`` in the
repository; ``PIPELINE_WORKFLOW`` names another copy of it (e.g. an installed package's).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/pipeline
REPOSITORY = PACKAGE.parents[1]
WORKFLOW = Path(os.environ.get("PIPELINE_WORKFLOW", REPOSITORY / "workflow"))
SNAKEFILE = WORKFLOW / "Snakefile"
SCHEMA = WORKFLOW / "schemas" / "config.schema.yaml"


def code_files() -> list[Path]:
    """Every module of the package, in a fixed order."""
    return sorted(PACKAGE.rglob("*.py"), key=lambda p: p.relative_to(PACKAGE).as_posix())
