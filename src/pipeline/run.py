"""``bids-deepstudy run`` (``python -m pipeline.run``): a study, checked before Snakemake plans anything.

The config Snakemake would run with (``config/config.yaml`` of the working folder when present, then
each ``--configfile``, then ``--config`` values: ``pipeline.common.launch.run_config``) is checked
against the schema (every problem as a message, never Snakemake's ``InputError in file
…/common.smk`` with a traceback; the stages' checks across keys, which import torch, follow in the
workflow, as cleanly), then the data pre-flight (``pipeline.intake.preflight``: the BIDS index and
image headers). Its warnings and a short summary
(participants, images, channels → folds; test participants) go to stderr; an error ends the command
before Snakemake starts. Then Snakemake runs the packaged workflow (``pipeline.common.launch``).

``--skip-preflight`` skips the data pre-flight (the config is still checked). Snakemake's
housekeeping options (``--unlock``, ``--lint``, ``--cleanup-metadata``, ``--list-rules`` …) skip both.

Two forms:

    bids-deepstudy run BIDS_DIR OUTPUT_DIR participant|group [--config-file my.yaml] [--participant-label …]
        [--session-label L] [--work-dir DIR] [--cores N] [--device cpu|cuda] [--dry-run] [SNAKEMAKE ARGS]
    bids-deepstudy run [--configfile my.yaml] [SNAKEMAKE ARGS]

The first is a BIDS App (``pipeline.common.bidsapp``): the folders come from the command line, the
settings from ``--config-file`` (default: config/study.yaml), Snakemake runs in the work folder.
The second runs Snakemake in the current folder on the config's own ``bids_dir`` and ``results_dir``.
A dry run prints one line per job and a table (``pipeline.common.launch.plan``); ``-p`` the full plan.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from pipeline.common import bidsapp, configcheck, launch
from pipeline.common.errors import InputError
from pipeline.intake import preflight as data_preflight

SKIP_PREFLIGHT = "--skip-preflight"
HOUSEKEEPING = ("-h", "--help", "--version", "-v", "--unlock", "--lint", "--cleanup-metadata", "--cm",
                "--list-rules", "--list", "-l", "--list-target-rules", "--lt", "--cleanup-shadow")


def preflight(args: list[str], data: bool = True, split: bool = True) -> None:
    """Check the config of ``args`` and (``data``) the dataset (``split``: and the split's design);
    SystemExit(2) with the messages on an error."""
    with InputError.exit_cleanly():
        config, files, folder = launch.run_config(args)
        configcheck.check(config)
    if not data:
        return
    findings = data_preflight.for_config(config, folder, split)
    for line in findings.lines():
        print(line, file=sys.stderr)
    if findings.errors:
        print(f"{len(findings.errors)} error(s) in the data of {', '.join(map(str, files))} (above): nothing was "
              f"run. Fix them (`bids-deepstudy check CONFIG` checks again), or pass {SKIP_PREFLIGHT}.",
              file=sys.stderr)
        raise SystemExit(2)


def bidsapp_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bids-deepstudy run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A study on BIDS_DIR, as a BIDS App; any further option goes to Snakemake.",
        epilog=bidsapp.__doc__)
    bidsapp.add_arguments(parser)
    parser.add_argument("--config-file", "--configfile", dest="config_files", type=Path, nargs="+", action="extend",
                        default=[], metavar="YAML",
                        help="the study's settings (bids-deepstudy init writes one; default: config/study.yaml); "
                             "several are merged in order; BIDS_DIR, OUTPUT_DIR and the options above win")
    parser.add_argument(SKIP_PREFLIGHT, action="store_true", help="no data pre-flight (the config is still checked)")
    return parser


def bidsapp_main(argv: list[str]) -> None:
    """``bids-deepstudy run BIDS_DIR OUTPUT_DIR LEVEL …``: the study's Snakemake call, then the
    same pre-flight and launch as the Snakemake form, in the work folder."""
    from snakemake.utils import update_config

    from pipeline.common.config import read_file
    from pipeline.common.locations import STUDY_CONFIG

    args, extra = bidsapp_parser().parse_known_args(argv)
    with InputError.exit_cleanly():
        files = [f.resolve() for f in args.config_files]
        if not files:
            print(f"no --config-file: the settings of {STUDY_CONFIG} (`bids-deepstudy init BIDS_DIR --out my.yaml` "
                  "writes a study config for your dataset)", file=sys.stderr)
            files = [STUDY_CONFIG]
        merged: dict = {}  # the files as Snakemake merges them (no config/config.yaml: it runs in the work folder)
        for path in files:
            update_config(merged, read_file(path, f"--config-file {path}"))
        work = bidsapp.work_folder(args.work_dir, args.output_dir)
        values = {**bidsapp.absolute_paths(merged, Path.cwd()), **bidsapp.study_values(args, work)}
        update_config(merged, values)
        targets = ["participant"] if args.analysis_level == "participant" else []
    with tempfile.TemporaryDirectory(prefix="bids-deepstudy-dry-run-") as scratch:
        # A dry run writes nothing: Snakemake's state goes to a scratch folder unless the study has one.
        directory = Path(scratch) if args.dry_run and not work.exists() else work
        with InputError.exit_cleanly():
            options = bidsapp.snakemake_options(args, merged, directory, files, values, targets)
        preflight(options, data=not args.skip_preflight, split=args.analysis_level == "group")
        if not args.dry_run:
            bidsapp.claim(work, args.output_dir)
        readable = args.dry_run and not args.print_commands and not {a.split("=", 1)[0] for a in extra} & set(launch.FULL)
        sys.exit(launch.snakemake([*options, *extra], readable=readable))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if bidsapp.is_bidsapp(args):
        bidsapp_main(args)
        return
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        bidsapp_parser().print_help()
    if not any(a in HOUSEKEEPING or a.split("=", 1)[0] in HOUSEKEEPING for a in args):
        preflight([a for a in args if a != SKIP_PREFLIGHT], data=SKIP_PREFLIGHT not in args)
    launch.main([a for a in args if a != SKIP_PREFLIGHT])


if __name__ == "__main__":
    main()
