"""``bids-deepstudy check`` (``python -m pipeline.check``): every config problem before any job
runs: the schema's (``pipeline.common.configcheck``) and the checks across keys of the stages
(``pipeline.results.explainconfig``; ``useratlas``: the files of ``explain.atlas`` on the study grid;
``pipeline.learning.launch``: ``device`` and ``train.gpus``; ``pipeline.intake.brainmask``: brain
extraction and ``brain_mask``; ``pipeline.learning.finetuneconfig``: ``train.freeze`` and
``train.backbone_lr_factor`` need ``train.init_from``). Then, unless ``--config-only``, the data
pre-flight (``pipeline.intake.preflight``): the dataset's index and headers read as ingestion reads
them, its errors and warnings, and a summary of what a run would select and how it would split it.
Exit status 2 when there is an error."""

import argparse
import sys
from pathlib import Path

from pipeline.common import configcheck
from pipeline.common.config import read_file
from pipeline.common.errors import InputError
from pipeline.common.locations import SCHEMA
from pipeline.intake import brainmask
from pipeline.learning import finetuneconfig, launch
from pipeline.results import explainconfig, useratlas

CROSS = (explainconfig.problems, useratlas.problems, launch.problems, brainmask.problems, finetuneconfig.problems)


def check(config: dict, schema_path: Path = SCHEMA) -> None:
    """InputError listing every problem of ``config`` (none: returns quietly)."""
    configcheck.check(config, schema_path, CROSS)


def data(config: dict, folder: Path = Path(".")):
    """The data pre-flight of a checked ``config`` run from ``folder`` (``pipeline.intake.preflight.for_config``;
    imported here, not at the top: the workflow checks configs with this module, scikit-learn unneeded)."""
    from pipeline.intake import preflight

    return preflight.for_config(config, folder)


def load(path: Path) -> dict:
    """A config file as a mapping; InputError naming the file when it is missing or not YAML."""
    return read_file(path)


def report(findings) -> None:
    """Errors and warnings on stderr, the summary on stdout."""
    for line in findings.lines():
        print(line, file=sys.stdout if line in findings.summary else sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="config YAML (e.g. config/config.yaml)")
    parser.add_argument("--schema", type=Path, default=SCHEMA)
    parser.add_argument("--config-only", action="store_true", help="check the config file only, not the dataset")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        config = load(args.config)
        check(config, args.schema)
    print(f"{args.config}: no problems in the config")
    if args.config_only:
        return
    findings = data(config)
    report(findings)
    if findings.errors:
        print(f"{args.config}: {len(findings.errors)} error(s) in the data (above); a run would stop on them.",
              file=sys.stderr)
        raise SystemExit(2)
    print(f"{config.get('bids_dir', 'bids_dir')}: {len(findings.warnings)} warning(s), no errors")


if __name__ == "__main__":
    main()
