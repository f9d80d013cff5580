"""Explanation maps against a simulated cohort's ground truth (the demo): how much of each map's
strongest attribution falls in the true effect, relative to chance, in template and native space."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE, groundtruth_mask, missing_groundtruth
from pipeline.intake.template import resample_to_grid
from pipeline.results.maps import FoldMeanMaps


def top_fraction_enrichment(attribution: np.ndarray, region: np.ndarray, brain: np.ndarray, top: float = 0.05) -> float:
    """How many times more of the top ``top`` fraction of |attribution| in ``brain`` lies in ``region`` than chance."""
    values = np.abs(attribution[brain])
    cutoff = np.quantile(values, 1 - top)
    hits = region[brain][values >= cutoff].mean()
    chance = region[brain].mean()
    return float(hits / chance)


def validation_table(fold_dirs: list[Path], template_maps: dict[str, Mapping[str, nib.Nifti1Image]],
                     means: dict[str, np.ndarray], mask: nib.Nifti1Image, truth_dir: Path, target: str,
                     manifest: pd.DataFrame) -> pd.DataFrame:
    """Enrichment of each method's top 5 % in the true effect mask of ``target`` (a simulated cohort's
    ground truth): the group mean map and each subject's map (mean over subjects) on the study grid,
    and each subject's native-space map with the mask carried there by the simulated pose."""
    if problem := missing_groundtruth(truth_dir, target):
        raise InputError(problem)
    truth_path = groundtruth_mask(truth_dir, target)
    loaded = nib.load(str(truth_path))
    truth_img = nib.Nifti1Image(np.asarray(loaded.dataobj, dtype=np.float32), loaded.affine)  # read once
    brain = np.asarray(mask.dataobj) > 0
    truth = resample_to_grid(truth_img, mask.affine, mask.shape) > 0.5
    subdirs = manifest.set_index("image_id")["subdir"]
    native_masks = {}  # image id -> (truth, brain) on its native grid, shared by every method

    def native_truth(image_id: str, native: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
        if image_id not in native_masks:
            pose_file = truth_dir / subdirs[image_id] / "anat" / f"{image_id}_from-{SPACE}_to-T1w_pose.json"
            to_template = np.linalg.inv(np.array(json.loads(pose_file.read_text())["matrix"])) @ native.affine
            native_masks[image_id] = (resample_to_grid(truth_img, to_template, native.shape[:3]) > 0.5,
                                      resample_to_grid(mask, to_template, native.shape[:3]) > 0.5)
        return native_masks[image_id]

    rows = []
    for method, maps in template_maps.items():
        chance = truth[brain].mean()
        rows.append({"method": method, "space": "template", "level": "group",
                     "enrichment": top_fraction_enrichment(means[method], truth, brain), "chance": chance})
        rows.append({"method": method, "space": "template", "level": "subject",
                     "enrichment": np.mean([top_fraction_enrichment(img.get_fdata(), truth, brain)
                                            for img in maps.values()]), "chance": chance})
        scores, chances = [], []
        for image_id, native in FoldMeanMaps(fold_dirs, method, "native").items():
            region, inside = native_truth(image_id, native)
            scores.append(top_fraction_enrichment(native.get_fdata(), region, inside))
            chances.append(region[inside].mean())
        rows.append({"method": method, "space": "native", "level": "subject", "enrichment": np.mean(scores),
                     "chance": np.mean(chances)})
    return pd.DataFrame(rows)


def per_method(table: pd.DataFrame) -> pd.DataFrame:
    """``validation_table`` as one row per method: ``enrichment_<space>_<level>`` for each of its
    rows and ``chance_<space>`` (the true effect's share of the brain there)."""
    wide = table.pivot_table(index="method", columns=["space", "level"], values="enrichment", sort=False)
    wide.columns = [f"enrichment_{space}_{level}" for space, level in wide.columns]
    chance = table.pivot_table(index="method", columns="space", values="chance", aggfunc="first", sort=False)
    chance.columns = [f"chance_{space}" for space in chance.columns]
    return wide.join(chance).reset_index()
