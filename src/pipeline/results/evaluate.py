"""Predictions and scikit-learn metrics with bootstrap confidence intervals, per fold and over folds.

``fold``: one fold's model on its validation and test images → ``predictions.tsv`` (participant_id,
session, image_id, split, true, predicted [, predicted_corrected] [, p_<class>]) and
``metrics.json`` (test set). Metrics are over participants (``pipeline.results.participants``: a
participant's mean prediction over its images), with the image-level metrics under ``image_level``;
a binary target's positive class is ``positive_class`` (default: the last in sorted order). For
regression, the brain-age bias correction (a linear fit of predicted on true age on the validation
images, inverted) gives ``predicted_corrected`` and the ``corrected_*`` metrics beside the raw ones.
``summary``: every fold → ``metrics.tsv`` (one row per fold, their mean and sd, and the ensemble
with 95 % bootstrap intervals; over participants) and ``metrics_images.tsv`` (the same over
images), the ensemble's test ``predictions.tsv`` (one row per image: the folds' mean prediction
or mean class probabilities) and ``metrics.json``, and ``performance.png`` (regression: predicted
vs true, raw and corrected, and a Bland–Altman plot; classification: ROC, precision-recall and the
confusion matrix). With the folds' linear baselines (``pipeline.results.linear``): ``comparison.tsv``,
deep against linear per fold and for the ensembles, paired (``pipeline.results.compare``), the linear
ensemble in ``metrics.json``; with the folds' training folders: ``diagnostics.json``, every
finding of ``pipeline.results.diagnostics`` with its sentence.
Segmentation models (``task: segmentation``) are scored per label instead (Dice, HD95; predicted
label maps as NIfTI) by ``pipeline.results.segmentation``, into the same files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn import metrics as skm

from pipeline.common import atomic
from pipeline.common.cli import add_config, add_device, add_fold, channel_names
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.device import for_inference, model_device
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.results.metrics import COLUMNS as METRIC_COLUMNS
from pipeline.intake.classes import ordered
from pipeline.results.participants import by_participant, participant_metrics
from pipeline.results.summary import excluded_by_stage, summary_table
from pipeline.learning.saved import load_model


@torch.no_grad()
def predict(model, coder, table: pd.DataFrame, target: str | None) -> pd.DataFrame:
    """Predictions for every row of ``table``, keyed by its ids (and its ``split`` when present),
    with the ``true`` value of column ``target`` unless it is None.

    ``model`` takes whole images: a slice or patch model comes from ``load_model`` wrapped in
    ``sampler.ImageModel``, whose prediction is ``sampler.aggregate``, the mean of the network
    outputs over the image's views. One image per forward pass: CPU kernels round differently with
    the batch's size (~1e-7), and a prediction must not depend on which images share its batch, so
    that a model package applied to the same image reproduces the study's prediction exactly.
    Images go to the model's device, outputs come back to the CPU."""
    device = model_device(model)
    outputs = [model(load_batch([path]).to(device)).cpu() for path in table["array"]]
    decoded = coder.decode(torch.cat(outputs))
    keys = ["participant_id", "session", "image_id", *(["split"] if "split" in table else [])]
    out = table[keys].reset_index(drop=True)
    if target is not None:
        out["true"] = table[target].to_numpy()
    if coder.task == "classification":
        out["predicted"] = [coder.classes[i] for i in decoded.argmax(1)]
        for k, name in enumerate(coder.classes):
            out[f"p_{name}"] = decoded[:, k]
    else:
        if target is not None:
            out["true"] = out["true"].astype(float)
        out["predicted"] = decoded
    return out


def correct(predictions: pd.DataFrame, slope: float, intercept: float) -> pd.Series:
    """The bias-corrected prediction (predicted - intercept) / slope (see ``bias_correction``)."""
    return (predictions["predicted"] - intercept) / slope


def bias_correction(validation: pd.DataFrame) -> tuple[float, float]:
    """(slope, intercept) of predicted = slope * true + intercept on validation predictions; the
    corrected prediction is (predicted - intercept) / slope (brain-age bias correction)."""
    true = validation["true"].astype(float)
    if true.nunique() < 2:
        raise InputError(f"The bias correction needs validation images with at least 2 different targets; this fold's "
                         f"validation split has {len(true)} image(s) with {true.nunique()} value(s). Give the "
                         "validation split more participants (config `split.folds`, `split.val`).")
    slope, intercept = np.polyfit(true, validation["predicted"].astype(float), 1)
    if abs(slope) < 1e-3:
        raise InputError("The validation predictions do not vary with the target (slope of predicted on true "
                         f"{slope:.2g}); the bias correction is undefined. Train longer or check the model.")
    return float(slope), float(intercept)


def evaluate_fold(table: pd.DataFrame, model_path: Path, out_dir: Path, preproc_dir: Path | None = None,
                  channels: list[str] | None = None, positive_class: str | None = None,
                  device: torch.device | str = "cpu") -> dict:
    """Predict one fold's validation and test images on ``device``; write ``predictions.tsv`` and the
    test ``metrics.json``. A segmentation model needs ``preproc_dir`` and ``channels`` (its label maps go on
    the preprocessed grid)."""
    model, coder, record = load_model(model_path, device)
    if coder.task == "segmentation":
        from pipeline.results import segmentation

        if preproc_dir is None:
            raise InputError("Evaluating a segmentation model needs the preprocessed derivatives folder (--preproc-dir).")
        return segmentation.evaluate_fold(table, model, coder, record, Path(preproc_dir), list(channels or ["T1w"]),
                                          out_dir)
    target = record["target"]
    predictions = predict(model, coder, table[table["split"].isin(["val", "test"])], target)
    extra = {}
    if coder.task == "regression":
        slope, intercept = bias_correction(predictions[predictions["split"] == "val"])
        predictions["predicted_corrected"] = correct(predictions, slope, intercept)
        extra = {"correction_slope": slope, "correction_intercept": intercept}
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    metrics = {"task": coder.task, "target": target, "classes": coder.classes, "best_epoch": record["epoch"],
               **extra, **participant_metrics(test, ordered(coder.classes, positive_class), coder.mean)}
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.to_csv(predictions, out_dir / "predictions.tsv", sep="\t", index=False)
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def ensemble(fold_predictions: list[pd.DataFrame], classes: list[str] | None) -> pd.DataFrame:
    """Mean prediction(s) (regression) or mean class probabilities (classification) over folds, by image
    id (with the ``true`` value when the predictions have one)."""
    keys = [k for k in ("participant_id", "session", "image_id", "true") if k in fold_predictions[0]]
    stacked = pd.concat(fold_predictions, ignore_index=True)
    if classes:
        columns = [f"p_{c}" for c in classes]
        mean = stacked.groupby(keys, sort=True, dropna=False)[columns].mean().reset_index()
        mean.insert(len(keys), "predicted", np.asarray(classes)[mean[columns].to_numpy().argmax(1)])
        return mean
    columns = [c for c in ("predicted", "predicted_corrected") if c in stacked]
    return stacked.groupby(keys, sort=True, dropna=False)[columns].mean().reset_index()


def test_predictions(fold_dirs: list[Path], classes: list[str] | None) -> list[pd.DataFrame]:
    """Each fold's test predictions (``predictions.tsv`` rows of split ``test``, without the column)."""
    dtype = {"true": str} if classes else {}
    predictions = [read_tsv(d / "predictions.tsv").astype(dtype) for d in fold_dirs]
    return [p[p["split"] == "test"].drop(columns="split") for p in predictions]


def against_linear(deep: dict[str, pd.DataFrame], linear_dirs: list[Path], task: str, classes: list[str] | None,
                   train_mean: float | None) -> tuple[pd.DataFrame, dict, list[str]]:
    """(comparison table, the linear ensemble's metrics, reasons of skipped folds) against the
    folds' linear baselines; folds the baseline skipped are left out of the ensemble."""
    from pipeline.results import compare

    records = {d.name: json.loads((d / "metrics.json").read_text()) for d in linear_dirs}
    skipped = [r["skipped"] for r in records.values() if "skipped" in r]
    fitted = [d for d in linear_dirs if "skipped" not in records[d.name]]
    linear = dict(zip([d.name for d in fitted], test_predictions(fitted, classes)))
    overall = {}
    if linear:
        linear["ensemble"] = ensemble(list(linear.values()), classes)
        overall = participant_metrics(linear["ensemble"], classes, train_mean)
        overall["folds"] = [d.name for d in fitted]
    linear = {name: by_participant(p, classes) for name, p in linear.items()}
    means = {name: records[name].get("train_mean") for name in records}
    means["ensemble"] = train_mean
    if len(fitted) < len(linear_dirs):  # an ensemble over fewer folds is not the deep ensemble's peer
        linear.pop("ensemble", None)
    return compare.comparison_tables(deep, linear, task, classes, means), overall, skipped


def study_diagnostics(train_dirs: list[Path], comparison: pd.DataFrame, task: str, skipped: list[str],
                      tests: dict[str, pd.DataFrame] | None = None) -> dict:
    """Every fold's training findings (its ``diagnostics.json``) followed by the findings of its
    test predictions (``tests``: by fold name), and the comparison's findings."""
    from pipeline.results import compare
    from pipeline.results import diagnostics

    folds = {}
    for d in train_dirs:
        path = d / "diagnostics.json"
        folds[d.name] = json.loads(path.read_text())["findings"] if path.exists() else []
    for name, rows in (tests or {}).items():
        folds[name] = folds.get(name, []) + diagnostics.predicted(rows, task)
    return {"folds": folds, "study": diagnostics.compared(compare.headline(comparison, task), task, skipped)}


def summarise(fold_dirs: list[Path], out_dir: Path, excluded: Path | None = None,
              linear_dirs: list[Path] | None = None, train_dirs: list[Path] | None = None) -> dict:
    """Per-fold test metrics, their mean and sd, and the ensemble's with intervals; write the summary files.

    ``excluded`` (``excluded.tsv``): the samples left out before the split are listed under
    ``excluded`` (image id, or participant id without an image, by stage), so that a sample
    missing from the predictions is accounted for. ``linear_dirs``: the folds' linear baselines,
    compared with the deep model (``comparison.tsv``); ``train_dirs``: the folds' training
    folders, whose diagnostics are gathered with the comparison's (``diagnostics.json``).
    """
    metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    if metrics[0]["task"] == "segmentation":
        from pipeline.results import segmentation

        return segmentation.summarise(fold_dirs, out_dir, excluded)
    task, target = metrics[0]["task"], metrics[0]["target"]
    classes = ordered(metrics[0]["classes"], metrics[0].get("positive_class"))
    predictions = test_predictions(fold_dirs, classes)
    ids = [sorted(p["image_id"]) for p in predictions]
    if any(i != ids[0] for i in ids):
        raise InputError(f"The folds predicted different test images ({', '.join(map(str, fold_dirs))}); "
                         "rerun the evaluation of every fold.")
    names = [d.name for d in fold_dirs]
    combined = ensemble(predictions, classes)
    train_mean = None if classes else float(np.mean([m["train_mean"] for m in metrics]))
    overall = participant_metrics(combined, classes, train_mean)
    table, summary = summary_table(metrics, names, overall)
    _, images = summary_table([m.get("image_level", m) for m in metrics], names, overall["image_level"])
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.to_csv(summary, out_dir / "metrics.tsv", sep="\t", meanings=METRIC_COLUMNS)
    atomic.to_csv(images, out_dir / "metrics_images.tsv", sep="\t", meanings=METRIC_COLUMNS)
    atomic.to_csv(combined, out_dir / "predictions.tsv", sep="\t", index=False)
    result = {"task": task, "target": target, "classes": metrics[0]["classes"], "folds": names, "ensemble": overall,
              "fold_mean": table.mean().to_dict(), "fold_sd": table.std().to_dict()}
    if excluded is not None:
        result["excluded"] = excluded_by_stage(excluded)
    if linear_dirs:
        deep = {name: by_participant(p, classes) for name, p in zip([*names, "ensemble"], [*predictions, combined])}
        comparison, result["linear"], skipped = against_linear(deep, linear_dirs, task, classes, train_mean)
        result["comparison"] = comparison.to_dict(orient="records")
        atomic.to_csv(comparison, out_dir / "comparison.tsv", sep="\t", index=False)
        found = study_diagnostics(train_dirs or [], comparison, task, skipped, dict(zip(names, predictions)))
        atomic.write_text(out_dir / "diagnostics.json", json.dumps(found, indent=2, default=float))
    atomic.write_text(out_dir / "metrics.json", json.dumps(result, indent=2, default=float))
    # One point per participant (its mean over its images), the unit of metrics.tsv and of the legend's MAE.
    people = by_participant(combined, classes)
    title = f"Ensemble of {len(names)} fold(s), {len(people)} test participant row(s)"
    if classes:
        plot_classification(people, classes, title, out_dir / "performance.png")
    else:
        plot_regression(people, overall, target, title, out_dir / "performance.png")
    return result


def plot_regression(predictions: pd.DataFrame, metrics: dict, target: str, title: str, png: Path) -> None:
    """Predicted vs true (raw and bias-corrected) and a Bland–Altman plot of the raw predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true = predictions["true"].astype(float)
    fig, (scatter, agreement) = plt.subplots(1, 2, figsize=(10, 4.5))
    scatter.scatter(true, predictions["predicted"], s=14, label=f"raw: MAE {metrics['mae']:.2f}")
    if "predicted_corrected" in predictions:
        scatter.scatter(true, predictions["predicted_corrected"], s=14, marker="x",
                        label=f"bias-corrected: MAE {metrics['corrected_mae']:.2f}")
    lims = [min(true.min(), predictions["predicted"].min()), max(true.max(), predictions["predicted"].max())]
    scatter.plot(lims, lims, "k--", lw=1)
    scatter.set(xlabel=f"true {target}", ylabel=f"predicted {target}", title=title)
    scatter.legend(fontsize="small")
    mean, difference = (true + predictions["predicted"]) / 2, predictions["predicted"] - true
    bias, spread = difference.mean(), 1.96 * difference.std()
    agreement.scatter(mean, difference, s=14)
    for level, style in ((bias, "-"), (bias - spread, "--"), (bias + spread, "--")):
        agreement.axhline(level, color="k", ls=style, lw=1)
    agreement.set(xlabel=f"mean of true and predicted {target}", ylabel="predicted - true",
                  title=f"Bland–Altman: bias {bias:.2f}, limits ±{spread:.2f}")
    fig.tight_layout()
    atomic.savefig(fig, png, dpi=100)
    plt.close(fig)


def plot_classification(predictions: pd.DataFrame, classes: list[str], title: str, png: Path) -> None:
    """ROC and precision-recall curves (per class, one-vs-rest) and the confusion matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (roc, pr, confusion) = plt.subplots(1, 3, figsize=(14, 4.5))
    true = predictions["true"].astype(str)
    for name in classes[1:] if len(classes) == 2 else classes:
        skm.RocCurveDisplay.from_predictions(true == name, predictions[f"p_{name}"], name=name, ax=roc)
        skm.PrecisionRecallDisplay.from_predictions(true == name, predictions[f"p_{name}"], name=name, ax=pr)
    skm.ConfusionMatrixDisplay.from_predictions(true, predictions["predicted"].astype(str), labels=classes,
                                                ax=confusion, colorbar=False)
    roc.set_title(f"ROC: {title}")
    pr.set_title("Precision-recall")
    confusion.set_title("Confusion matrix")
    fig.tight_layout()
    atomic.savefig(fig, png, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fold = commands.add_parser("fold", help="one fold's model on its validation and test images")
    add_fold(fold)
    add_config(fold)  # channels
    fold.add_argument("--model", type=Path, required=True)
    fold.add_argument("--out-dir", type=Path, required=True)
    add_device(fold)
    summary = commands.add_parser("summary", help="metrics across folds and of their ensemble")
    summary.add_argument("fold_dirs", type=Path, nargs="+", help="the folds' evaluation folders")
    summary.add_argument("--out-dir", type=Path, required=True)
    summary.add_argument("--excluded", type=Path, help="excluded.tsv: listed in metrics.json")
    summary.add_argument("--linear", type=Path, nargs="*", help="the folds' linear baseline folders")
    summary.add_argument("--train", type=Path, nargs="*", help="the folds' training folders (their diagnostics)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if args.command == "fold":
            device = for_inference(args.device)  # `device: cuda` without a GPU fails before any work
            record = torch.load(args.model, weights_only=True, map_location="cpu")  # the model says its task
            segmentation = record["coder"]["task"] == "segmentation"
            names = channel_names(args.config)
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, names, label=segmentation)
            metrics = evaluate_fold(table, args.model, args.out_dir, args.preproc_dir, names,
                                    args.config["positive_class"], device)
        else:
            metrics = summarise(args.fold_dirs, args.out_dir, args.excluded, args.linear, args.train)
    print(json.dumps(metrics, indent=2, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
