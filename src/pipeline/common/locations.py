"""Where the package's code and its workflow are: the one place that knows the layout.

The workflow (``workflow/``: Snakefile, rules, schema, profiles, envs) sits beside ``src/`` in a
checkout of the repository; an installed wheel carries it as the package data ``pipeline/workflow/``
(pyproject.toml). ``PIPELINE_WORKFLOW`` names another copy of it.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]  # src/pipeline, or site-packages/pipeline when installed
REPOSITORY = PACKAGE.parents[1]  # a checkout's root (meaningless for an installed wheel)
DISTRIBUTION = "bids-deepstudy"  # the name on the package index; the import package is `pipeline`
# Running from a git checkout's src/ (editable install or PYTHONPATH), not from an installed wheel
# (whose site-packages may well lie inside some other repository).
CHECKOUT = PACKAGE == REPOSITORY / "src" / "pipeline" and (REPOSITORY / ".git").exists()


def workflow_folder() -> Path:
    """$PIPELINE_WORKFLOW, else the installed wheel's ``pipeline/workflow``, else the checkout's ``workflow/``."""
    if os.environ.get("PIPELINE_WORKFLOW"):
        return Path(os.environ["PIPELINE_WORKFLOW"])
    installed = PACKAGE / "workflow"
    return installed if (installed / "Snakefile").is_file() else REPOSITORY / "workflow"


WORKFLOW = workflow_folder()
SNAKEFILE = WORKFLOW / "Snakefile"
SCHEMA = WORKFLOW / "schemas" / "config.schema.yaml"
PROFILES = WORKFLOW / "profiles"
# The example configs (config/*.yaml of a checkout; pipeline/config/ inside the wheel): study.yaml, the
# settings for real scans that `bids-deepstudy init` fills in and the BIDS-App `run` defaults to.
CONFIGS = PACKAGE / "config" if (PACKAGE / "config" / "study.yaml").is_file() else REPOSITORY / "config"
STUDY_CONFIG = CONFIGS / "study.yaml"
# What a Snakemake start or a config check would otherwise recompute each time, kept per user across
# studies (plain JSON, keyed by content: pipeline.common.codegraph, pipeline.results.explainconfig):
# $XDG_CACHE_HOME/bids-deepstudy, default ~/.cache/bids-deepstudy. Deleting it only costs time.
USER_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bids-deepstudy"


def code_files() -> list[Path]:
    """Every module of the package, in a fixed order."""
    return sorted(PACKAGE.rglob("*.py"), key=lambda p: p.relative_to(PACKAGE).as_posix())
