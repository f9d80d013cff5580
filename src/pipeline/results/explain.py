"""Explanation maps of the test images, per fold and across folds, in template and native space.

``fold``: for every test image and method (see ``pipeline.results.attribution``), the map on the study
grid (``…_space-MNI152NLin2009aSym_desc-<method>_saliency.nii.gz``) and on the image's native grid
through the inverse preprocessing transform (``…_space-<reference>_desc-<method>_saliency.nii.gz``),
plus the fold's group maps; ``maps.tsv`` indexes them (with IG's completeness error).

``group``: each image's maps averaged over folds, then over a participant's images, then per method
over participants: ``mean`` (mean |attribution|: importance), ``sd`` (of |attribution|) and ``t``
(one-sample t of the attribution: consistency of its sign; of the magnitude for unsigned methods); a
region table ranking the atlas regions (config ``explain.atlas``, else ``pipeline.results.atlas``) by mean
|attribution|;
glass-brain and slice PNGs; PNGs of the three best and three worst predicted subjects;
``retest_predictions.tsv`` with ``--retest`` (``pipeline.results.retest``: per pair of test images of
a participant scanned twice, their predictions' difference and their maps' similarity); and
``validation.tsv``, one row per method: its randomisation and consistency checks
(``pipeline.results.sanity``), given the ground truth of a simulated cohort how much of its top 5 %
falls in the true effect relative to chance, and the ``reading`` a reader acts on.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.cli import add_config, add_device, add_fold, channel_names
from pipeline.common.errors import InputError
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.device import for_inference
from pipeline.learning.loader import load_batch, mean_training_image
from pipeline.results.attribution import Settings, attribute
from pipeline.results.mapfigures import plot_extremes, plot_group
from pipeline.results.maps import FoldMeanMaps, combine_by_class, combine_folds, target_index, write_maps
from pipeline.results import sanity
from pipeline.results.retest import retest_table
from pipeline.results.validation import per_method, validation_table
from pipeline.learning.saved import load_model, predicting_expected_value


def explain_fold(table: pd.DataFrame, model_path: Path, grid_mask: Path, preproc_dir: Path, out_dir: Path,
                 methods: list[str], settings: Settings, channels: list[str], target_class: str | None = None,
                 sanity_images: int = 1, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Write every test image's maps and the fold's group maps (``pipeline.results.maps.write_maps``),
    and the randomisation check of the first ``sanity_images`` test images (``randomisation.tsv``,
    ``pipeline.results.sanity``); return the index of written maps. The model runs on ``device``;
    the maps are written from the CPU."""
    model, coder, _ = load_model(model_path, device)
    model = predicting_expected_value(model, coder)  # a kept soft-label bins head: explain the prediction
    grid = nib.load(str(grid_mask))
    affine, brain = grid.affine, np.asarray(grid.dataobj) > 0
    classification = coder.task == "classification"
    checks = []
    train_mean = mean_training_image(table)

    def maps_of(i: int, row) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
        x = load_batch([row.array])
        target = target_index(model, x, coder, target_class)
        maps, diagnostics = attribute(model, x, target, methods, settings, train_mean[None],
                                      classification=classification)
        if i <= sanity_images:
            checks.extend(sanity.randomisation_rows(model, x, target, methods, settings, train_mean[None],
                                                    classification, brain, row.image_id))
        error = diagnostics.get("completeness_error")
        return maps, {m: {"target_index": target, "completeness_error": error if m == "integrated_gradients" else None}
                      for m in maps}

    index = write_maps(table[table["split"] == "test"], maps_of, affine, preproc_dir, channels, out_dir, methods,
                       ids=("image_id", "participant_id", "subdir"))
    atomic.to_csv(pd.DataFrame(checks, columns=sanity.COLUMNS), out_dir / "randomisation.tsv", sep="\t", index=False,
                  float_format="%.4g")
    return index


def explain_group(fold_dirs: list[Path], manifest: Path, predictions: Path, preproc_dir: Path, template: Path,
                  mask: Path, out_dir: Path, config: dict, retest: Path | None = None) -> pd.DataFrame:
    """Every test image's maps averaged over the folds (``fold_dirs``), then over a participant's
    images, then per method over participants: the group statistics and region table
    (``combine_folds``), per true class for classification (``classes/``), the PNGs, the test-retest
    table ``retest``, and ``validation.tsv`` (the randomisation and consistency checks, the ground
    truth's enrichment where config ``explain.groundtruth`` names one, the ``reading``), which it
    returns. ``config``: the stage's (channels, explain, target, task)."""
    explain, channels = config["explain"], channel_names(config)
    methods = explain["methods"]
    groundtruth = Path(explain["groundtruth"]) if explain["groundtruth"] else None
    grid_mask = nib.load(str(mask))
    template_maps = {m: FoldMeanMaps(fold_dirs, m, "template") for m in methods}
    means = combine_folds(template_maps, grid_mask, out_dir, explain["atlas"])
    plot_group(out_dir, template, methods, len(fold_dirs))
    images = read_tsv(manifest)
    predicted = read_tsv(predictions).merge(images[["image_id", "subdir"]], on="image_id")
    if config["task"] == "classification":
        true_class = dict(zip(predicted["image_id"], predicted["true"].astype(str)))
        by_class = combine_by_class(template_maps, true_class, grid_mask, out_dir / "classes")
        atomic.to_csv(by_class, out_dir / "classes" / "classes.tsv", sep="\t", index=False, float_format="%.4g")
    if retest:
        pairs = retest_table(predicted, template_maps, np.asarray(grid_mask.dataobj))
        atomic.to_csv(pairs, retest, sep="\t", index=False)
        print(f"test-retest: {len(pairs)} pair(s) of one participant's test images in {retest}", file=sys.stderr)
    plot_extremes(predicted, template_maps[methods[0]], preproc_dir, channels, methods[0],
                  out_dir / "subjects_best_worst.png")
    steps, checks = sanity.study_tables(fold_dirs, methods, np.asarray(grid_mask.dataobj) > 0)
    atomic.to_csv(steps, out_dir / "randomisation.tsv", sep="\t", index=False, float_format="%.4g")
    table = checks
    if groundtruth:
        table = per_method(validation_table(fold_dirs, template_maps, means, grid_mask, groundtruth, config["target"],
                                            images)).merge(checks, on="method", how="left")
    table["reading"] = [sanity.reading(row["random_verdict"], row["consistency_verdict"],
                                       row.get("enrichment_template_group")) for _, row in table.iterrows()]
    atomic.to_csv(table, out_dir / "validation.tsv", sep="\t", index=False, float_format="%.4g")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fold = commands.add_parser("fold", help="maps of the test images by one fold's model")
    add_fold(fold)
    add_config(fold)  # channels, explain
    fold.add_argument("--model", type=Path, required=True)
    fold.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    fold.add_argument("--out-dir", type=Path, required=True)
    fold.add_argument("--threads", type=int, default=1)
    add_device(fold)
    group = commands.add_parser("group", help="group statistics over folds and subjects, tables and PNGs")
    group.add_argument("fold_dirs", type=Path, nargs="+")
    group.add_argument("--manifest", type=Path, required=True)
    group.add_argument("--predictions", type=Path, required=True, help="the ensemble's test predictions")
    group.add_argument("--preproc-dir", type=Path, required=True)
    add_config(group)  # channels, explain (methods, groundtruth), target
    group.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    group.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    group.add_argument("--out-dir", type=Path, required=True)
    group.add_argument("--retest", type=Path, help="retest_predictions.tsv to write: per pair of one participant's "
                                                   "test images, the predictions' difference and the maps' similarity")
    args = parser.parse_args(argv)
    explain = args.config["explain"]
    with InputError.exit_cleanly():
        if args.command == "fold":
            device = for_inference(args.device)  # `device: cuda` without a GPU fails before any work
            torch.set_num_threads(args.threads)
            settings, channels = Settings.of(explain), channel_names(args.config)
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, channels)
            explain_fold(table, args.model, args.mask, args.preproc_dir, args.out_dir, explain["methods"], settings,
                         channels, explain["target_class"] or args.config["positive_class"],
                         explain["sanity_images"], device)
            print(json.dumps(asdict(settings)), file=sys.stderr)
        else:
            table = explain_group(args.fold_dirs, args.manifest, args.predictions, args.preproc_dir, args.template,
                                  args.mask, args.out_dir, args.config, args.retest)
            print(table.to_string(index=False), file=sys.stderr)

if __name__ == "__main__":
    main()
