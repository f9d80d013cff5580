"""What the stages' command lines share.

Every stage receives the study's settings the same way: ``--config``, one JSON object holding the
resolved config keys the stage reads (the workflow builds it with
``pipeline.common.config.stage_config``; keys and meanings as in config/README.md). Paths of
inputs and outputs, and the job's wildcards (a fold, an image), are arguments of their own; so is
``--device`` (config ``device``) of the stages that run a network.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")  # config `device` (pipeline.learning.device.resolve)


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=json.loads, required=True, metavar="JSON",
                        help="the study's resolved config keys this command reads (the workflow passes them)")


def add_fold(parser: argparse.ArgumentParser) -> None:
    """The arguments that pick one fold's images: the manifest, the splits, the fold, the arrays."""
    parser.add_argument("--manifest", type=Path, required=True, help="samples.tsv")
    parser.add_argument("--splits", type=Path, required=True, help="splits.tsv")
    parser.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    parser.add_argument("--preproc-dir", type=Path, required=True, help="the preprocessed derivatives folder")


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="config `device`: auto (a GPU when the job sees one), cpu, or cuda (a GPU or an error)")


def channel_names(config: dict) -> list[str]:
    """The channel names, reference first (config ``channels``)."""
    return list(config["channels"])
