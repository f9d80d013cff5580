"""Subject-level train/validation/test split, stratified by the target, seeded and leak-checked.

Writes ``splits.tsv``: one row per image (image_id, participant_id, split). All images of a
participant share one split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from pipeline.errors import InputError

SPLITS = ("train", "val", "test")


def strata(values: pd.Series, task: str, bins: int) -> pd.Series:
    """Stratification labels: the class for classification, the quantile bin for regression."""
    if task == "classification":
        return values.astype(str)
    return pd.qcut(values.astype(float), q=bins, labels=False, duplicates="drop").astype(str)


def _split_off(ids: pd.Series, labels: pd.Series, fraction: float, seed: int) -> tuple[pd.Series, pd.Series]:
    """Split ``ids`` into (rest, fraction part), stratified by ``labels`` where every stratum allows it."""
    counts = labels.value_counts()
    n_part = round(fraction * len(ids))
    stratify = labels if counts.min() >= 2 and n_part >= counts.size and len(ids) - n_part >= counts.size else None
    if stratify is None:
        print(f"warning: strata too small to stratify a {fraction:.0%} split; splitting at random", file=sys.stderr)
    rest, part = train_test_split(ids, test_size=n_part, random_state=seed, stratify=stratify)
    return rest, part


def split_subjects(manifest: pd.DataFrame, target: str, task: str, test: float, val: float,
                   seed: int, bins: int = 5) -> pd.DataFrame:
    """Assign each participant to train/val/test; return one row per image of ``manifest``."""
    subjects = manifest.groupby("participant_id", sort=True)[target].first()
    if len(subjects) < 3:
        raise InputError(f"Only {len(subjects)} participants in the manifest; a train/val/test split needs at least 3.")
    ids = pd.Series(subjects.index, index=subjects.index)
    labels = strata(subjects, task, bins)
    rest, test_ids = _split_off(ids, labels, test, seed)
    train_ids, val_ids = _split_off(rest, strata(subjects[rest], task, bins), val / (1 - test), seed)
    assignment = {**{p: "train" for p in train_ids}, **{p: "val" for p in val_ids}, **{p: "test" for p in test_ids}}
    splits = manifest[["image_id", "participant_id"]].copy()
    splits["split"] = splits["participant_id"].map(assignment)
    check_no_leak(splits)
    return splits


def check_no_leak(splits: pd.DataFrame) -> None:
    """Fail if any participant has images in more than one split, or a split is empty."""
    per_subject = splits.groupby("participant_id")["split"].nunique()
    leaked = per_subject[per_subject > 1].index.tolist()
    if leaked:
        raise InputError(f"Participants in more than one split (data leak): {', '.join(leaked)}")
    empty = [s for s in SPLITS if not (splits["split"] == s).any()]
    if empty:
        raise InputError(f"Split(s) {', '.join(empty)} would be empty; use more participants or change the fractions.")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--target", required=True)
    parser.add_argument("--task", choices=["regression", "classification"], required=True)
    parser.add_argument("--test", type=float, default=0.2)
    parser.add_argument("--val", type=float, default=0.2)
    parser.add_argument("--bins", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    manifest = pd.read_csv(args.manifest, sep="\t", dtype={"session": str}, keep_default_na=False)
    with InputError.exit_cleanly():
        splits = split_subjects(manifest, args.target, args.task, args.test, args.val, args.seed, args.bins)
    splits.to_csv(args.out, sep="\t", index=False)
    counts = splits.drop_duplicates("participant_id")["split"].value_counts()
    print("participants per split: " + ", ".join(f"{s}={counts.get(s, 0)}" for s in SPLITS), file=sys.stderr)


if __name__ == "__main__":
    main()
