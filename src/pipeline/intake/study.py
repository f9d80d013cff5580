"""The study table: the manifest joined to one fold's splits and to the preprocessed arrays, by image id;
apply mode's image table: the manifest and the arrays, without splits."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.common.errors import InputError
from pipeline.common.paths import derivative_paths
from pipeline.common.tables import read_tsv


def study_table(manifest: Path, splits: Path, preproc_dir: Path, fold: str, channels: list[str] | None = None,
                label: bool = False) -> pd.DataFrame:
    """One row per image: manifest columns, its ``split`` in ``fold`` (e.g. ``fold-1``) and the
    preprocessed ``array`` path, joined by image id; with ``label`` (segmentation) also the
    preprocessed ``label_array`` path."""
    table = read_tsv(manifest)
    if label and "label" not in table.columns:
        raise InputError(f"{manifest} has no `label` column: `task: segmentation` needs a label image per sample; "
                         "set config `label_image` (e.g. {derivatives: derivatives/tissue, filters: {suffix: dseg}}) "
                         "and rerun ingestion.")
    design = read_tsv(splits)
    if fold not in design.columns:
        folds = [c for c in design.columns if c.startswith("fold-")]
        raise InputError(f"{splits} has no column {fold!r} (it has {', '.join(folds)}); rerun the split rule.")
    split = design[["image_id", "participant_id", fold]].rename(columns={fold: "split"})
    merged = table.merge(split, on="image_id", how="left", suffixes=("", "_split"), validate="one_to_one")
    missing = merged["split"].isna()
    if missing.any():
        raise InputError(f"{splits} has no split for images {', '.join(merged.loc[missing, 'image_id'])}; rerun the split rule.")
    if (merged["participant_id"] != merged["participant_id_split"]).any():
        raise InputError(f"{splits} and {manifest} disagree on a participant id; rerun the split rule.")
    return with_arrays(merged, preproc_dir, channels, label).drop(columns="participant_id_split")


def image_table(manifest: Path, preproc_dir: Path, channels: list[str] | None = None, label: bool = False) -> pd.DataFrame:
    """The study table without a design (apply mode: every image is predicted): the manifest's
    rows with each image's preprocessed ``array`` path (and ``label_array`` with ``label``)."""
    return with_arrays(read_tsv(manifest), preproc_dir, channels, label)


def with_arrays(table: pd.DataFrame, preproc_dir: Path, channels: list[str] | None = None,
                label: bool = False) -> pd.DataFrame:
    """``table`` (``subdir``, ``image_id``) with each image's preprocessed ``array`` path, and its
    ``label_array`` path with ``label``; the paths of ``pipeline.common.paths.derivative_paths``."""
    paths = [derivative_paths(preproc_dir, s, i, channels, label) for s, i in zip(table["subdir"], table["image_id"])]
    table["array"] = [str(p["array"]) for p in paths]
    if label:
        table["label_array"] = [str(p["label_array"]) for p in paths]
    return table
