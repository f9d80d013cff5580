"""Run the packaged workflow with Snakemake, on this interpreter.

``snakemake(args)`` runs ``<this python> -m snakemake -s <packaged Snakefile> ARGS`` with this
interpreter's bin folder first on ``PATH``: the Snakemake process and (without
``--use-conda``/``--use-apptainer``) every job's ``python`` are the interpreter this package is
installed in, whether or not its environment was activated. Profiles named ``default`` or ``slurm``
are the packaged ones (``workflow/profiles/``); any other ``--profile`` value is passed as given.
``--skip-bids-validation`` becomes ``--config bids_validation=False`` (no BIDS validation of the input).
A dry run (``-n``) prints one line per job and the table of jobs per rule (``plan``); ``-p`` (or
``--print-commands``) prints Snakemake's full plan with every job's command line instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.common.errors import InputError
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


def option_values(args: list[str], names: tuple[str, ...]) -> list[str]:
    """The values given to the options ``names`` (``--configfile a.yaml b.yaml``, ``--configfile=a.yaml``):
    every argument after one of them up to the next option."""
    values, taking = [], False
    for arg in args:
        name, equals, value = arg.partition("=")
        if arg.startswith("-"):
            taking = arg in names
            if equals and name in names:
                values.append(value)
        elif taking:
            values.append(arg)
    return values


def run_config(args: list[str]) -> tuple[dict, list[Path], Path]:
    """The config Snakemake will run with ``args``, as Snakemake builds it: the Snakefile's
    ``config/config.yaml`` (when it exists in the working folder), then each ``--configfile`` in
    order, then the ``--config`` values. Returns (config, the files read, the working folder:
    ``--directory`` or the current one). InputError when there is no config file at all, when a
    file is missing or is not YAML, and for a ``--config`` value that is not KEY=VALUE."""
    from snakemake.cli import parse_config
    from snakemake.utils import update_config

    from pipeline.common.config import read_file

    folder = Path((option_values(args, ("--directory", "-d")) or ["."])[-1])
    given = [Path(p) for p in option_values(args, ("--configfile", "--configfiles"))]
    default = folder / "config" / "config.yaml"
    files = ([default] if default.is_file() else []) + given
    if not files:
        raise InputError("No config: `bids-deepstudy run` needs a study config, e.g. `bids-deepstudy run "
                         "--configfile my.yaml` (start from config/study.yaml for your own data, or "
                         "config/config.yaml for the demo), or a config/config.yaml in the folder you run it from.")
    config: dict = {}
    for path in files:
        update_config(config, read_file(path, f"--configfile {path}"))
    try:
        update_config(config, parse_config(option_values(args, ("--config", "-C"))))
    except ValueError as exc:
        raise InputError(f"--config: {exc} (e.g. --config bids_dir=/data/bids).") from None
    return config, files, folder


JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\S+):$")
TARGETS = ("all", "participant")  # rules that only gather others' outputs: no job of their own


def plan(text: str) -> list[str]:
    """A dry run's output for people: one line per job (rule and wildcards, ordered as Snakemake's
    table of jobs per rule), that table, and what the plan leaves out (jobs the checkpoint adds)."""
    jobs: list[list[str]] = []
    lines = text.splitlines()
    for line in lines:
        found = JOB.match(line)
        if found:
            jobs.append([found.group(1), ""])
        elif jobs and line.startswith("    wildcards: "):
            jobs[-1][1] = line.split(": ", 1)[1]
    jobs = [job for job in jobs if job[0] not in TARGETS]
    table: list[str] = []
    if "Job stats:" in lines:
        start = lines.index("Job stats:")
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].strip()), len(lines))
        table = [line for line in lines[start:end] if line.split()[:1] not in (["all"], ["participant"], ["total"])]
        rule_width, count_width = (len(dashes) for dashes in (table[2].split() + ["", ""])[:2])
        table.append(f"{'total':<{rule_width}s}  {len(jobs):>{count_width}d}")
    order = [line.split()[0] for line in table[3:-1]]
    jobs.sort(key=lambda job: (order.index(job[0]) if job[0] in order else len(order),
                               [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", job[1])]))
    width = max((len(rule) for rule, _ in jobs), default=0)
    out = [f"plan: {len(jobs)} job(s)"] + [f"  {rule:{width}s}  {wildcards}".rstrip() for rule, wildcards in jobs]
    out += [""] + table if table else ["Nothing to be done: every output is up to date."]
    if any("checkpoint jobs" in line for line in lines):
        out.append("More jobs follow once ingest has run (it is a checkpoint): one `preprocess` per selected image.")
    out.append("This was a dry run: nothing ran. Every job's inputs, outputs and command line: add --print-commands (-p).")
    return out


def snakemake(args: list[str], readable: bool = False) -> int:
    """Run Snakemake on the packaged Snakefile with ``args``; return its exit status. ``readable``
    (a dry run): Snakemake's output is kept, and only ``plan``'s summary of it printed (all of it
    when Snakemake fails)."""
    if not readable:
        return subprocess.run(command(args), env=environment()).returncode
    done = subprocess.run(command(args), env=environment(), capture_output=True, text=True)
    output = done.stdout + done.stderr
    if done.returncode:
        sys.stderr.write(output)
    else:
        print("\n".join(plan(output)))
    return done.returncode


DRY = ("-n", "--dry-run", "--dryrun")
FULL = ("-p", "--printshellcmds", "--print-commands", "--verbose", "--debug-dag", "--quiet", "-q")


def readable_dry_run(args: list[str]) -> bool:
    """Whether ``args`` ask for a dry run shown for people (``plan``): a dry run without ``-p``/
    ``--print-commands`` or another option that shapes Snakemake's output."""
    names = {a.split("=", 1)[0] for a in args}
    return bool(names & set(DRY)) and not names & set(FULL)


def main(argv: list[str] | None = None) -> None:
    """``bids-deepstudy run [SNAKEMAKE ARGS]``; exits with Snakemake's status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in ("-h", "--help"):
        print(f"usage: bids-deepstudy run [--skip-preflight] [--skip-bids-validation] [SNAKEMAKE ARGS]\n\n{__doc__}\nSnakefile: {SNAKEFILE}\n"
              "Snakemake's own options: snakemake --help")
        return
    readable = readable_dry_run(args)
    sys.exit(snakemake([a for a in args if a != "--print-commands"], readable=readable))
