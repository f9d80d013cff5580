"""BIDS ingestion: find the images, join targets by participant id, report every exclusion.

Writes ``manifest.tsv`` (one row per usable image) and ``ingest_report.tsv`` (one row per
excluded image or participant, with the reason). The dataset is only ever read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.errors import InputError
from pipeline.fingerprint import tree_fingerprint

MANIFEST_COLUMNS = ["image_id", "participant_id", "session", "subdir", "path"]
MISSING = {"", "n/a", "na", "nan", "none"}


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv as strings, indexed by ``participant_id`` (always with the ``sub-`` prefix)."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        raise InputError(f"{path} does not exist: a BIDS dataset needs participants.tsv with the targets.")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "participant_id" not in table.columns:
        raise InputError(f"{path} has no 'participant_id' column (columns: {', '.join(table.columns)}).")
    table["participant_id"] = table["participant_id"].map(with_sub_prefix)
    duplicated = table["participant_id"].duplicated(keep=False)
    if duplicated.any():
        rows = [f"row {i + 2} ({pid})" for i, pid in table.loc[duplicated, "participant_id"].items()]
        raise InputError(f"{path} lists a participant more than once: {', '.join(rows)}. Keep one row each.")
    return table.set_index("participant_id")


def with_sub_prefix(label: str) -> str:
    """``01`` or ``sub-01`` → ``sub-01``."""
    label = str(label).strip()
    return label if label.startswith("sub-") else f"sub-{label}"


def open_layout(bids_dir: Path, database_dir: Path | None):
    """A pybids layout without validation or metadata indexing, its database cached in ``database_dir``.

    The cache is rebuilt whenever any file of the dataset was added, removed or changed.
    """
    from bids import BIDSLayout
    from bids.layout import BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    if database_dir is None:
        return BIDSLayout(bids_dir, validate=False, indexer=indexer)
    database_dir = Path(database_dir)
    stamp = database_dir / "fingerprint.txt"
    fingerprint = tree_fingerprint(bids_dir)
    fresh = not (stamp.exists() and stamp.read_text() == fingerprint)
    layout = BIDSLayout(bids_dir, validate=False, indexer=indexer, database_path=database_dir, reset_database=fresh)
    stamp.write_text(fingerprint)
    return layout


def find_images(bids_dir: Path, filters: dict, database_dir: Path | None = None) -> pd.DataFrame:
    """One row per image matching the BIDS entity ``filters`` (columns: MANIFEST_COLUMNS)."""
    layout = open_layout(Path(bids_dir), database_dir)
    query = {k: v for k, v in filters.items() if v not in (None, [], "")}
    rows = []
    for f in layout.get(return_type="object", **query):
        entities = f.get_entities()
        if "subject" not in entities:
            continue  # dataset-level files such as participants.tsv
        subject, session = entities["subject"], entities.get("session")
        stem = Path(f.path).name.split(".")[0]
        image_id = stem.rsplit("_", 1)[0]  # drop the suffix (e.g. _T1w)
        subdir = f"sub-{subject}" + (f"/ses-{session}" if session else "")
        rows.append([image_id, f"sub-{subject}", f"ses-{session}" if session else "", subdir, str(Path(f.path).resolve())])
    images = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("image_id", ignore_index=True)
    duplicated = images["image_id"].duplicated(keep=False)
    if duplicated.any():
        paths = "\n  ".join(images.loc[duplicated, "path"])
        raise InputError(f"Several files match the same image id; narrow the BIDS filters in config:\n  {paths}")
    return images


def unreadable_reason(path: str) -> str | None:
    """Why the NIfTI at ``path`` cannot be used as a 3D image, or None when it can."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for broken files
        return f"unreadable NIfTI ({type(exc).__name__}: {exc})"
    if data.ndim != 3 and not (data.ndim == 4 and data.shape[3] == 1):
        return f"expected a 3D image, got shape {data.shape}"
    if not np.isfinite(data).all():
        return "image contains NaN or infinite values"
    if np.ptp(data) == 0:
        return "image is constant (empty)"
    if abs(np.linalg.det(img.affine[:3, :3])) < 1e-6:
        return "image affine is singular (no valid orientation)"
    return None


def build_manifest(images: pd.DataFrame, participants: pd.DataFrame, target: str, task: str,
                   participants_path: Path, check_images: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Join participant columns onto ``images`` by participant id; return (manifest, exclusions)."""
    excluded = []
    for pid in sorted(set(participants.index) - set(images["participant_id"])):
        excluded.append((pid, "", "", "participant has no image matching the BIDS filters"))
    keep = []
    for row in images.itertuples(index=False):
        reason = None
        if row.participant_id not in participants.index:
            reason = f"participant not listed in {participants_path.name}"
        else:
            value = participants.at[row.participant_id, target].strip()
            if value.lower() in MISSING:
                reason = f"target {target!r} is missing ({value or 'empty'})"
            elif task == "regression" and not _is_number(value):
                reason = f"target {target!r} is not a number ({value!r})"
        if reason is None and check_images:
            reason = unreadable_reason(row.path)
        if reason is None:
            keep.append(row)
        else:
            excluded.append((row.participant_id, row.image_id, row.path, reason))
    manifest = pd.DataFrame(keep, columns=images.columns)
    manifest = manifest.join(participants, on="participant_id")
    report = pd.DataFrame(excluded, columns=["participant_id", "image_id", "path", "reason"])
    return manifest, report


def _is_number(value: str) -> bool:
    try:
        return np.isfinite(float(value))
    except ValueError:
        return False


def ingest(bids_dir: Path, target: str, task: str, filters: dict, include=(), exclude=(),
           database_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Find images, select participants, join targets: (manifest, exclusions)."""
    bids_dir = Path(bids_dir)
    if not (bids_dir / "dataset_description.json").exists():
        raise InputError(f"{bids_dir} is not a BIDS dataset (no dataset_description.json). Check `bids_dir` in config.")
    participants = read_participants(bids_dir)
    if target not in participants.columns:
        raise InputError(f"{bids_dir / 'participants.tsv'} has no column {target!r} (the configured `target`). "
                         f"Its columns are: {', '.join(participants.columns)}.")
    images = find_images(bids_dir, filters, database_dir)
    include, exclude = {with_sub_prefix(p) for p in include}, {with_sub_prefix(p) for p in exclude}
    if include:
        participants = participants[participants.index.isin(include)]
        images = images[images["participant_id"].isin(include)]
    participants = participants[~participants.index.isin(exclude)]
    images = images[~images["participant_id"].isin(exclude)]
    manifest, report = build_manifest(images, participants, target, task, bids_dir / "participants.tsv")
    if manifest.empty:
        raise InputError(f"No usable image in {bids_dir} for target {target!r}; see the exclusions:\n{report.to_string()}")
    return manifest, report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("--target", required=True)
    parser.add_argument("--task", choices=["regression", "classification"], required=True)
    parser.add_argument("--filters", default="{}", help="JSON dict of BIDS entity filters")
    parser.add_argument("--include", nargs="*", default=[])
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--database-dir", type=Path)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.database_dir:
        args.database_dir.mkdir(parents=True, exist_ok=True)
    with InputError.exit_cleanly():
        manifest, report = ingest(args.bids_dir, args.target, args.task, json.loads(args.filters),
                                  args.include, args.exclude, args.database_dir)
    args.manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(args.manifest, sep="\t", index=False)
    report.to_csv(args.report, sep="\t", index=False)
    print(f"{len(manifest)} images of {manifest['participant_id'].nunique()} participants; "
          f"{len(report)} exclusions (see {args.report})", file=sys.stderr)
    for row in report.itertuples(index=False):
        print(f"excluded {row.image_id or row.participant_id}: {row.reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
