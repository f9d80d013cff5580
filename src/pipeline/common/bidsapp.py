"""The BIDS-App command line of ``run`` and ``apply`` (the BIDS-Apps specification and fMRIPrep's
conventions), turned into the workflow's config values and Snakemake options.

    bids-deepstudy run BIDS_DIR OUTPUT_DIR participant|group [--config-file my.yaml]
        [--participant-label 01 02] [--session-label 1] [--work-dir DIR] [--cores N]
        [--device auto|cpu|cuda] [--gpu-jobs K] [--dry-run] [--print-commands]

Folders: BIDS_DIR is only read; OUTPUT_DIR (config ``results_dir``) receives what a person reads
or shares (the preprocessed images as a BIDS derivative dataset, tables, evaluation, maps, the
report and the package); the work folder (``--work-dir``, default ``work`` in the current folder
as fMRIPrep's ``-w``; config ``work_dir``) holds what only the workflow reads again: Snakemake's
state (``.snakemake/``: Snakemake runs there), the folds' networks with their checkpoints and
TensorBoard logs (``train/``), the study grid, ingest's cache, preprocessing's folder with the arrays
(``derivatives/pipeline``; its images are published to OUTPUT_DIR's) and fetched or unpacked
packages (``apply``: every stage's files and its ``config.yaml``; OUTPUT_DIR is one BIDS derivative
dataset and the report). Snakemake gets the user's config files as they are, and the
command line's values as ``--config``. One work folder
serves one output folder: it records which (``bids-deepstudy.json``) and refuses another.

A dry run (``--dry-run``/``-n``) writes nothing: Snakemake plans in a temporary folder when the
work folder does not exist yet (in the work folder, with its state, when it does).

Levels: ``participant`` ingests, preprocesses and quality-controls every selected image (the
``participant`` rule); ``group`` is the whole study (split, training, evaluation, explanation,
report, package), running the participant level first where it has not run. ``apply`` has the
participant level only.

GPUs on one workstation: ``--device cuda`` sets config ``device: cuda`` and ``gpu: true`` (each
training, evaluation, explanation and prediction job then needs the Snakemake resource ``gpu``)
and gives Snakemake ``--resources gpu=K``: K such jobs at once (``--gpu-jobs``, default 1: they
queue, one at a time, on the first GPU the process sees; with ``train.gpus: N`` a training job
takes N and K is raised to N).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.common import atomic
from pipeline.common.errors import InputError

LEVELS = ("participant", "group")
CLAIM = "bids-deepstudy.json"  # in the work folder: the output folder it serves
DEVICES = ("auto", "cpu", "cuda")


def is_bidsapp(args: list[str]) -> bool:
    """Whether ``args`` take the BIDS-App form ``BIDS_DIR OUTPUT_DIR LEVEL …`` (not the Snakemake form)."""
    return len(args) >= 3 and not any(a.startswith("-") for a in args[:3]) and args[2] in LEVELS


def cores(text: str) -> str:
    """``--cores``: a positive number or ``all``."""
    if text == "all" or (text.isdigit() and int(text) > 0):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give a positive number of cores, or all")


def add_arguments(parser: argparse.ArgumentParser, levels: tuple[str, ...] = LEVELS) -> None:
    """The positional arguments and options ``run`` and ``apply`` share, with the same defaults."""
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (only read)")
    parser.add_argument("output_dir", type=Path,
                        help="where the derivatives, tables, report and package go (config results_dir)")
    parser.add_argument("analysis_level", choices=levels,
                        help="participant: ingest, preprocess and quality-control every selected image"
                             + ("; group: the whole study (split, train, evaluate, explain, report, package)"
                                if "group" in levels else ""))
    parser.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL",
                        help="only these participants (with or without sub-; config participants.include)")
    parser.add_argument("--session-label", metavar="LABEL",
                        help="one session per participant: a label (with or without ses-), first or last "
                             "(config sessions; default: the config's, all)")
    parser.add_argument("-w", "--work-dir", type=Path, default=Path("work"),
                        help="Snakemake's state, the networks and checkpoints, caches (config work_dir; "
                             "default: ./work). One work folder per output folder")
    parser.add_argument("--cores", type=cores, default="all", help="CPU cores for the jobs (default: all)")
    parser.add_argument("--device", choices=DEVICES,
                        help="where networks compute (config device; default: the config's, auto); cuda also "
                             "asks the jobs for the gpu resource and limits them with --gpu-jobs")
    parser.add_argument("--gpu-jobs", type=int, default=1, metavar="K",
                        help="with --device cuda: GPU jobs at once (Snakemake --resources gpu=K; default 1: "
                             "they queue on the GPU)")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="plan only: one line per job and a table; writes nothing")
    parser.add_argument("-p", "--print-commands", action="store_true",
                        help="with --dry-run: Snakemake's full plan, every job's command line included")
    parser.add_argument("--skip-bids-validation", action="store_true",
                        help="do not run BIDS_DIR through bids-validator-deno (config bids_validation: false)")


def config_value(key: str, value) -> str:
    """A ``--config`` entry Snakemake parses back to ``value``: ``True``/``False`` for a boolean, else
    JSON (YAML that Snakemake reads with every scalar a string, so a path stays one string)."""
    return f"{key}={value}" if isinstance(value, bool) else f"{key}={json.dumps(value)}"


def study_values(args: argparse.Namespace, work: Path) -> dict:
    """The config values the BIDS-App arguments set."""
    values = {"bids_dir": str(args.bids_dir.resolve()), "results_dir": str(args.output_dir.resolve()),
              "work_dir": str(work)}
    if args.participant_label:
        values["participants"] = {"include": list(args.participant_label)}
    if args.session_label:
        values["sessions"] = args.session_label
    if args.device:
        values["device"] = args.device
    if args.device == "cuda":
        values["gpu"] = True
    if args.skip_bids_validation:
        values["bids_validation"] = False
    return values


def gpu_slots(args: argparse.Namespace, config: dict) -> list[str]:
    """``--resources gpu=K`` when jobs ask for GPUs (``--device cuda``, or config ``gpu: true``)."""
    if args.gpu_jobs < 1:
        raise InputError(f"--gpu-jobs {args.gpu_jobs}: give at least 1.")
    if not (args.device == "cuda" or config.get("gpu")):
        return []
    per_job = int((config.get("train") or {}).get("gpus", 1) or 1)
    return ["--resources", f"gpu={max(args.gpu_jobs, per_job)}"]


def absolute_paths(config: dict, folder: Path) -> dict:
    """The config values that name files relative to the folder the command runs in (Snakemake runs
    in the work folder instead), made absolute: ``registry`` (a folder), ``explain.atlas``'s
    ``image`` and ``labels``, ``container_image`` (a local ``.sif``), ``apply.package``."""
    out: dict = {}

    def local(value):
        return isinstance(value, str) and "://" not in value and not Path(value).is_absolute() \
            and (folder / value).exists()

    if local(config.get("registry")):
        out["registry"] = str((folder / config["registry"]).resolve())
    if local(config.get("container_image")):
        out["container_image"] = str((folder / config["container_image"]).resolve())
    atlas = (config.get("explain") or {}).get("atlas") or {}
    moved = {k: str((folder / atlas[k]).resolve()) for k in ("image", "labels") if local(atlas.get(k))}
    if moved:
        out["explain"] = {"atlas": moved}
    package = (config.get("apply") or {}).get("package")
    if local(package):
        out["apply"] = {"package": str((folder / package).resolve())}
    return out


def work_folder(work_dir: Path, output_dir: Path) -> Path:
    """The absolute work folder; InputError when it records another output folder, or is the output
    folder itself or inside the input."""
    work, output = work_dir.resolve(), output_dir.resolve()
    if work == output:
        raise InputError(f"--work-dir {work_dir} is OUTPUT_DIR itself; give a folder of its own (default: ./work).")
    claim = work / CLAIM
    if claim.is_file():
        try:
            served = json.loads(claim.read_text())["output_dir"]
        except (OSError, ValueError, KeyError):
            served = None
        if served is not None and Path(served) != output:
            raise InputError(f"Work folder {work} holds the state of the study in {served}, not of {output}. Give "
                             "this study a work folder of its own: --work-dir DIR.")
    return work


def claim(work: Path, output_dir: Path) -> None:
    """Record in the work folder which output folder it serves (created as needed)."""
    work.mkdir(parents=True, exist_ok=True)
    atomic.write_text(work / CLAIM, json.dumps({"output_dir": str(output_dir.resolve())}, indent=1) + "\n")


def snakemake_options(args: argparse.Namespace, config: dict, directory: Path, config_files: list[Path],
                      values: dict, targets: list[str]) -> list[str]:
    """The Snakemake command line (without ``-s``) of a BIDS-App call."""
    options = ["--directory", str(directory)]
    if config_files:
        options += ["--configfile", *(str(f) for f in config_files)]
    options += ["--config", *(config_value(k, v) for k, v in values.items())]
    options += ["--cores", args.cores, *gpu_slots(args, config)]
    if args.dry_run:
        options.append("-n")
    return [*options, *targets]
