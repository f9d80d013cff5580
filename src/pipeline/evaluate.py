"""Test-set predictions, scikit-learn metrics and a plot.

Writes ``predictions.tsv`` (participant_id, session, image_id, true, predicted [, p_<class>]),
``metrics.json`` and ``performance.png`` (predicted vs true for regression, ROC for classification).
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
    """Predictions for every row of ``table``, keyed by its ids."""
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
            "baseline_mae": baseline, "mae_ratio_to_baseline": mae / baseline}


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


def plot(predictions: pd.DataFrame, coder, metrics: dict, target: str, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if coder.task == "classification":
        for k, name in enumerate(coder.classes[1:] if len(coder.classes) == 2 else coder.classes):
            skm.RocCurveDisplay.from_predictions(predictions["true"].astype(str) == name, predictions[f"p_{name}"],
                                                 name=name, ax=ax)
        ax.set_title(f"ROC, test set (AUC {metrics['roc_auc']:.2f})")
    else:
        ax.scatter(predictions["true"], predictions["predicted"], s=14)
        lims = [predictions[["true", "predicted"]].min().min(), predictions[["true", "predicted"]].max().max()]
        ax.plot(lims, lims, "k--", lw=1)
        ax.set(xlabel=f"true {target}", ylabel=f"predicted {target}",
               title=f"Test set: MAE {metrics['mae']:.2f}, r {metrics['pearson_r']:.2f}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def evaluate(table: pd.DataFrame, model_path: Path, out_dir: Path) -> dict:
    """Predict the test split and write predictions, metrics and the plot into ``out_dir``."""
    model, coder, record = load_model(model_path)
    target = record["target"]
    test = table[table["split"] == "test"]
    predictions = predict(model, coder, test, target)
    if coder.task == "classification":
        probabilities = predictions[[f"p_{c}" for c in coder.classes]].to_numpy()
        metrics = classification_metrics(predictions["true"], probabilities, coder.classes)
    else:
        metrics = regression_metrics(predictions["true"], predictions["predicted"], coder.mean)
    metrics = {"task": coder.task, "target": target, "best_epoch": record["epoch"], **metrics}
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out_dir / "predictions.tsv", sep="\t", index=False)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    plot(predictions, coder, metrics, target, out_dir / "performance.png")
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        metrics = evaluate(study_table(args.manifest, args.splits, args.preproc_dir), args.model, args.out_dir)
    print(json.dumps(metrics, indent=2, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
