"""Apply a segmentation package to preprocessed images (``python -m pipeline.sharing.predict labels``).

Each fold's network labels every image exactly as the study's evaluation does
(``segmentation.predict_maps``: the argmax of ``SegmentationModel``'s logits on the template grid,
carried to the image's native grid by the inverse transform of preprocessing, nearest label),
into ``OUT_DIR/fold-K/labels/`` with ``OUT_DIR/fold-K/predictions.tsv``. The ensemble is the
voxel-wise majority vote of the folds' maps on each grid (``segmentation.ensemble_row``, ties to
the lowest label): ``labels/sub-X/[ses-Y/]anat/*_desc-predicted_dseg.nii.gz`` beside the
ensemble's table, one row per image (ids, ``predicted_labels``, ``predicted_labels_native``).
When the apply config names a label image (config ``label_image``, ingested and preprocessed
with the images) every row also has Dice and HD95 per label on both grids, as evaluation's.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.tables import read_tsv
from pipeline.intake.study import with_arrays
from pipeline.learning.saved import package_model
from pipeline.results.segmentation import ensemble_row, predict_maps
from pipeline.common import package


def label_table(manifest: Path, preproc_dir: Path, channels: list[str], pkg: package.Package,
                label_image: dict | None) -> pd.DataFrame:
    """The manifest's rows with each image's preprocessed ``array`` and, when the manifest has
    label images (config ``label_image``), their preprocessed ``label_array``; InputError when the
    label image's names differ from the package's labels."""
    table = read_tsv(manifest)
    label = "label" in table.columns
    names = (label_image or {}).get("labels")
    if label and names and list(names) != list(pkg.spec["classes"]):
        raise InputError(f"config label_image.labels {list(names)} differ from the labels of package {pkg.folder} "
                         f"{pkg.spec['classes']} (index = label value); give the package's, or leave them out.")
    return with_arrays(table, preproc_dir, channels, label)


def predict_labels(pkg: package.Package, table: pd.DataFrame, preproc_dir: Path, channels: list[str],
                   out_dir: Path, out: Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Each fold's label maps (``out_dir/fold-K``) and the ensemble's (under ``out``'s folder, table
    ``out``), read back from the folds' TSVs as evaluation's summary reads them. Networks run on ``device``."""
    if pkg.spec["task"] != "segmentation":
        raise InputError(f"Package {pkg.folder} predicts {pkg.spec['task']}, not label maps; "
                         "use `python -m pipeline.sharing.predict predictions`.")
    names = pkg.spec["classes"]
    for fold in pkg.folds:
        predictions = predict_maps(package_model(pkg, fold, device), names, table, preproc_dir, channels,
                                   out_dir / fold)
        atomic.to_csv(predictions, out_dir / fold / "predictions.tsv", sep="\t", index=False)
    folds = [read_tsv(out_dir / fold / "predictions.tsv").set_index("image_id") for fold in pkg.folds]
    spacing = nib.load(str(pkg.folder / package.GRID_TEMPLATE)).header.get_zooms()[:3]
    combined = pd.DataFrame([ensemble_row(folds, image_id, names, spacing, out.parent, native=True)
                             for image_id in table["image_id"]])
    atomic.to_csv(combined, out, sep="\t", index=False)
    return combined
