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
glass-brain and slice PNGs; PNGs of the three best and three worst predicted subjects; and, given
the ground truth of a simulated cohort, ``validation.tsv``: how much of each method's top 5 % falls
in the true effect, relative to chance.
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
from pipeline.common.paths import derivative_paths
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.device import for_inference
from pipeline.learning.loader import load_batch
from pipeline.results.attribution import SIGNED, Settings, attribute, settings_of
from pipeline.results.mapfigures import plot_extremes, plot_group
from pipeline.results.maps import (FoldMeanMaps, GroupStatistics, combine_by_class, combine_folds, save_image_maps,
                                   target_index, write_statistics)
from pipeline.results import sanity
from pipeline.results.validation import validation_table
from pipeline.learning.saved import load_model


def mean_training_image(table: pd.DataFrame) -> torch.Tensor:
    """The mean (C, X, Y, Z) image of the fold's training rows (integrated gradients' baseline),
    summed one image at a time in float64 (memory of one image, whatever the cohort)."""
    paths = table.loc[table["split"] == "train", "array"]
    total = None
    for path in paths:
        image = load_batch([path])[0].double()
        total = image if total is None else total.add_(image)
    return (total / len(paths)).float()


def explain_fold(table: pd.DataFrame, model_path: Path, grid_mask: Path, preproc_dir: Path, out_dir: Path,
                 methods: list[str], settings: Settings, channels: list[str], target_class: str | None = None,
                 sanity_images: int = 1, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Write every test image's maps and the fold's group maps, and the randomisation check of the
    first ``sanity_images`` test images (``randomisation.tsv``, ``pipeline.results.sanity``);
    return the index of written maps. The model runs on ``device``; the maps are written from the CPU."""
    model, coder, _ = load_model(model_path, device)
    grid = nib.load(str(grid_mask))
    affine, brain = grid.affine, np.asarray(grid.dataobj) > 0
    checks = []
    test = table[table["split"] == "test"]
    train_mean = mean_training_image(table)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    groups = {m: GroupStatistics(SIGNED[m]) for m in methods}
    rows = []
    for i, row in enumerate(test.itertuples(index=False), 1):
        x = load_batch([row.array])
        target = target_index(model, x, coder, target_class)
        maps, diagnostics = attribute(model, x, target, methods, settings, train_mean[None],
                                      classification=coder.task == "classification")
        inverse = derivative_paths(preproc_dir, row.subdir, row.image_id, channels)["inverse"]
        written = save_image_maps(maps, row, affine, inverse, out_dir, channels[0], groups)
        if i <= sanity_images:
            checks += sanity.randomisation_rows(model, x, target, methods, settings, train_mean[None],
                                                coder.task == "classification", brain, row.image_id)
        for method, paths in written.items():
            error = diagnostics.get("completeness_error") if method == "integrated_gradients" else None
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "subdir": row.subdir,
                         "method": method, "target_index": target, "completeness_error": error, **paths})
        print(f"[{i}/{len(test)}] {row.image_id}", file=sys.stderr)
    for method, group in groups.items():
        write_statistics(group, affine, out_dir, method)
    index = pd.DataFrame(rows)
    atomic.to_csv(index, out_dir / "maps.tsv", sep="\t", index=False)
    atomic.to_csv(pd.DataFrame(checks, columns=sanity.COLUMNS), out_dir / "randomisation.tsv", sep="\t", index=False,
                  float_format="%.4g")
    return index


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
    args = parser.parse_args(argv)
    explain, channels = args.config["explain"], channel_names(args.config)
    methods = explain["methods"]
    with InputError.exit_cleanly():
        if args.command == "fold":
            device = for_inference(args.device)  # `device: cuda` without a GPU fails before any work
            torch.set_num_threads(args.threads)
            settings = settings_of(explain)
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, channels)
            explain_fold(table, args.model, args.mask, args.preproc_dir, args.out_dir, methods, settings,
                         channels, explain["target_class"] or args.config.get("positive_class"),
                         explain["sanity_images"], device)
            print(json.dumps(asdict(settings)), file=sys.stderr)
        else:
            groundtruth = Path(explain["groundtruth"]) if explain["groundtruth"] else None
            mask = nib.load(str(args.mask))
            template_maps = {m: FoldMeanMaps(args.fold_dirs, m, "template") for m in methods}
            means = combine_folds(template_maps, mask, args.out_dir, explain.get("atlas"))
            plot_group(args.out_dir, args.template, methods, len(args.fold_dirs))
            manifest = read_tsv(args.manifest)
            predictions = read_tsv(args.predictions).merge(manifest[["image_id", "subdir"]], on="image_id")
            if args.config["task"] == "classification":
                true_class = dict(zip(predictions["image_id"], predictions["true"].astype(str)))
                by_class = combine_by_class(template_maps, true_class, mask, args.out_dir / "classes")
                atomic.to_csv(by_class, args.out_dir / "classes" / "classes.tsv", sep="\t", index=False,
                              float_format="%.4g")
            plot_extremes(predictions, template_maps[methods[0]], args.preproc_dir, channels,
                          methods[0], args.out_dir / "subjects_best_worst.png")
            steps, checks = sanity.study_tables(args.fold_dirs, methods, np.asarray(mask.dataobj) > 0)
            atomic.to_csv(steps, args.out_dir / "randomisation.tsv", sep="\t", index=False, float_format="%.4g")
            table = checks
            if groundtruth:
                table = validation_table(args.fold_dirs, template_maps, means, mask, groundtruth, args.config["target"],
                                         manifest).merge(checks, on="method", how="left")
            atomic.to_csv(table, args.out_dir / "validation.tsv", sep="\t", index=False, float_format="%.4g")
            print(table.to_string(index=False), file=sys.stderr)


if __name__ == "__main__":
    main()
