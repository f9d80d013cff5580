"""Explanation maps of the test images, per fold and across folds, in template and native space.

``fold``: for every test image and method (see ``pipeline.attribution``), the map on the study
grid (``…_space-MNI152NLin2009aSym_desc-<method>_saliency.nii.gz``) and on the image's native grid
through the inverse preprocessing transform (``…_space-<reference>_desc-<method>_saliency.nii.gz``),
plus the fold's group maps; ``maps.tsv`` indexes them (with IG's completeness error).

``group``: each subject's maps averaged over folds, then per method over subjects: ``mean`` (mean
|attribution|: importance), ``sd`` (of |attribution|) and ``t`` (one-sample t of the attribution:
consistency of its sign; of the magnitude for unsigned methods); a region table ranking the atlas
regions (``pipeline.atlas``) by mean |attribution|; glass-brain and slice PNGs; PNGs of the
three best and three worst predicted subjects; and, given the ground truth of a simulated cohort,
``validation.tsv``: how much of each method's top 5 % falls in the true effect, relative to chance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.results.atlas import atlas_on_grid
from pipeline.results.attribution import METHODS, SIGNED, Settings, attribute
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE, explanation_maps, group_map
from pipeline.common.paths import derivative_paths
from pipeline.intake.preprocess import to_native
from pipeline.intake.template import resample_to_grid
from pipeline.learning.saved import load_model

STATISTICS = ("mean", "sd", "t")


def target_index(model, x: torch.Tensor, coder, target_class: str | None = None) -> int:
    """Output to attribute: 0 for regression; for classification ``target_class`` (a class name)
    or, when None, the predicted class."""
    if coder.task != "classification":
        return 0
    if target_class is not None:
        if target_class not in coder.classes:
            raise InputError(f"`explain.target_class` {target_class!r} is not a class of the model "
                             f"({', '.join(coder.classes)}).")
        return coder.classes.index(target_class)
    with torch.no_grad():
        return int(model(x).argmax(1))


def top_fraction_enrichment(attribution: np.ndarray, region: np.ndarray, brain: np.ndarray, top: float = 0.05) -> float:
    """How many times more of the top ``top`` fraction of |attribution| in ``brain`` lies in ``region`` than chance."""
    values = np.abs(attribution[brain])
    cutoff = np.quantile(values, 1 - top)
    hits = region[brain][values >= cutoff].mean()
    chance = region[brain].mean()
    return float(hits / chance)


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
                 methods: list[str], settings: Settings, channels: list[str], target_class: str | None = None
                 ) -> pd.DataFrame:
    """Write every test image's maps and the fold's group maps; return the index of written maps."""
    model, coder, _ = load_model(model_path)
    affine = nib.load(str(grid_mask)).affine
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
        for method, paths in written.items():
            error = diagnostics.get("completeness_error") if method == "integrated_gradients" else None
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "subdir": row.subdir,
                         "method": method, "target_index": target, "completeness_error": error, **paths})
        print(f"[{i}/{len(test)}] {row.image_id}", file=sys.stderr)
    for method, group in groups.items():
        write_statistics(group, affine, out_dir, method)
    index = pd.DataFrame(rows)
    atomic.to_csv(index, out_dir / "maps.tsv", sep="\t", index=False)
    return index


def save_image_maps(maps: dict[str, np.ndarray], row, affine: np.ndarray, inverse: Path, out_dir: Path,
                    reference: str, groups: dict[str, "GroupStatistics"]) -> dict[str, dict[str, str]]:
    """Write one image's ``maps`` (by method) in template space (``affine``) and, through its
    ``inverse`` transform, on the native grid of ``row.path``; add each to its method's group
    statistics; return the written paths by method."""
    written = {}
    for method, data in maps.items():
        paths = explanation_maps(str(out_dir / "maps"), row.subdir, row.image_id, method, reference)
        Path(paths["template"]).parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(data, affine)
        atomic.nib_save(img, paths["template"])
        atomic.nib_save(to_native(img, Path(row.path), inverse), paths["native"])
        groups[method].add(data)
        written[method] = paths
    return written


class GroupStatistics:
    """Voxel-wise group statistics of maps added one at a time (Welford's running mean and sum of
    squared deviations, float64): memory of a few maps, not of the cohort. ``result()``: mean and
    sd of |map|, and the one-sample t of the map (``signed`` methods) or of |map|; t is 0 where the
    sd is 0."""

    def __init__(self, signed: bool):
        self.signed, self.n = signed, 0
        self.moments: dict[str, list[np.ndarray]] = {}  # "magnitude"/"values" -> [mean, M2]

    def add(self, data: np.ndarray) -> None:
        self.n += 1
        series = {"magnitude": np.abs(data)}
        if self.signed:
            series["values"] = data
        for key, x in series.items():
            x = np.asarray(x, dtype=np.float64)
            if key not in self.moments:
                self.moments[key] = [x.copy(), np.zeros_like(x)]
                continue
            mean, m2 = self.moments[key]
            delta = x - mean
            mean += delta / self.n
            m2 += delta * (x - mean)

    def sd(self, key: str) -> np.ndarray:
        mean, m2 = self.moments[key]
        return np.sqrt(m2 / (self.n - 1)) if self.n > 1 else np.zeros_like(mean)

    def result(self) -> dict[str, np.ndarray]:
        if self.n == 0:
            raise ValueError("Group statistics of no maps.")
        key = "values" if self.signed else "magnitude"
        sd = self.sd(key)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(sd > 0, self.moments[key][0] / (sd / np.sqrt(self.n)), 0.0)
        return {"mean": self.moments["magnitude"][0], "sd": self.sd("magnitude"), "t": t}


def statistics(maps, signed: bool) -> dict[str, np.ndarray]:
    """``GroupStatistics`` of an iterable of (X, Y, Z) maps (e.g. an (N, X, Y, Z) array)."""
    group = GroupStatistics(signed)
    for data in maps:
        group.add(data)
    return group.result()


def write_statistics(group: GroupStatistics, affine: np.ndarray, out_dir: Path, method: str) -> None:
    for name, data in group.result().items():
        atomic.nib_save(nib.Nifti1Image(data.astype(np.float32), affine), group_map(str(out_dir), method, name))


class FoldMeanMaps(Mapping):
    """Each test image's ``space`` ("template" or "native") map of ``method``, averaged over the
    folds, by image id; read from the folds' files when asked for, so that going through them all
    holds one image's maps at a time, not the test set's."""

    def __init__(self, fold_dirs: list[Path], method: str, space: str):
        indexes = [read_tsv(d / "maps.tsv") for d in fold_dirs]
        self.paths = {}  # image id -> that image's map from each fold
        for ix in indexes:
            for image_id, path in ix.loc[ix["method"] == method, ["image_id", space]].itertuples(index=False):
                self.paths.setdefault(image_id, []).append(path)
        if any(len(paths) != len(indexes) for paths in self.paths.values()):
            folds = ", ".join(map(str, fold_dirs))
            raise InputError(f"The folds' {method} maps are of different test images ({folds}); "
                             "rerun the explanation of every fold.")

    def __getitem__(self, image_id: str) -> nib.Nifti1Image:
        images = [nib.load(p) for p in self.paths[image_id]]
        mean = np.mean([np.asarray(img.dataobj, dtype=np.float32) for img in images], axis=0)
        return nib.Nifti1Image(mean, images[0].affine)

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def region_table(means: dict[str, np.ndarray], mask: nib.Nifti1Image) -> pd.DataFrame:
    """Atlas regions ranked by each method's mean |attribution|, relative to the brain's mean."""
    labels, names = atlas_on_grid(mask)
    brain = labels > 0
    table = pd.DataFrame({"region": names, "voxels": np.bincount(labels[brain], minlength=len(names) + 1)[1:]})
    for method, mean in means.items():
        per_region = np.bincount(labels[brain], weights=mean[brain], minlength=len(names) + 1)[1:] / table["voxels"]
        table[f"{method}_relative"] = per_region / mean[brain].mean()
        table[f"{method}_rank"] = table[f"{method}_relative"].rank(ascending=False, method="min").astype(int)
    first = next(iter(means))
    return table.sort_values(f"{first}_rank", kind="stable").reset_index(drop=True)


def validation_table(fold_dirs: list[Path], template_maps: dict[str, Mapping[str, nib.Nifti1Image]],
                     means: dict[str, np.ndarray], mask: nib.Nifti1Image, truth_dir: Path, target: str,
                     manifest: pd.DataFrame) -> pd.DataFrame:
    """Enrichment of each method's top 5 % in the true effect mask of ``target`` (a simulated cohort's
    ground truth): the group mean map and each subject's map (mean over subjects) on the study grid,
    and each subject's native-space map with the mask carried there by the simulated pose."""
    truth_path = truth_dir / f"space-{SPACE}_desc-{target}_mask.nii.gz"
    if not truth_path.exists():
        raise InputError(f"No ground-truth mask {truth_path} for target {target!r}; set `explain.groundtruth` "
                         "to a folder with space-<space>_desc-<target>_mask.nii.gz, or to null.")
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


def combine_folds(template_maps: dict[str, Mapping[str, nib.Nifti1Image]], mask: nib.Nifti1Image, out_dir: Path
                  ) -> dict[str, np.ndarray]:
    """Group statistics over subjects of the fold-averaged ``template_maps`` (method -> image id ->
    map); write them and the region table. Returns each method's mean |attribution| map."""
    out_dir.mkdir(parents=True, exist_ok=True)
    means = {}
    for method, maps in template_maps.items():
        group = GroupStatistics(SIGNED[method])
        for img in maps.values():
            group.add(np.asarray(img.dataobj))
        write_statistics(group, mask.affine, out_dir, method)
        means[method] = group.result()["mean"]
    atomic.to_csv(region_table(means, mask), out_dir / "regions.tsv", sep="\t", index=False, float_format="%.4g")
    return means


def plot_group(out_dir: Path, template: Path, methods: list[str], n_folds: int, images: str = "test set") -> None:
    """Glass-brain and orthogonal-slice PNGs of each method's group mean map over the study template."""
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    for method in methods:
        img = group_map(str(out_dir), method)
        vmax = float(np.quantile(nib.load(img).get_fdata(), 0.999)) or 1.0
        title = f"mean |{method}|, {images}, {n_folds} fold(s)"
        display = plotting.plot_stat_map(img, bg_img=str(template), title=title, threshold=vmax * 0.3,
                                         vmax=vmax, cmap="inferno", cut_coords=(0, -17, 15), draw_cross=False)
        atomic.savefig(display, str(out_dir / f"group_desc-{method}_slices.png"), dpi=90)
        display.close()
        display = plotting.plot_glass_brain(img, title=title, threshold=vmax * 0.3, vmax=vmax, cmap="inferno")
        atomic.savefig(display, str(out_dir / f"group_desc-{method}_glass.png"), dpi=90)
        display.close()


def prediction_error(predictions: pd.DataFrame) -> np.ndarray:
    """Per row: |predicted - true| (regression), or 1 - p(true class) (classification: p_<class> columns)."""
    if any(c.startswith("p_") for c in predictions.columns):
        return 1 - np.array([float(row[f"p_{row['true']}"]) for _, row in predictions.iterrows()])
    return (predictions["predicted"].astype(float) - predictions["true"].astype(float)).abs().to_numpy()


def plot_extremes(predictions: pd.DataFrame, maps: Mapping[str, nib.Nifti1Image], preproc_dir: Path,
                  channels: list[str], method: str, png: Path, n: int = 3) -> None:
    """The ``n`` best and ``n`` worst predicted test images (``predictions`` with their ``subdir``):
    each one's fold-mean ``method`` map (``maps``, by image id) over its preprocessed reference image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    error = prediction_error(predictions)
    order = np.argsort(error, kind="stable")
    chosen = [(i, "best") for i in order[:n]] + [(i, "worst") for i in order[::-1][:n]]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.6 * len(chosen)))
    for ax, (i, kind) in zip(np.atleast_1d(axes), chosen):
        row = predictions.iloc[i]
        background = derivative_paths(preproc_dir, row["subdir"], row["image_id"], channels)[f"image_{channels[0]}"]
        img = maps[row["image_id"]]
        vmax = float(np.quantile(np.abs(img.get_fdata()), 0.999)) or 1.0
        title = f"{kind}: {row['image_id']}  true {row['true']}  predicted {row['predicted']}  error {error[i]:.2f}"
        plotting.plot_stat_map(img, bg_img=str(background), axes=ax, title=title, threshold=0.3 * vmax, vmax=vmax,
                               cmap="cold_hot", draw_cross=False, display_mode="ortho", cut_coords=(0, -17, 15),
                               annotate=False)
    atomic.savefig(fig, png, dpi=80)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fold = commands.add_parser("fold", help="maps of the test images by one fold's model")
    fold.add_argument("--manifest", type=Path, required=True)
    fold.add_argument("--splits", type=Path, required=True)
    fold.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    fold.add_argument("--channels", nargs="+", default=["T1w"])
    fold.add_argument("--preproc-dir", type=Path, required=True)
    fold.add_argument("--model", type=Path, required=True)
    fold.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    fold.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    fold.add_argument("--settings", default="{}", help="JSON of pipeline.attribution.Settings fields")
    fold.add_argument("--target-class", help="class to explain (default: the predicted class)")
    fold.add_argument("--out-dir", type=Path, required=True)
    fold.add_argument("--threads", type=int, default=1)
    group = commands.add_parser("group", help="group statistics over folds and subjects, tables and PNGs")
    group.add_argument("fold_dirs", type=Path, nargs="+")
    group.add_argument("--manifest", type=Path, required=True)
    group.add_argument("--predictions", type=Path, required=True, help="the ensemble's test predictions")
    group.add_argument("--preproc-dir", type=Path, required=True)
    group.add_argument("--channels", nargs="+", default=["T1w"])
    group.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    group.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    group.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    group.add_argument("--target", required=True)
    group.add_argument("--groundtruth", type=Path, help="simulated cohort's ground-truth folder (validation)")
    group.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if args.command == "fold":
            torch.set_num_threads(args.threads)
            settings = Settings(**json.loads(args.settings))
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, args.channels)
            explain_fold(table, args.model, args.mask, args.preproc_dir, args.out_dir, args.methods, settings,
                         args.channels, args.target_class)
            print(json.dumps(asdict(settings)), file=sys.stderr)
        else:
            mask = nib.load(str(args.mask))
            template_maps = {m: FoldMeanMaps(args.fold_dirs, m, "template") for m in args.methods}
            means = combine_folds(template_maps, mask, args.out_dir)
            plot_group(args.out_dir, args.template, args.methods, len(args.fold_dirs))
            manifest = read_tsv(args.manifest)
            predictions = read_tsv(args.predictions).merge(manifest[["image_id", "subdir"]], on="image_id")
            plot_extremes(predictions, template_maps[args.methods[0]], args.preproc_dir, args.channels,
                          args.methods[0], args.out_dir / "subjects_best_worst.png")
            if args.groundtruth:
                table = validation_table(args.fold_dirs, template_maps, means, mask, args.groundtruth, args.target,
                                         manifest)
                atomic.to_csv(table, args.out_dir / "validation.tsv", sep="\t", index=False, float_format="%.4g")
                print(table.to_string(index=False), file=sys.stderr)


if __name__ == "__main__":
    main()
