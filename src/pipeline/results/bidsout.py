"""The study's predictions and explanation maps as a BIDS derivative dataset (``derivatives/predictions``).

``python -m pipeline.results.bidsout FOLD_DIR… --predictions evaluate/predictions.tsv --manifest samples.tsv
--preproc-dir derivatives/pipeline --out-dir derivatives/predictions --config '{…}'`` writes::

    dataset_description.json   DatasetType derivative; GeneratedBy this package; SourceDatasets and
                               DatasetLinks: the raw dataset (raw) and the preprocessed images (preprocessed)
    README                     what the dataset holds, in words
    .bidsignore                the attribution maps' files (BIDS has no suffix for them yet)
    participants.tsv/.json     the ensemble's test prediction per participant (mean over its images)
    sub-X/[ses-Y/]sub-X[_ses-Y]_scans.tsv/.json   BIDS scans tables: each map of the folder with its
                               image's test prediction (image_id, true, predicted, …)
    sub-X/[ses-Y/]anat/<image>_space-MNI152NLin2009aSym_desc-<method>_saliency.nii.gz/.json
    sub-X/[ses-Y/]anat/<image>_space-<reference>_desc-<method>_saliency.nii.gz/.json

The maps are each test image's map averaged over the folds' networks (what the study's group maps are
made of), on the study grid and on the image's native grid; their sidecars name the method, the
folds and the ``Sources`` (BIDS URIs into the raw and the preprocessed datasets). The per-image
predictions sit in the scans tables because BIDS indexes ``phenotype/`` tables by participant alone
(the validator refuses a participant's second session there) and ``sessions.tsv`` by session (two
runs of one session would clash), while a scans table has a row per file. The names carry
BIDS entities (``sub``, ``ses``, ``space``, ``desc``) and pybids parses them; the ``saliency`` suffix is
not (yet) in the specification, so the maps are declared in ``.bidsignore`` (``IGNORED``), as the
preprocessing dataset declares its arrays. ``bids-validator-deno`` finds no error in the dataset
(``tests/test_bids_outputs.py``). ``write_dataset``, ``write_predictions`` and ``write_maps`` are the
writer apply mode can share.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config, channel_names
from pipeline.common.columns import Column
from pipeline.common.errors import InputError
from pipeline.common.paths import explanation_maps, preprocessed
from pipeline.common.tables import read_tsv
from pipeline.intake.derivatives import RAW, bids_uri, dataset_description
from pipeline.results.attribution import REGISTRY
from pipeline.results.maps import FoldMeanMaps
from pipeline.results.participants import by_participant

PREPROCESSED = "preprocessed"  # the DatasetLinks key of the preprocessed images (derivatives/pipeline)
IGNORED = ("*_saliency.nii.gz", "*_saliency.json")  # attribution maps: no BIDS suffix yet
SCANS = {"filename": Column("File", "A file of this folder, relative to it (BIDS scans table): one of the image's "
                                    "attribution maps; the row's other columns are that image's prediction.")}
WHAT = "Predictions of a trained ensemble and their attribution (explanation) maps"


def readme(target: str, task: str, methods: list[str], folds: int) -> str:
    maps = ", ".join(methods) if methods else "none"
    return (f"Predictions of {target} ({task}) by the ensemble of {folds} fold networks of a bids-deepstudy study,\n"
            "for the study's held-out test images, and each image's attribution maps.\n\n"
            "- participants.tsv: one row per participant, the mean prediction over its test images.\n"
            "- sub-*/[ses-*/]*_scans.tsv: each map file of the folder with its image's prediction.\n"
            f"- sub-*/[ses-*/]anat/*_desc-<method>_saliency.nii.gz: attribution maps ({maps}), the mean over the\n"
            "  folds' networks, on the study grid (space-MNI152NLin2009aSym) and on the image's own grid\n"
            "  (space-<reference channel>). BIDS has no suffix for such maps yet: .bidsignore declares them.\n"
            "Each .tsv has a .json data dictionary; each map's .json sidecar names its method and sources.\n")


def write_dataset(root: Path, raw_dir: Path, preproc_dir: Path, text: str, what: str = WHAT) -> dict[str, Path]:
    """``root``'s ``dataset_description.json`` (sources: the raw dataset and the preprocessed images),
    ``README`` (``text``) and ``.bidsignore``; return their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = {"description": root / "dataset_description.json", "readme": root / "README",
             "bidsignore": root / ".bidsignore"}
    description = dataset_description(raw_dir, "Predictions and explanation maps", what, {PREPROCESSED: preproc_dir})
    atomic.write_text(paths["description"], json.dumps(description, indent=2) + "\n")
    atomic.write_text(paths["readme"], text)
    atomic.write_text(paths["bidsignore"], "".join(f"{pattern}\n" for pattern in IGNORED))
    return paths


def classes_of(predictions: pd.DataFrame) -> list[str] | None:
    """A classification table's classes in column order (``p_<class>``), None for regression."""
    return [c[2:] for c in predictions if c.startswith("p_")] or None


def per_participant(predictions: pd.DataFrame) -> pd.DataFrame:
    """One row per participant (BIDS ``participants.tsv`` allows no repeat): the mean prediction over
    its images; for classification the mean class probabilities, their most probable class, and its
    true class (classes joined by ``;`` when its images carry different ones)."""
    classes = classes_of(predictions)
    if not classes:
        return by_participant(predictions, None)
    grouped = predictions.groupby("participant_id", sort=True)
    table = grouped[[f"p_{c}" for c in classes]].mean().reset_index()
    if "true" in predictions:  # apply mode predicts without a target
        table.insert(1, "true", grouped["true"].agg(lambda v: ";".join(sorted(set(map(str, v))))).to_numpy())
    table.insert(1 + ("true" in table), "images", grouped.size().to_numpy())
    table["predicted"] = [classes[i] for i in table[[f"p_{c}" for c in classes]].to_numpy().argmax(1)]
    return table


def write_predictions(root: Path, predictions: pd.DataFrame, manifest: pd.DataFrame,
                      files: Mapping[str, list[Path]], per_participant_means: bool = True) -> list[Path]:
    """``participants.tsv`` (one row per participant) and, in each image's folder, a BIDS scans table
    (``sub-X[_ses-Y]_scans.tsv``) listing that image's ``files`` (image id -> its maps) with its
    prediction, each table with its data dictionary; ``manifest`` gives each image's folder. Returns
    the tables written. ``per_participant_means`` false (a segmentation package's label maps, no
    prediction to average): ``participants.tsv`` counts each participant's images only."""
    folders = dict(zip(manifest["image_id"], manifest["subdir"]))
    missing = sorted(set(predictions["image_id"]) - set(folders))
    if missing:
        raise InputError(f"Predicted images not in the manifest: {', '.join(missing[:5])}; rerun the study's "
                         "evaluation (its predictions are of another manifest).")
    root.mkdir(parents=True, exist_ok=True)
    written = [root / "participants.tsv"]
    people = (per_participant(predictions) if per_participant_means else
              predictions.groupby("participant_id", sort=True).size().rename("images").reset_index())
    atomic.to_csv(people, written[0], sep="\t", index=False)
    values = predictions.drop(columns=[c for c in ("participant_id", "session") if c in predictions])
    rows = [{"subdir": folders[i], "filename": path, **v} for v in values.to_dict("records")
            for i in [v["image_id"]] for path in files.get(i, [])]
    for subdir, table in pd.DataFrame(rows).groupby("subdir", sort=True) if rows else ():
        folder = root / subdir
        table = table.drop(columns="subdir").assign(filename=[Path(p).relative_to(folder).as_posix()
                                                              for p in table["filename"]])
        written.append(folder / f"{subdir.replace('/', '_')}_scans.tsv")
        atomic.to_csv(table, written[-1], sep="\t", index=False, meanings=SCANS)
    return written


def write_maps(root: Path, maps: Mapping[str, Mapping[str, nib.Nifti1Image]], space: str, manifest: pd.DataFrame,
               raw_dir: Path, preproc_dir: Path, channels: list[str], folds: int,
               preproc_key: str = PREPROCESSED) -> dict[str, list[Path]]:
    """Write each method's map of each image (``maps``: method -> image id -> image) in ``space``
    (``template`` or ``native``) under ``root`` with a JSON sidecar; return the NIfTI paths by image id.
    ``preproc_key``: the DatasetLinks key of ``preproc_dir`` in the sidecars' ``Sources`` (``""``: the
    preprocessed images are in ``root`` itself, as in apply's output dataset)."""
    rows = manifest.set_index("image_id")
    written: dict[str, list[Path]] = {}
    for method, images in maps.items():
        for image_id in images:
            row = rows.loc[image_id]
            path = Path(explanation_maps(str(root), row["subdir"], image_id, method, channels[0])[space])
            path.parent.mkdir(parents=True, exist_ok=True)
            image = images[image_id]
            atomic.nib_save(nib.Nifti1Image(np.asarray(image.dataobj, dtype=np.float32), image.affine), path)
            source = preprocessed(str(preproc_dir), row["subdir"], image_id, tuple(channels))[f"image_{channels[0]}"]
            sidecar = {"Description": f"Attribution map ({method}: {REGISTRY[method].description}), mean over the "
                                      f"{folds} folds' networks" + (", carried to the image's own grid" if space == "native" else ""),
                       "Method": method, "Signed": REGISTRY[method].signed,
                       "Sources": [bids_uri(row["path"], raw_dir, RAW), bids_uri(source, preproc_dir, preproc_key)]}
            atomic.write_text(path.with_name(path.name.replace(".nii.gz", ".json")), json.dumps(sidecar, indent=2) + "\n")
            written.setdefault(image_id, []).append(path)
    return written


def write_study(fold_dirs: list[Path], predictions: Path, manifest: Path, raw_dir: Path, preproc_dir: Path,
                out_dir: Path, config: dict) -> Path:
    """The study's derivative dataset ``out_dir`` from the explain folds (``fold_dirs``: their
    ``maps.tsv``), the ensemble's ``predictions`` and the ``manifest``."""
    methods, channels = list(config["explain"]["methods"]), channel_names(config)
    table = read_tsv(manifest)
    write_dataset(out_dir, raw_dir, preproc_dir, readme(config["target"], config["task"], methods, len(fold_dirs)))
    files: dict[str, list[Path]] = {}
    for space in ("template", "native"):
        maps = {m: FoldMeanMaps(fold_dirs, m, space) for m in methods}
        for image_id, paths in write_maps(out_dir, maps, space, table, raw_dir, preproc_dir, channels,
                                          len(fold_dirs)).items():
            files.setdefault(image_id, []).extend(paths)
    tables = write_predictions(out_dir, read_tsv(predictions), table, files)
    print(f"{sum(map(len, files.values()))} maps of {len(files)} images; {len(tables)} tables", file=sys.stderr)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_dirs", type=Path, nargs="+", help="the explain folds' folders (maps.tsv)")
    add_config(parser)  # bids_dir, channels, explain.methods, target, task
    parser.add_argument("--predictions", type=Path, required=True, help="the ensemble's test predictions (TSV)")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        write_study(args.fold_dirs, args.predictions, args.manifest, Path(args.config["bids_dir"]), args.preproc_dir,
                    args.out_dir, args.config)
        print(f"BIDS derivative dataset: {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
