"""Test-set predictions and scikit-learn metrics, per fold and across folds.

``fold``: one fold's model on the test images → ``predictions.tsv`` (participant_id, session,
image_id, true, predicted [, p_<class>]) and ``metrics.json``.
``summary``: every fold → ``metrics.tsv`` (one row per fold, their mean and sd, and the
ensemble), ``predictions.tsv`` of the ensemble (the folds' mean prediction or mean class
probabilities), ``metrics.json`` (the ensemble's metrics and the folds' mean ± sd) and
``performance.png`` (predicted vs true for regression, ROC for classification).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import pearsonr
from sklearn import metrics as skm

from pipeline.data import load_batch, study_table
from pipeline.errors import InputError
from pipeline.train import load_model


@torch.no_grad()
def predict(model, coder, table: pd.DataFrame, target: str, batch_size: int = 8) -> pd.DataFrame:
    """Predictions for every row of ``table``, keyed by its ids. ``model`` takes whole images:
    a slice or patch model comes from ``load_model`` wrapped in ``sampler.ImageModel``, whose
    prediction is ``sampler.aggregate``, the mean of the network outputs over the image's views."""
    outputs = [model(load_batch(table["array"].iloc[i:i + batch_size].tolist())) for i in range(0, len(table), batch_size)]
    decoded = coder.decode(torch.cat(outputs))
    out = table[["participant_id", "session", "image_id"]].reset_index(drop=True)
    out["true"] = table[target].to_numpy()
    if coder.task == "classification":
        out["predicted"] = [coder.classes[i] for i in decoded.argmax(1)]
        for k, name in enumerate(coder.classes):
            out[f"p_{name}"] = decoded[:, k]
    else:
        out["true"] = out["true"].astype(float)
        out["predicted"] = decoded
    return out


def regression_metrics(true, predicted, train_mean: float) -> dict:
    """MAE, RMSE, R², Pearson r, and the MAE of always predicting the training mean."""
    true, predicted = np.asarray(true, float), np.asarray(predicted, float)
    baseline = skm.mean_absolute_error(true, np.full_like(true, train_mean))
    mae = skm.mean_absolute_error(true, predicted)
    return {"n": int(true.size), "mae": mae, "rmse": float(np.sqrt(skm.mean_squared_error(true, predicted))),
            "r2": skm.r2_score(true, predicted), "pearson_r": float(pearsonr(true, predicted)[0]),
            "train_mean": float(train_mean), "baseline_mae": baseline, "mae_ratio_to_baseline": mae / baseline}


def classification_metrics(true, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, ROC AUC and F1 (binary: positive class = ``classes[1]``; else macro)."""
    true = np.asarray(true).astype(str)
    predicted = np.asarray(classes)[probabilities.argmax(1)]
    binary = len(classes) == 2
    if binary:
        auc = skm.roc_auc_score(true == classes[1], probabilities[:, 1])
        f1 = skm.f1_score(true, predicted, pos_label=classes[1])
    else:
        auc = skm.roc_auc_score(true, probabilities, multi_class="ovr", labels=classes)
        f1 = skm.f1_score(true, predicted, average="macro")
    return {"n": int(true.size), "accuracy": skm.accuracy_score(true, predicted),
            "balanced_accuracy": skm.balanced_accuracy_score(true, predicted), "roc_auc": auc, "f1": f1,
            "positive_class": classes[1] if binary else None, "classes": classes}


def plot(predictions: pd.DataFrame, classes: list[str] | None, metrics: dict, target: str, title: str, png: Path) -> None:
    """Predicted vs true (regression) or ROC curves (classification) of ``predictions``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if classes:
        for name in classes[1:] if len(classes) == 2 else classes:
            skm.RocCurveDisplay.from_predictions(predictions["true"].astype(str) == name, predictions[f"p_{name}"],
                                                 name=name, ax=ax)
        ax.set_title(f"{title}: ROC AUC {metrics['roc_auc']:.2f}")
    else:
        ax.scatter(predictions["true"], predictions["predicted"], s=14)
        lims = [predictions[["true", "predicted"]].min().min(), predictions[["true", "predicted"]].max().max()]
        ax.plot(lims, lims, "k--", lw=1)
        ax.set(xlabel=f"true {target}", ylabel=f"predicted {target}",
               title=f"{title}: MAE {metrics['mae']:.2f}, r {metrics['pearson_r']:.2f}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def scores(predictions: pd.DataFrame, task: str, classes: list[str] | None, train_mean: float | None) -> dict:
    """The metrics of a predictions table."""
    if task == "classification":
        probabilities = predictions[[f"p_{c}" for c in classes]].to_numpy()
        return classification_metrics(predictions["true"], probabilities, classes)
    return regression_metrics(predictions["true"], predictions["predicted"], train_mean)


def evaluate_fold(table: pd.DataFrame, model_path: Path, out_dir: Path) -> dict:
    """Predict the test images with one fold's model; write ``predictions.tsv`` and ``metrics.json``."""
    model, coder, record = load_model(model_path)
    target = record["target"]
    predictions = predict(model, coder, table[table["split"] == "test"], target)
    metrics = scores(predictions, coder.task, coder.classes, coder.mean)
    metrics = {"task": coder.task, "target": target, "best_epoch": record["epoch"], **metrics}
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out_dir / "predictions.tsv", sep="\t", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    return metrics


def ensemble(fold_predictions: list[pd.DataFrame], classes: list[str] | None) -> pd.DataFrame:
    """Mean prediction (regression) or mean class probabilities (classification) over folds, by image id."""
    keys = ["participant_id", "session", "image_id", "true"]
    stacked = pd.concat(fold_predictions, ignore_index=True)
    if classes:
        columns = [f"p_{c}" for c in classes]
        mean = stacked.groupby(keys, sort=True, dropna=False)[columns].mean().reset_index()
        mean.insert(4, "predicted", np.asarray(classes)[mean[columns].to_numpy().argmax(1)])
        return mean
    return stacked.groupby(keys, sort=True, dropna=False)["predicted"].mean().reset_index()


def summarise(fold_dirs: list[Path], out_dir: Path) -> dict:
    """Per-fold metrics, their mean and sd, and the ensemble's; write the summary files to ``out_dir``."""
    metrics = [json.loads((d / "metrics.json").read_text()) for d in fold_dirs]
    task, target = metrics[0]["task"], metrics[0]["target"]
    classes = metrics[0].get("classes")
    dtype = {"session": str, "participant_id": str, "image_id": str, "true": str if classes else float}
    predictions = [pd.read_csv(d / "predictions.tsv", sep="\t", dtype=dtype, keep_default_na=False) for d in fold_dirs]
    ids = [sorted(p["image_id"]) for p in predictions]
    if any(i != ids[0] for i in ids):
        raise InputError(f"The folds predicted different test images ({', '.join(map(str, fold_dirs))}); "
                         "rerun the evaluation of every fold.")
    names = [d.name for d in fold_dirs]
    numeric = [k for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    table = pd.DataFrame([{k: m[k] for k in numeric} for m in metrics], index=names)
    combined = ensemble(predictions, classes)
    train_mean = None if classes else float(np.mean([m["train_mean"] for m in metrics]))
    overall = scores(combined, task, classes, train_mean)
    ensemble_row = pd.DataFrame([{k: v for k, v in overall.items() if k in table.columns}], index=["ensemble"])
    summary = pd.concat([table, table.mean().to_frame("mean").T, table.std().to_frame("sd").T, ensemble_row])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary.index.name = "model"
    summary.to_csv(out_dir / "metrics.tsv", sep="\t")
    combined.to_csv(out_dir / "predictions.tsv", sep="\t", index=False)
    result = {"task": task, "target": target, "folds": names, "ensemble": overall,
              "fold_mean": table.mean().to_dict(), "fold_sd": table.std().to_dict()}
    (out_dir / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    plot(combined, classes, overall, target, f"Ensemble of {len(names)} folds", out_dir / "performance.png")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fold = commands.add_parser("fold", help="one fold's model on the test images")
    fold.add_argument("--manifest", type=Path, required=True)
    fold.add_argument("--splits", type=Path, required=True)
    fold.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    fold.add_argument("--channels", nargs="+", default=["T1w"])
    fold.add_argument("--preproc-dir", type=Path, required=True)
    fold.add_argument("--model", type=Path, required=True)
    fold.add_argument("--out-dir", type=Path, required=True)
    summary = commands.add_parser("summary", help="metrics across folds and of their ensemble")
    summary.add_argument("fold_dirs", type=Path, nargs="+", help="the folds' evaluation folders")
    summary.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if args.command == "fold":
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, args.channels)
            metrics = evaluate_fold(table, args.model, args.out_dir)
        else:
            metrics = summarise(args.fold_dirs, args.out_dir)
    print(json.dumps(metrics, indent=2, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
