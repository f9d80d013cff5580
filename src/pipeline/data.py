"""The study table (manifest ⋈ splits, joined by image id) and batches of preprocessed arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.errors import InputError
from pipeline.preprocess import derivative_paths


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV with ids kept as strings ('' for an absent session)."""
    return pd.read_csv(path, sep="\t", dtype={"session": str, "participant_id": str, "image_id": str},
                       keep_default_na=False)


def study_table(manifest: Path, splits: Path, preproc_dir: Path, fold: str, channels: list[str] | None = None
                ) -> pd.DataFrame:
    """One row per image: manifest columns, its ``split`` in ``fold`` (e.g. ``fold-1``) and the
    preprocessed ``array`` path, joined by image id."""
    table = read_tsv(manifest)
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
    merged["array"] = [str(derivative_paths(preproc_dir, s, i, channels)["array"])
                       for s, i in zip(merged["subdir"], merged["image_id"])]
    return merged.drop(columns="participant_id_split")


class TargetCoder:
    """Maps target values to training labels and back: z-scores (regression) or class indices."""

    def __init__(self, task: str, classes: list[str] | None = None, mean: float = 0.0, std: float = 1.0):
        self.task, self.classes, self.mean, self.std = task, classes, mean, std

    @classmethod
    def fit(cls, task: str, train_values: pd.Series, classes: list[str] | None = None) -> "TargetCoder":
        """Regression: mean/sd of the training values only. Classification: the recorded class list
        (``classes``, from ingestion's targets.json), else the sorted training classes."""
        if task == "classification":
            known = sorted(train_values.astype(str).unique()) if classes is None else list(classes)
            unknown = sorted(set(train_values.astype(str)) - set(known))
            if unknown:
                raise InputError(f"Target values {unknown} are not in the recorded class list {known}; rerun ingestion.")
            return cls(task, classes=known)
        values = train_values.astype(float)
        return cls(task, mean=float(values.mean()), std=float(values.std()) or 1.0)

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.task == "classification" else 1

    def encode(self, values) -> torch.Tensor:
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return torch.tensor([index[str(v)] for v in values], dtype=torch.long)
        return torch.tensor((np.asarray(values, dtype=np.float32) - self.mean) / self.std, dtype=torch.float32)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        """Network outputs (B, outputs) → predictions in target units, or class probabilities (B, K)."""
        if self.task == "classification":
            return torch.softmax(outputs.float(), dim=1).numpy()
        return outputs.float().squeeze(1).numpy() * self.std + self.mean

    def state(self) -> dict:
        return {"task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std}


def load_batch(paths: list[str]) -> torch.Tensor:
    """(B, C, X, Y, Z) float32 batch from memory-mapped (C, X, Y, Z) ``.npy`` arrays."""
    try:
        arrays = [np.load(p, mmap_mode="r") for p in paths]
    except FileNotFoundError as exc:
        raise InputError(f"Preprocessed array missing: {exc.filename}; rerun preprocessing.") from exc
    return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))
