"""``python -m pipeline.configcheck``: every config problem before any job runs: the schema's
(``pipeline.common.configcheck``) and the checks across keys of the stages (``pipeline.results.explainconfig``;
``useratlas``: the files of ``explain.atlas`` on the study grid; ``pipeline.learning.launch``: ``device`` and
``train.gpus``; ``pipeline.intake.brainmask``: brain extraction and ``brain_mask``; ``pipeline.learning.finetune``:
``train.freeze`` and ``train.backbone_lr_factor`` need ``train.init_from``)."""

from pathlib import Path

from pipeline.common import configcheck
from pipeline.common.locations import SCHEMA
from pipeline.intake import brainmask
from pipeline.learning import finetune, launch
from pipeline.results import explainconfig, useratlas

CROSS = (explainconfig.problems, useratlas.problems, launch.problems, brainmask.problems, finetune.problems)


def check(config: dict, schema_path: Path = SCHEMA) -> None:
    """InputError listing every problem of ``config`` (none: returns quietly)."""
    configcheck.check(config, schema_path, CROSS)


def main(argv=None) -> None:
    configcheck.main(argv, CROSS)


if __name__ == "__main__":
    main()
