"""A tiny finished study built with the real stage functions (no Snakemake) and its exported package."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.intake import recipe
from pipeline.intake.study import study_table
from pipeline.results.evaluate import evaluate_fold, summarise
from pipeline.sharing.export import export
from pipeline.sharing.modelcard import PackageSettings
from pipeline.common.paths import derivative_paths
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train

SHAPE = (16, 16, 16)
HYPER = {"epochs": 2, "batch_size": 4, "learning_rate": 0.01, "model_args": {"channels": [4, 8]}}
RECIPE = recipe.from_config({"resolution": 4, "shape": list(SHAPE), "transform": "Affine", "n4": True,
                             "n4_shrink_factor": 4, "seed": 1, "antialias": True}, {"T1w": {"suffix": "T1w"}},
                            {"datatype": "anat"})
EXPLAIN = {"methods": ["occlusion", "gradient"], "window": 4, "stride": 4, "gradcam_layer": "features.1"}


def write_cohort(root: Path, n: int = 14, seed: int = 0) -> tuple[Path, Path, Path]:
    """Arrays whose central block brightens with age; manifest.tsv and splits.tsv (3 test participants,
    two folds). Returns (manifest, splits, preprocessed root)."""
    rng = np.random.default_rng(seed)
    ages = np.linspace(20, 80, n)
    rng.shuffle(ages)
    rows = []
    for i, age in enumerate(ages, 1):
        pid = f"sub-{i:02d}"
        x = rng.normal(0, 1, (1, *SHAPE)).astype(np.float32)
        x[0, 4:12, 4:12, 4:12] += (age - 50) / 15
        path = Path(derivative_paths(root / "derivatives", pid, pid, ["T1w"])["array"])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
        rows.append({"image_id": pid, "participant_id": pid, "session": "", "subdir": pid,
                     "path": str(root / f"{pid}_T1w.nii.gz"), "age": round(float(age), 1),
                     "group": ["a", "b", "c"][i % 3]})
    manifest = pd.DataFrame(rows)
    design = manifest[["image_id", "participant_id"]].copy()
    number = np.arange(1, n + 1)
    design["fold-1"] = np.where(number <= 3, "test", np.where(number % 2 == 0, "val", "train"))
    design["fold-2"] = np.where(number <= 3, "test", np.where(number % 2 == 1, "val", "train"))
    manifest.to_csv(root / "manifest.tsv", sep="\t", index=False)
    design.to_csv(root / "splits.tsv", sep="\t", index=False)
    return root / "manifest.tsv", root / "splits.tsv", root / "derivatives"


def write_grid(root: Path) -> tuple[Path, Path]:
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:14, 2:14, 2:14] = 1
    (root / "grid").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask.astype(np.float32), affine), root / "grid" / "template.nii.gz")
    nib.save(nib.Nifti1Image(mask, affine), root / "grid" / "mask.nii.gz")
    return root / "grid" / "template.nii.gz", root / "grid" / "mask.nii.gz"


def build(root: Path) -> Path:
    """Train, evaluate and summarise two folds, export the package; return its folder."""
    manifest, splits, preproc = write_cohort(root)
    template, mask = write_grid(root)
    folds = ["fold-1", "fold-2"]
    for fold in folds:
        table = study_table(manifest, splits, preproc, fold, ["T1w"])
        train(table, "age", "regression", TrainSettings.of(HYPER), root / "train" / fold, channels=["T1w"])
        evaluate_fold(table, root / "train" / fold / "model.pt", root / "evaluate" / fold)
    summarise([root / "evaluate" / f for f in folds], root / "evaluate")
    folder = root / "package" / "model"
    export([root / "train" / f for f in folds], [root / "evaluate" / f for f in folds], root / "evaluate" / "metrics.json",
           manifest, splits, preproc, template, mask, RECIPE, EXPLAIN,
           PackageSettings.of({"limitations": ["A unit-test model."]}), folder, root / "package" / "model.tar.gz")
    return folder


def spec(folder: Path) -> dict:
    return json.loads((folder / "spec.json").read_text())


def with_outputs(folder: Path, dest: Path, outputs: int, **spec_changes) -> Path:
    """A copy of the package ``folder`` whose networks have ``outputs`` outputs (the backbone's
    weights kept, a random head), its spec changed by ``spec_changes``, checksums rewritten: e.g.
    a brain-age package with SFCN-style soft-label bins."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from pipeline.learning.models import build_model
    from pipeline.common import package

    shutil.copytree(folder, dest)
    spec = {**json.loads((dest / package.SPEC).read_text()), "outputs": outputs, **spec_changes}
    torch.manual_seed(0)
    for fold in spec["folds"]:
        path = dest / package.weights_file(fold)
        state = load_file(path)
        fresh = build_model(spec["architecture"]["name"], 1, outputs, **spec["architecture"]["args"]).state_dict()
        save_file({k: (v if fresh[k].shape == v.shape else fresh[k]).contiguous() for k, v in state.items()}, path)
    (dest / package.SPEC).write_text(json.dumps(spec, indent=2))
    package.write_checksums(dest)
    return dest
