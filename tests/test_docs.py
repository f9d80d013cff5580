"""Docs that tell the truth (issue #28, Build 7): every command in the shell blocks of README.md,
config/README.md, data/README.md and docs/*.md, and in the comments of config/*.yaml, is checked.

- Statically, all of them (about 0.5 s): a `bids-deepstudy` command names one of its commands
  and only options that command's `--help` lists (`run`: its own and Snakemake's); `python -m
  pipeline.X` names a module with a `main` and only its options; `snakemake` only Snakemake's
  options, and an existing profile folder; `make` a target of the Makefile; a script of
  `benchmarks/` or `tests/` exists and its options are in its source; every repository file a
  command names exists. Installers and other tools (pip, docker, apptainer, mlflow) are not run.
- By running them, the commands a newcomer types on a dataset (`init`, `check`, `run` with
  `--dry-run`/`-n`, as each block gives them, in order, in a fresh folder holding a 10-participant
  dataset at `data/demo`, with `/data/bids`, `BIDS_DIR` and the like pointing at it): each must
  exit 0. Commands that would train or download are never run; `demo` is not run (the dataset is
  there). About 10 s per Snakemake plan: the slow test.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_bids

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "config" / "README.md", REPO / "data" / "README.md",
             *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"```(?:bash|sh|shell)\n(.*?)```", re.S)
PROGRAMS = ("bids-deepstudy", "python", "snakemake", "make", ".venv/bin/python", ".venv/bin/snakemake")


def strip_comment(line: str) -> str:
    """A shell line without its trailing `# comment` (a `#` outside quotes, after a space)."""
    quote = None
    for i, char in enumerate(line):
        if char in "'\"" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (i == 0 or line[i - 1] == " "):
            return line[:i].rstrip()
    return line.rstrip()


def blocks() -> list[tuple[str, list[tuple[int, str]]]]:
    """Every shell block as (where, [(line number, command)]): continuation lines joined, comments
    left out; config/*.yaml's commented commands (``#   bids-deepstudy …``) as one block per file."""
    found = []
    for path in DOCUMENTS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            start = text[: match.start()].count("\n") + 2
            commands, pending, first = [], "", None
            for offset, line in enumerate(match.group(1).splitlines()):
                line = strip_comment(line)
                if line.endswith("\\"):
                    pending, first = pending + line[:-1] + " ", first or start + offset
                    continue
                command, pending = (pending + line).strip(), ""
                if command:
                    commands.append((first or start + offset, command))
                first = None
            found.append((f"{path.relative_to(REPO)}:{start}", commands))
    for path in sorted((REPO / "config").glob("*.yaml")):
        commands = [(n, re.sub(r"\s{2,}\(.*$", "", m.group(1)).strip())
                    for n, line in enumerate(path.read_text().splitlines(), 1)
                    if (m := re.match(r"#\s+((?:bids-deepstudy|python -m pipeline|snakemake)\b.*)$", line))]
        if commands:
            found.append((f"{path.relative_to(REPO)}", commands))
    return found


def split(command: str) -> list[list[str]]:
    """The simple commands of a shell line (``a && b``), each as words; environment assignments and
    `nice -n N`/`env` prefixes left out."""
    out = []
    for part in re.split(r"\s*(?:&&|;)\s*", command):
        try:
            words = shlex.split(part)
        except ValueError:  # a quote that spans a `;` (e.g. python -c "a; b"): a tool not checked here
            words = part.split()
        while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] in ("env", "nice")):
            words = words[3:] if words[:2] == ["nice", "-n"] else words[1:]
        if words:
            out.append(words)
    return out


def help_text(module: str, argv: list[str]) -> str:
    """What ``module.main(argv + ['--help'])`` prints."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
        importlib.import_module(module).main([*argv, "--help"])
    return buffer.getvalue()


def snakemake_options() -> set[str]:
    from snakemake.cli import get_argument_parser

    return {o for action in get_argument_parser()._actions for o in action.option_strings}


VALUE_OPTIONS = ("--apptainer-args", "--singularity-args")  # their value may start with --


def options(words: list[str]) -> list[str]:
    """The long options among ``words`` (not a value of an option above; nothing after
    ``--snakemake-args``, whose words are Snakemake's)."""
    if "--snakemake-args" in words:
        words = words[: words.index("--snakemake-args") + 1]
    return [w.split("=", 1)[0] for i, w in enumerate(words)
            if w.startswith("--") and not (i and words[i - 1] in VALUE_OPTIONS)]


def repository_paths(words: list[str]) -> list[str]:
    """Words that name a file of the repository (config/, workflow/, tests/, benchmarks/, …)."""
    roots = ("config/", "workflow/", "tests/", "benchmarks/", "docs/", "src/")
    files = ("requirements.lock", "Apptainer.def", "Dockerfile", "environment.yml")
    return [w for w in words if w.startswith(roots) or w in files]


def problems_of(words: list[str], cache: dict) -> list[str]:
    """What is wrong with one simple command (empty: nothing, or a tool not checked here)."""
    from pipeline.__main__ import COMMANDS

    found = [f"{p} does not exist" for p in repository_paths(words) if not (REPO / p).exists()]
    program, args = words[0], words[1:]
    if program.endswith("python") and args[:1] == ["-m"] and args[1].startswith("pipeline"):
        module, args = args[1], args[2:]
        if module == "pipeline":
            program, args = "bids-deepstudy", args
        else:
            try:
                loaded = importlib.import_module(module if module != "pipeline.demo" else "pipeline.demo.__main__")
            except ImportError as exc:
                return [*found, f"no module {module} ({exc})"]
            if not hasattr(loaded, "main"):
                return [*found, f"{module} has no main()"]
            sub = args[:1] if module.endswith(("registry", "zoo")) and args and not args[0].startswith("-") else []
            key = (loaded.__name__, *sub)
            text = cache.setdefault(key, help_text(loaded.__name__, sub))
            return [*found, *(f"{module} has no option {o}" for o in options(args) if o not in text)]
    if program == "bids-deepstudy":
        if not args or args[0].startswith("-"):
            return found
        if args[0] not in COMMANDS:
            return [*found, f"bids-deepstudy has no command {args[0]!r}"]
        module, before = COMMANDS[args[0]]
        sub = before or (args[1:2] if args[0] == "models" else [])
        text = cache.setdefault((module, *sub), help_text(module, list(sub)))
        if args[0] == "run":
            text += " ".join(cache.setdefault("snakemake", snakemake_options()))
        return [*found, *(f"bids-deepstudy {args[0]} has no option {o}" for o in options(args[1:]) if o not in text)]
    if program.endswith("snakemake"):
        known = cache.setdefault("snakemake", snakemake_options())
        found += [f"snakemake has no option {o}" for o in options(args) if o not in known]
        if "--profile" in args:
            profile = args[args.index("--profile") + 1]
            found += [] if (REPO / profile).is_dir() else [f"profile {profile} does not exist"]
        return found
    if program == "make":
        targets = set(re.findall(r"^([a-z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
        return [*found, *(f"make has no target {t}" for t in args if t not in targets)]
    if program.endswith("python") and args[:1] and args[0].startswith(("benchmarks/", "tests/")):
        script = REPO / args[0]
        if not script.is_file():
            return found
        source = script.read_text()
        return [*found, *(f"{args[0]} has no option {o}" for o in options(args[1:]) if f'"{o}"' not in source)]
    return found


def test_every_documented_command_names_real_commands_options_and_files():
    cache: dict = {}
    wrong, checked = [], 0
    for where, commands in blocks():
        for line, command in commands:
            for words in split(command):
                if words[0] not in PROGRAMS and not words[0].endswith(("python", "snakemake")):
                    continue
                checked += 1
                wrong += [f"{where.split(':')[0]}:{line}: {command}\n    {p}" for p in problems_of(words, cache)]
    assert checked > 60, checked  # README, config/README, docs/benchmarks, config/study.yaml
    assert not wrong, "\n".join(wrong)


# --- running them ----------------------------------------------------------------------------

RUN = re.compile(r"^bids-deepstudy (init|check|run)\b|^python -m pipeline(\.check)? ")
PLACES = {"/data/bids": "data/demo", "/data/out": "out", "BIDS_DIR": "data/demo", "OUTPUT_DIR": "out"}


def runnable(command: str) -> bool:
    """A newcomer's command that plans or checks without training: init, check, a dry run."""
    if not RUN.match(command) or " apply " in command:
        return False
    words = shlex.split(command)
    return words[1] in ("init", "check") or bool({"-n", "--dry-run"} & set(words))


def run_blocks() -> list[tuple[str, list[tuple[int, str]]]]:
    return [(where, [(n, c) for n, c in commands if runnable(c)]) for where, commands in blocks()
            if any(runnable(c) for _, c in commands)]


@pytest.mark.slow
@pytest.mark.parametrize("where,commands", run_blocks(), ids=[w for w, _ in run_blocks()])
def test_each_blocks_commands_run_as_written(where, commands, tmp_path):
    people = [{"participant_id": f"sub-{i:03d}", "age": str(20 + 4 * i), "sex": "MF"[i % 2]} for i in range(1, 11)]
    write_bids(tmp_path / "data" / "demo", people, {p["participant_id"]: [""] for p in people}, shape=(6, 6, 6))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    for line, command in commands:
        words = shlex.split(command)
        words = [PLACES.get(w, w) for w in words]
        if words[0] == "bids-deepstudy":
            words = [sys.executable, "-m", "pipeline", *words[1:]]
        else:
            words = [sys.executable, *words[1:]]
        if not (tmp_path / "my.yaml").exists() and "my.yaml" in words and "init" not in words:
            subprocess.run([sys.executable, "-m", "pipeline", "init", "data/demo", "--out", "my.yaml"], cwd=tmp_path,
                           env=env, check=True, capture_output=True)  # a block that starts from a config
        done = subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{where.split(':')[0]}:{line}: {command}\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr
