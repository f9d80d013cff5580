"""A tiny finished segmentation study and its exported package: the demo cohort on the 6 mm grid
(``segstudy``), two folds of a small 2D unet on axial slices trained for a few epochs, evaluated
and summarised with the study's own functions, then exported (no Snakemake); about a minute."""

from __future__ import annotations

import time
from pathlib import Path

import segstudy
from pipeline.intake import recipe
from pipeline.intake.study import study_table
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train
from pipeline.results.evaluate import evaluate_fold
from pipeline.results.segmentation import summarise
from pipeline.sharing.export import export
from pipeline.sharing.modelcard import PackageSettings

FOLDS = ["fold-1", "fold-2"]
EXPLAIN = {"methods": ["occlusion"]}  # what the export rule passes; a segmentation spec records none
LABELS = segstudy.LABEL_IMAGE["labels"]
HYPER = {**segstudy.HYPER, "model_args": {"features": [4, 4, 8, 8, 16, 4]}, "epochs": 3, "patience": 3,
         "sampler": {"kind": "slices", "axis": 2, "per_image": 8, "batch_size": 8}}
RECIPE = recipe.from_config({"resolution": segstudy.RESOLUTION, "shape": list(segstudy.SHAPE), "transform": "Affine",
                             "n4": False, "n4_shrink_factor": 4, "seed": 1, "antialias": True},
                            {"T1w": {"suffix": "T1w"}}, {"datatype": "anat", "extension": [".nii", ".nii.gz"]})


def build(root: Path, n_subjects: int = 6) -> dict:
    """The study under ``root`` (``segstudy.build``'s paths, plus ``train``/``evaluate`` folders and
    the ``package`` folder and archive, and the seconds each step took)."""
    study = segstudy.build(root, n_subjects, folds=2)
    start = time.perf_counter()
    for fold in FOLDS:
        table = study_table(study["manifest"], study["splits"], study["preproc"], fold, ["T1w"], label=True)
        train(table, "label", "segmentation", TrainSettings.of(HYPER), root / "train" / fold, classes=LABELS,
              channels=["T1w"])
    study["seconds"]["train"] = time.perf_counter() - start
    start = time.perf_counter()
    for fold in FOLDS:
        table = study_table(study["manifest"], study["splits"], study["preproc"], fold, ["T1w"], label=True)
        evaluate_fold(table, root / "train" / fold / "model.pt", root / "evaluate" / fold, study["preproc"], ["T1w"])
    summarise([root / "evaluate" / f for f in FOLDS], root / "evaluate")
    study["seconds"]["evaluate"] = time.perf_counter() - start
    study.update(train=[root / "train" / f for f in FOLDS], evaluate=[root / "evaluate" / f for f in FOLDS],
                 summary=root / "evaluate" / "metrics.json", package=root / "package" / "model",
                 archive=root / "package" / "model.tar.gz")
    start = time.perf_counter()
    export(study["train"], study["evaluate"], study["summary"], study["manifest"], study["splits"], study["preproc"],
           study["template"], study["mask"], RECIPE, EXPLAIN,
           PackageSettings.of({"limitations": ["A unit-test model."]}), study["package"], study["archive"])
    study["seconds"]["export"] = time.perf_counter() - start
    return study
