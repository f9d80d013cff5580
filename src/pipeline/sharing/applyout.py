"""``apply``'s output folder as one BIDS derivative dataset (issue #29, item 4).

``python -m pipeline.sharing.applyout --config '{…}' --manifest samples.tsv --preproc-dir WORK/derivatives/pipeline
--predictions WORK/predictions.tsv [--maps-index WORK/explain/maps.tsv] --out-dir OUTPUT_DIR`` writes::

    dataset_description.json   DatasetType derivative; GeneratedBy this package (applying the model
                               package, named in its Description); SourceDatasets and DatasetLinks: the raw dataset
    README                     what the dataset holds, in words
    .bidsignore                the attribution maps' files (no BIDS suffix for them yet, as in the study's
                               derivatives/predictions) and report.html (an HTML page is no BIDS file)
    participants.tsv/.json     the ensemble's prediction per participant (mean over its images)
    sub-X/[ses-Y/]sub-X[_ses-Y]_scans.tsv/.json   each file of the folder with its image's prediction
    sub-X/[ses-Y/]anat/<image>_space-MNI152NLin2009aSym_desc-preproc_<channel>.nii.gz/.json
                               the image as the package's networks saw it (every channel, with preprocessing's
                               sidecar; hard links to the work folder's where possible)
    sub-X/[ses-Y/]anat/<image>_space-{MNI152NLin2009aSym,<reference>}_desc-<method>_saliency.nii.gz/.json
                               the fold-mean attribution maps (not with ``--maps none``)
    sub-X/[ses-Y/]anat/<image>_space-{MNI152NLin2009aSym,<reference>}_desc-predicted_dseg.nii.gz/.json
                               a segmentation package's label maps (instead of predictions and maps)

and ``report.html`` beside them (the ``predict_report`` rule). The scans tables carry every per-image
column of the run's predictions (with ``--calibrate-on``, of ``predictions_calibrated.tsv``: ``role``
and ``predicted_calibrated`` too); a copy of the preprocessed images gives each image a file to
stand on with ``--maps none``. Everything else the run made (the arrays, each fold's predictions, the
group maps, test-retest tables, logs, the unpacked package, Snakemake's state) stays in the work folder
(config ``work_dir``). ``bids-validator-deno`` finds no error in the dataset
(``tests/test_package_workflow.py``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config, channel_names
from pipeline.common.errors import InputError
from pipeline.common.paths import predicted_labels, preprocessed
from pipeline.common.tables import read_tsv
from pipeline.intake.derivatives import bids_uri, dataset_description
from pipeline.intake.publish import link_or_copy
from pipeline.results import bidsout

REPORT = "report.html"
IGNORED = (*bidsout.IGNORED, REPORT)  # .bidsignore: the maps (no BIDS suffix yet) and the HTML report
PATH_COLUMNS = ("predicted_labels", "predicted_labels_native")  # work-folder paths: the copies replace them
HERE = ""  # the BIDS URI dataset name of the dataset itself: bids::sub-…


def readme(name: str, spec: dict, methods: list[str]) -> str:
    segmentation = spec["task"] == "segmentation"
    lines = [f"{'Label maps' if segmentation else 'Predictions of ' + spec['target'] + ' (' + spec['task'] + ')'} "
             f"by the model package {name} (bids-deepstudy apply),",
             "the ensemble of its fold networks applied to each selected image of the raw dataset.", "",
             "- report.html: the predictions, maps, test-retest and quality control on one page (see .bidsignore).",
             "- participants.tsv: one row per participant"
             + (", its images' label maps' count." if segmentation else ", the mean prediction over its images."),
             "- sub-*/[ses-*/]*_scans.tsv: each file of the folder with its image's "
             + ("scores." if segmentation else "prediction."),
             "- sub-*/[ses-*/]anat/*_desc-preproc_<channel>.nii.gz: the image as the networks saw it (template grid)."]
    if segmentation:
        lines.append("- sub-*/[ses-*/]anat/*_desc-predicted_dseg.nii.gz: the folds' majority vote, on the template "
                     "grid and the image's own grid; labels " + ", ".join(f"{k} {c}" for k, c in
                                                                           enumerate(spec["classes"])) + ".")
    elif methods:
        lines.append(f"- sub-*/[ses-*/]anat/*_desc-<method>_saliency.nii.gz: attribution maps ({', '.join(methods)}),"
                     " the mean over the folds' networks, on the template grid and the image's own grid. BIDS has no "
                     "suffix for such maps yet: .bidsignore declares them.")
    lines.append("Each .tsv has a .json data dictionary; each image's .json sidecar names its sources.")
    return "\n".join(lines) + "\n"


def write_dataset(root: Path, raw_dir: Path, name: str, spec: dict, methods: list[str]) -> None:
    """``root``'s description (sources: the raw dataset), README and .bidsignore."""
    root.mkdir(parents=True, exist_ok=True)
    what = (f"{'Label maps' if spec['task'] == 'segmentation' else 'Predictions'} of the model package {name}, "
            "applied to the raw dataset's images after the package's preprocessing")
    description = dataset_description(raw_dir, f"{name} applied", what)
    atomic.write_text(root / "dataset_description.json", json.dumps(description, indent=2) + "\n")
    atomic.write_text(root / "README", readme(name, spec, methods))
    atomic.write_text(root / ".bidsignore", "".join(f"{pattern}\n" for pattern in IGNORED))


def copy_preprocessed(root: Path, preproc_dir: Path, manifest: pd.DataFrame, channels: list[str]) -> dict[str, list[Path]]:
    """Each image's preprocessed channels (NIfTI and sidecar) from the work folder into ``root``,
    under the same names (hard links where they share a file system, else copies); the images by id."""
    copied: dict[str, list[Path]] = {}
    for row in manifest.itertuples(index=False):
        source = preprocessed(str(preproc_dir), row.subdir, row.image_id, channels)
        target = preprocessed(str(root), row.subdir, row.image_id, channels)
        for channel in channels:
            Path(target[f"image_{channel}"]).parent.mkdir(parents=True, exist_ok=True)
            for role in (f"image_{channel}", f"sidecar_{channel}"):
                link_or_copy(Path(source[role]), Path(target[role]))
            copied.setdefault(row.image_id, []).append(Path(target[f"image_{channel}"]))
    return copied


def copy_maps(root: Path, index: Path, manifest: pd.DataFrame, raw_dir: Path, channels: list[str],
              folds: int) -> dict[str, list[Path]]:
    """The fold-mean maps of ``index`` (``maps.tsv``: image_id, method, template, native) under
    ``root`` with BIDS names and sidecars (``bidsout.write_maps``); the maps by image id."""
    table, written = read_tsv(index), {}
    for space in ("template", "native"):
        maps: dict[str, dict[str, nib.Nifti1Image]] = {}
        for row in table.itertuples(index=False):
            maps.setdefault(row.method, {})[row.image_id] = nib.load(getattr(row, space))
        for image_id, paths in bidsout.write_maps(root, maps, space, manifest, raw_dir, root, channels, folds,
                                                  preproc_key=HERE).items():
            written.setdefault(image_id, []).extend(paths)
    return written


def copy_labels(root: Path, predictions: pd.DataFrame, manifest: pd.DataFrame, raw_dir: Path, channels: list[str],
                classes: list[str]) -> dict[str, list[Path]]:
    """A segmentation package's label maps (``predicted_labels[_native]`` of ``predictions``) under
    ``root`` with BIDS names and sidecars; the maps by image id."""
    rows, written = manifest.set_index("image_id"), {}
    for row in predictions.itertuples(index=False):
        subdir, raw = rows.at[row.image_id, "subdir"], rows.at[row.image_id, "path"]
        targets = predicted_labels(str(root), subdir, row.image_id, channels[0])
        source = preprocessed(str(root), subdir, row.image_id, channels)[f"image_{channels[0]}"]
        for space, column in (("template", "predicted_labels"), ("native", "predicted_labels_native")):
            path = Path(targets[space])
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.copyfile(getattr(row, column), path)
            sidecar = {"Description": "Label map: the majority vote of the package's fold networks"
                                      + (", carried to the image's own grid" if space == "native" else ""),
                       "Labels": {str(k): c for k, c in enumerate(classes)},
                       "Sources": [bids_uri(raw, raw_dir), bids_uri(source, root, HERE)],
                       # BIDS requires the image a map in a non-template space is aligned to.
                       **({"SpatialReference": bids_uri(raw, raw_dir)} if space == "native" else {})}
            atomic.write_text(path.with_name(path.name.replace(".nii.gz", ".json")), json.dumps(sidecar, indent=2) + "\n")
            written.setdefault(row.image_id, []).append(path)
    return written


def write_output(out_dir: Path, config: dict, spec: dict, manifest: Path, preproc_dir: Path, predictions: Path,
                 maps_index: Path | None = None) -> Path:
    """Write apply's output dataset ``out_dir``: description, the preprocessed images, the maps or
    label maps, participants and scans tables (``spec``: the package's; ``config``: the run's)."""
    raw_dir, channels = Path(config["bids_dir"]), channel_names(config)
    name = config["apply"].get("name") or config["apply"]["package"]
    segmentation = spec["task"] == "segmentation"
    methods = [] if segmentation or maps_index is None else list(config["explain"]["methods"])
    table, images = read_tsv(manifest), read_tsv(predictions)
    table = table[table["image_id"].isin(images["image_id"])]
    write_dataset(out_dir, raw_dir, name, spec, methods)
    files = copy_preprocessed(out_dir, preproc_dir, table, channels)
    made = (copy_labels(out_dir, images, table, raw_dir, channels, list(spec["classes"])) if segmentation
            else copy_maps(out_dir, maps_index, table, raw_dir, channels, len(spec["folds"])) if maps_index else {})
    for image_id, paths in made.items():
        files.setdefault(image_id, []).extend(paths)
    images = images.drop(columns=[c for c in PATH_COLUMNS if c in images])
    if segmentation:  # no prediction to average per participant: the table lists its images
        images = images[["participant_id", *[c for c in images if c != "participant_id"]]]
    tables = bidsout.write_predictions(out_dir, images, table, files, per_participant_means=not segmentation)
    print(f"{sum(map(len, files.values()))} files of {len(files)} images; {len(tables)} tables in {out_dir}",
          file=sys.stderr)
    return out_dir


def main(argv=None) -> None:
    from pipeline.common import package

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)  # bids_dir, channels, apply (package, name), explain.methods
    parser.add_argument("--manifest", type=Path, required=True, help="samples.tsv of the run")
    parser.add_argument("--preproc-dir", type=Path, required=True, help="the preprocessed images (work folder)")
    parser.add_argument("--predictions", type=Path, required=True,
                        help="the ensemble's predictions (predictions.tsv, or predictions_calibrated.tsv)")
    parser.add_argument("--maps-index", type=Path, help="maps.tsv of the fold-mean maps (omitted: no maps)")
    parser.add_argument("--out-dir", type=Path, required=True, help="OUTPUT_DIR: the derivative dataset")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        spec = package.load(Path(args.config["apply"]["package"])).spec
        write_output(args.out_dir, args.config, spec, args.manifest, args.preproc_dir, args.predictions,
                     args.maps_index)


if __name__ == "__main__":
    main()
