"""A small real segmentation study on the demo cohort, built with the stage functions (no Snakemake):
simulated cohort with its tissue segmentation → ingest (label_image) → 6 mm grid → preprocessing
(ANTs, labels nearest-neighbour) → split → train a small unet → evaluate."""

from __future__ import annotations

import time
from pathlib import Path

from conftest import ingested
from pipeline.demo.cohort import make_demo
from pipeline.intake.grid import write_grid
from pipeline.common.paths import derivative_paths
from pipeline.intake.preprocess import PreprocessSettings, preprocess
from pipeline.intake.split import design

RESOLUTION, SHAPE = 6, (32, 32, 32)
LABEL_IMAGE = {"derivatives": "derivatives/tissue", "filters": {"suffix": "dseg", "desc": "tissue"},
               "labels": ["background", "CSF", "GM", "WM"]}
HYPER = {"model": "unet", "model_args": {"features": [16, 16, 32, 64, 128, 16]}, "epochs": 25, "batch_size": 2,
         "learning_rate": 0.01, "weight_decay": 0.0001, "patience": 25, "seed": 0, "ema": 0.0,
         "sampler": {"kind": "slices", "axis": 2, "per_image": 16, "batch_size": 8},
         "augmentation": {"rotation": 0, "scaling": 0, "translation": 0, "noise": 0, "intensity": 0}}


def build(root: Path, n_subjects: int = 8, seed: int = 0, folds: int = 1) -> dict:
    """Write the cohort, its preprocessed arrays, manifest and splits under ``root``; return their paths
    and the seconds each step took."""
    seconds = {}
    start = time.perf_counter()
    bids = make_demo(root / "bids", n_subjects, seed, sim_resolution=3.0)
    seconds["demo"] = time.perf_counter() - start
    start = time.perf_counter()
    result = ingested(bids, "group", "classification",
                      bids_filters={"datatype": "anat", "extension": [".nii", ".nii.gz"]},
                      label_image={k: v for k, v in LABEL_IMAGE.items() if k != "labels"})
    manifest = result.manifest
    template, mask = root / "grid" / "template.nii.gz", root / "grid" / "mask.nii.gz"
    write_grid(RESOLUTION, SHAPE, template, mask)
    preproc = root / "derivatives"
    settings = PreprocessSettings.of({"n4": False, "brain_extraction": "none", "registration_resolution": None})
    for row in manifest.itertuples():
        out = derivative_paths(preproc, row.subdir, row.image_id, ["T1w"], label=True)
        preprocess([Path(row.path)], template, mask, out, ["T1w"], settings, label=Path(row.label))
    seconds["preprocess"] = time.perf_counter() - start
    # stratified: two test participants of eight (the stable default draws one here)
    splits = design(manifest, "group", "classification", 0.2, folds, 0.2, seed, method="stratified")
    manifest.to_csv(root / "manifest.tsv", sep="\t", index=False)
    splits.to_csv(root / "splits.tsv", sep="\t", index=False)
    return {"root": root, "bids": bids, "manifest": root / "manifest.tsv", "splits": root / "splits.tsv", "preproc": preproc,
            "template": template, "mask": mask, "seconds": seconds}
