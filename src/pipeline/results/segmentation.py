"""Evaluation of a segmentation study (``task: segmentation``), called by ``pipeline.results.evaluate``.

Per image and label (every label but 0, the background): Dice and the 95th-percentile Hausdorff
distance in mm (MONAI's ``compute_dice`` and ``compute_hausdorff_distance`` with the grid's voxel
spacing) between the predicted and the preprocessed true label map on the template grid, and
(``native_dice_*``, ``native_hd95_*``) between the predicted map carried back to the image's
native grid and the dataset's own label image there. ``dice_mean`` is the mean Dice over labels. Test metrics are means over images with 95 %
bootstrap intervals over participants (``metrics.mean_intervals``). A label absent from the true or
the predicted map of an image has an undefined HD95 (NaN, left out of the means); its Dice is 0
when only one of the two maps has it, NaN (left out) when neither has.

``fold``: one fold's model on its validation and test images → ``predictions.tsv`` (one row per
image: ids, subdir, split, ``dice_<label>``, ``hd95_<label>``, ``dice_mean``, the true label array and
the predicted maps), ``metrics.json`` (test set), and the predicted label maps under ``labels/``:
uint8 NIfTI on the template grid (its affine) and on the image's native reference grid (the
inverse transform of preprocessing, nearest label).
``summary``: per-fold rows, their mean and sd, and the ensemble (voxel-wise majority vote of the
folds' label maps; ties go to the lowest label) with intervals → ``metrics.tsv``,
``predictions.tsv``, ``metrics.json``, the ensemble's maps under ``labels/`` (template grid, and
native grid: the vote of the folds' native-grid maps) and ``performance.png`` (per-image Dice and
HD95 per label). A segmentation package applied to new images (``pipeline.sharing.segpredict``)
uses the same ``predict_maps`` and ``ensemble_row``, so its maps are evaluation's.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.tables import read_tsv
from pipeline.learning.device import model_device
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.results.metrics import COLUMNS as METRIC_COLUMNS, mean_intervals
from pipeline.common.paths import predicted_labels
from pipeline.common.paths import derivative_paths
from pipeline.learning.losses import label_dice
from pipeline.intake.geometry import to_native

HD_PERCENTILE = 95


def label_scores(predicted: np.ndarray, true: np.ndarray, names: list[str], spacing) -> dict[str, float]:
    """Dice and HD95 (mm) of labels 1..K-1 (``names[k]`` is label k) of two (X, Y, Z) integer maps;
    ``spacing`` is the voxel size (mm) per axis. Returns ``dice_<name>``, ``hd95_<name>`` (NaN where
    undefined, see the module docstring) and ``dice_mean``, the mean of the defined Dice values."""
    from monai.metrics import compute_hausdorff_distance
    from monai.networks.utils import one_hot

    k = len(names)
    if max(int(predicted.max()), int(true.max())) >= k:
        raise InputError(f"A label map holds label {max(int(predicted.max()), int(true.max()))}, but only {k} labels "
                         f"are named ({', '.join(names)}).")
    maps = [torch.as_tensor(m.astype(np.int64))[None, None] for m in (predicted, true)]
    dice = label_dice(*maps, k)[0]
    pred, ref = (one_hot(m, k) for m in maps)
    in_pred, in_ref = pred.flatten(2).any(2)[0, 1:], ref.flatten(2).any(2)[0, 1:]
    present = in_pred & in_ref  # HD95 needs the label in both
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns about a label absent from one map: NaN below
        hd = compute_hausdorff_distance(pred, ref, include_background=False, percentile=HD_PERCENTILE,
                                        spacing=[float(s) for s in spacing])[0]
    scores = {}
    for i, name in enumerate(names[1:]):
        scores[f"dice_{name}"] = float(dice[i])
        scores[f"hd95_{name}"] = float(hd[i]) if bool(present[i]) else float("nan")
    dices = [scores[f"dice_{n}"] for n in names[1:]]
    scores["dice_mean"] = float(np.nanmean(dices)) if not np.all(np.isnan(dices)) else float("nan")
    return scores


def score_columns(predictions: pd.DataFrame) -> list[str]:
    """The per-image score columns: every ``dice_*`` and ``hd95_*`` (``native_``: on the native grid)."""
    return [c for c in predictions.columns if c.startswith(("dice_", "hd95_", "native_dice_", "native_hd95_"))]


def native_scores(predicted_path: str, label_path: str, names: list[str]) -> dict[str, float]:
    """``label_scores`` on the image's native grid, prefixed ``native_``: the predicted label map
    carried back there against the dataset's own label image (resampled, nearest label, onto
    that grid when it lies on another)."""
    from nilearn.image import resample_to_img

    predicted, true = nib.load(predicted_path), nib.load(label_path)
    if true.shape[:3] != predicted.shape[:3] or not np.allclose(true.affine, predicted.affine, atol=1e-3):
        true = resample_to_img(true, predicted, interpolation="nearest", force_resample=True, copy_header=True)
    scores = label_scores(np.asarray(predicted.dataobj), np.rint(np.asarray(true.dataobj)).astype(np.int64).reshape(
        predicted.shape[:3]), names, predicted.header.get_zooms()[:3])
    return {f"native_{k}": v for k, v in scores.items()}


def summary_scores(predictions: pd.DataFrame) -> dict:
    """Means over images of every ``dice_*`` and ``hd95_*`` column (HD95: over the images where defined)."""
    with warnings.catch_warnings():  # a label never in both maps: its HD95 mean is NaN
        warnings.simplefilter("ignore")
        return {"n": int(len(predictions)),
                **{c: float(np.nanmean(predictions[c].astype(float))) for c in score_columns(predictions)}}


@torch.no_grad()
def predict_maps(model, names: list[str], table: pd.DataFrame, preproc_dir: Path, channels: list[str],
                 out_dir: Path, native: bool = True) -> pd.DataFrame:
    """Label maps of every row of ``table`` (rows with ``array``, ``path`` and, to be scored,
    ``label_array`` and ``label``) and their scores; the maps are written under ``out_dir/labels``
    (template grid and, with ``native``, native grid). Without ``label_array`` (apply mode without
    label images) the rows have no scores and no ``true_labels*``."""
    truth = "label_array" in table
    rows = []
    for row in table.itertuples():
        grid = nib.load(str(derivative_paths(preproc_dir, row.subdir, row.image_id, channels)[f"image_{channels[0]}"]))
        x = load_batch([row.array]).to(model_device(model))  # the model's device; the labels come back
        predicted = model(x)[0].argmax(0).cpu().numpy().astype(np.uint8)
        paths = predicted_labels(str(out_dir / "labels"), row.subdir, row.image_id, channels[0])
        Path(paths["template"]).parent.mkdir(parents=True, exist_ok=True)
        image = nib.Nifti1Image(predicted, grid.affine)
        atomic.nib_save(image, paths["template"])
        if native:
            inverse = derivative_paths(preproc_dir, row.subdir, row.image_id, channels)["inverse"]
            warped = to_native(image, Path(row.path), inverse, interpolator="genericLabel")
            atomic.nib_save(nib.Nifti1Image(np.rint(warped.get_fdata()).astype(np.uint8), warped.affine), paths["native"])
        scores = label_scores(predicted, np.load(row.label_array)[0], names, grid.header.get_zooms()[:3]) if truth else {}
        on_native = native_scores(paths["native"], row.label, names) if native and truth and "label" in table else {}
        rows.append({"participant_id": row.participant_id, "session": row.session, "image_id": row.image_id,
                     "subdir": row.subdir, **({"split": row.split} if "split" in table else {}), **scores, **on_native,
                     **({"true_labels": row.label_array, "true_labels_native": getattr(row, "label", "")} if truth else {}),
                     "predicted_labels": paths["template"],
                     "predicted_labels_native": paths["native"] if native else ""})
    return pd.DataFrame(rows)


def evaluate_fold(table: pd.DataFrame, model, coder, record: dict, preproc_dir: Path, channels: list[str],
                  out_dir: Path) -> dict:
    """Label maps and scores of one fold's validation and test images; ``predictions.tsv`` and the
    test ``metrics.json`` (with intervals) in ``out_dir``."""
    if "label_array" not in table:
        raise InputError("Evaluating a segmentation model needs the study's label images: set config `label_image`.")
    predictions = predict_maps(model, coder.classes, table[table["split"].isin(["val", "test"])], preproc_dir,
                               channels, out_dir)
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    intervals = mean_intervals(test, score_columns(test))
    grid = nib.load(str(derivative_paths(preproc_dir, table["subdir"].iloc[0], table["image_id"].iloc[0],
                                         channels)[f"image_{channels[0]}"]))
    metrics = {"task": coder.task, "target": record["target"], "classes": coder.classes, "best_epoch": record["epoch"],
               "spacing_mm": [float(s) for s in grid.header.get_zooms()[:3]],
               **summary_scores(test), **{f"{k}_ci": v for k, v in intervals.items()}}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.to_csv(predictions, out_dir / "predictions.tsv", sep="\t", index=False)
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def majority(maps: list[np.ndarray], k: int) -> np.ndarray:
    """Voxel-wise most frequent label of integer ``maps`` (ties: the lowest label)."""
    votes = np.stack([(np.stack(maps) == label).sum(0) for label in range(k)])
    return votes.argmax(0).astype(np.uint8)


def vote(folds: list[pd.DataFrame], image_id: str, column: str, k: int, path: str) -> np.ndarray:
    """Write the majority vote of the folds' label maps of ``image_id`` (paths in ``column``, one
    grid) to ``path``; return it."""
    images = [nib.load(p.loc[image_id, column]) for p in folds]
    if any(img.shape != images[0].shape or not np.allclose(img.affine, images[0].affine) for img in images):
        raise InputError(f"The folds' label maps of {image_id} ({column}) are on different grids; "
                         "rerun the evaluation of every fold.")
    voted = majority([np.asarray(img.dataobj) for img in images], k)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic.nib_save(nib.Nifti1Image(voted, images[0].affine), path)
    return voted


def ensemble_row(folds: list[pd.DataFrame], image_id: str, names: list[str], spacing, out_dir: Path,
                 native: bool) -> dict:
    """The ensemble of one image: the majority vote of the folds' label maps (``folds``: their
    ``predict_maps`` rows indexed by image id) written under ``out_dir/labels`` on the template grid
    and, with ``native``, the vote of the folds' native-grid maps; scored (template grid, voxel
    ``spacing`` in mm, and native grid) where the folds recorded the true labels."""
    first = folds[0].loc[image_id]
    paths = predicted_labels(str(out_dir / "labels"), first["subdir"], image_id)
    voted = vote(folds, image_id, "predicted_labels", len(names), paths["template"])
    truth = first.get("true_labels")
    scored = isinstance(truth, str) and bool(truth)
    row = {"participant_id": first["participant_id"], "session": first["session"], "image_id": image_id,
           "subdir": first["subdir"], **(label_scores(voted, np.load(truth)[0], names, spacing) if scored else {}),
           **({"true_labels": truth} if scored else {}), "predicted_labels": paths["template"]}
    if native:
        vote(folds, image_id, "predicted_labels_native", len(names), paths["native"])
        row["predicted_labels_native"] = paths["native"]
        if isinstance(first.get("true_labels_native"), str) and first["true_labels_native"]:
            row.update(native_scores(paths["native"], first["true_labels_native"], names))
    return row


def summarise(fold_dirs: list[Path], out_dir: Path, excluded: Path | None = None) -> dict:
    """Per-fold test metrics, their mean and sd, and the majority-vote ensemble's with intervals
    (on the template grid, and on the native grid where the folds recorded native label images);
    ``excluded`` as in ``pipeline.results.evaluate.summarise``."""
    from pipeline.results.summary import excluded_by_stage, summary_table

    metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    names, spacing = metrics[0]["classes"], metrics[0]["spacing_mm"]
    folds = [read_tsv(d / "predictions.tsv") for d in fold_dirs]
    folds = [p[p["split"] == "test"].set_index("image_id") for p in folds]
    ids = sorted(folds[0].index)
    if any(sorted(p.index) != ids for p in folds):
        raise InputError(f"The folds predicted different test images ({', '.join(map(str, fold_dirs))}); "
                         "rerun the evaluation of every fold.")
    native = all("predicted_labels_native" in p and (p["predicted_labels_native"].fillna("") != "").all()
                 for p in folds)
    rows = [ensemble_row(folds, image_id, names, spacing, out_dir, native) for image_id in ids]
    combined = pd.DataFrame(rows)
    fold_names = [d.name for d in fold_dirs]
    overall = {**summary_scores(combined),
               **{f"{k}_ci": v for k, v in mean_intervals(combined, score_columns(combined)).items()}}
    table, summary = summary_table(metrics, fold_names, overall)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.to_csv(summary, out_dir / "metrics.tsv", sep="\t", meanings=METRIC_COLUMNS)
    atomic.to_csv(combined, out_dir / "predictions.tsv", sep="\t", index=False)
    result = {"task": metrics[0]["task"], "target": metrics[0]["target"], "classes": names, "folds": fold_names,
              "ensemble": overall, "fold_mean": table.mean().to_dict(), "fold_sd": table.std().to_dict()}
    if excluded is not None:
        result["excluded"] = excluded_by_stage(excluded)
    atomic.write_text(out_dir / "metrics.json", json.dumps(result, indent=2, default=float))
    plot(combined, names, f"Majority vote of {len(fold_names)} fold(s), test set", out_dir / "performance.png")
    return result


def plot(predictions: pd.DataFrame, names: list[str], title: str, png: Path) -> None:
    """Per-image Dice and HD95 of each label (box plots with the images as points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = names[1:]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, unit in zip(axes, ("dice", "hd95"), ("", " (mm)")):
        values = [predictions[f"{metric}_{n}"].astype(float).dropna().to_numpy() for n in labels]
        ax.boxplot(values, tick_labels=labels)
        for i, v in enumerate(values, 1):
            ax.scatter(np.full(len(v), i), v, s=10, color="k", alpha=0.6)
        ax.set(ylabel=f"{metric.upper()}{unit}", title=f"{metric.upper()} per label: {title}")
    fig.tight_layout()
    atomic.savefig(fig, png, dpi=100)
    plt.close(fig)
