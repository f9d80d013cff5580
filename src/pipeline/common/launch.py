"""Run the packaged workflow with Snakemake, on this interpreter.

``snakemake(args)`` runs ``<this python> -m snakemake -s <packaged Snakefile> ARGS`` with this
interpreter's bin folder first on ``PATH``: the Snakemake process and (without
``--use-conda``/``--use-apptainer``) every job's ``python`` are the interpreter this package is
installed in, whether or not its environment was activated. Profiles named ``default`` or ``slurm``
are the packaged ones (``workflow/profiles/``); any other ``--profile`` value is passed as given.
``--skip-bids-validation`` becomes ``--config bids_validation=False`` (no BIDS validation of the input).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.common.locations import PROFILES, SNAKEFILE

CORES = ("--cores", "-c", "--jobs", "-j", "--profile")  # without one of these, `--cores all`
SKIP_VALIDATION = "--skip-bids-validation"


def skip_validation(args: list[str]) -> list[str]:
    """``args`` with ``--skip-bids-validation`` turned into the config value ``bids_validation=False``:
    added to the user's ``--config``/``-C`` values when there are some (a second ``--config`` would
    replace them), else as a ``--config`` of its own."""
    if SKIP_VALIDATION not in args:
        return list(args)
    out = [a for a in args if a != SKIP_VALIDATION]
    at = next((i for i, a in enumerate(out) if a in ("--config", "-C")), None)
    if at is None:
        return [*out, "--config", "bids_validation=False"]
    return [*out[: at + 1], "bids_validation=False", *out[at + 1:]]


def environment() -> dict[str, str]:
    """This process's environment with this interpreter's bin folder first on PATH."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def packaged_profile(value: str) -> str:
    """The folder of the packaged profile ``value`` (``default``, ``slurm``), else ``value`` as given."""
    folder = PROFILES / value
    return str(folder) if "/" not in value and not Path(value).exists() and folder.is_dir() else value


def profile_paths(args: list[str]) -> list[str]:
    """``args`` with the value of ``--profile`` passed through ``packaged_profile``."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--profile" and i + 1 < len(out):
            out[i + 1] = packaged_profile(out[i + 1])
        elif arg.startswith("--profile="):
            out[i] = f"--profile={packaged_profile(arg.split('=', 1)[1])}"
    return out


def command(args: list[str]) -> list[str]:
    """The Snakemake command line of ``args`` (``--cores all`` unless cores, jobs or a profile are given)."""
    args = profile_paths(skip_validation(args))
    given = any(a in CORES or a.split("=", 1)[0] in CORES for a in args)
    return [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), *([] if given else ["--cores", "all"]), *args]


def snakemake(args: list[str]) -> int:
    """Run Snakemake on the packaged Snakefile with ``args``; return its exit status."""
    return subprocess.run(command(args), env=environment()).returncode


def main(argv: list[str] | None = None) -> None:
    """``bids-deepstudy run [SNAKEMAKE ARGS]``; exits with Snakemake's status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print(f"usage: bids-deepstudy run [--skip-bids-validation] [SNAKEMAKE ARGS]\n\n{__doc__}\nSnakefile: {SNAKEFILE}\n"
              "Snakemake's own options: snakemake --help")
        return
    sys.exit(snakemake(args))
