"""Test-set metrics of image-level predictions, and their bootstrap intervals over participants.

``METRICS`` is the registry: per task, each metric's name, whether lower is better, its point
estimate (scikit-learn or SciPy on the predictions), its vectorised form for the bootstrap, and
its meaning for the tables' data dictionaries (``COLUMNS``, ``pipeline.common.columns``).

The bootstrap resamples participants with replacement (every image of a drawn participant comes
along), ``SAMPLES`` times with a fixed seed. A draw is a vector of integer weights over the rows,
how many times each row's participant was drawn, and a metric of the rows repeated that many
times is the same metric with those weights: so every metric of every draw is computed at once,
as weighted sums over a (draws, rows) matrix, instead of a thousand calls into scikit-learn
(tests/participant_metrics.py checks the weighted forms against scikit-learn on the repeated rows).
A metric undefined in a draw (one class only, constant values) is NaN there and left out of its
percentiles; one undefined in every draw has the interval [NaN, NaN].
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
from scipy.stats import pearsonr
from sklearn import metrics as skm

from pipeline.common.columns import Column

SAMPLES = 1000
NOT_BOOTSTRAPPED = {"n", "train_mean", "best_epoch", "correction_slope", "correction_intercept"}


@dataclass(frozen=True)
class Metric:
    """A test metric: ``weighted(rows, weights)`` gives its value for each row of (draws, rows) weights."""

    name: str
    lower_is_better: bool
    weighted: Callable[["Rows", np.ndarray], np.ndarray]
    long_name: str  # the data dictionary's LongName and Description (``COLUMNS``)
    description: str


@dataclass
class Rows:
    """The predictions as arrays: regression ``true`` and ``predicted``; classification ``true``
    (class indices) and ``probabilities`` (rows, classes)."""

    true: np.ndarray
    predicted: np.ndarray | None = None
    probabilities: np.ndarray | None = None


def _mean(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    total = weights.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights * values).sum(1) / total


def _mae(rows: Rows, w: np.ndarray) -> np.ndarray:
    return _mean(w, np.abs(rows.predicted - rows.true))


def _rmse(rows: Rows, w: np.ndarray) -> np.ndarray:
    return np.sqrt(_mean(w, (rows.predicted - rows.true) ** 2))


def _centred(rows: Rows, w: np.ndarray, values: np.ndarray) -> np.ndarray:
    return values[None, :] - _mean(w, values)[:, None]


def _r2(rows: Rows, w: np.ndarray) -> np.ndarray:
    total = (w * _centred(rows, w, rows.true) ** 2).sum(1)
    residual = (w * (rows.true - rows.predicted) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - residual / total, np.nan)


def _pearson(rows: Rows, w: np.ndarray) -> np.ndarray:
    a, b = _centred(rows, w, rows.true), _centred(rows, w, rows.predicted)
    cross, sa, sb = (w * a * b).sum(1), (w * a * a).sum(1), (w * b * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((sa > 0) & (sb > 0), cross / np.sqrt(sa * sb), np.nan)


def _predicted_class(rows: Rows) -> np.ndarray:
    return rows.probabilities.argmax(1)


def _accuracy(rows: Rows, w: np.ndarray) -> np.ndarray:
    return _mean(w, (_predicted_class(rows) == rows.true).astype(float))


def _per_class(rows: Rows, w: np.ndarray):
    """(true weight, predicted weight, correct weight) per class: three (draws, classes) arrays."""
    k = rows.probabilities.shape[1]
    true, predicted = np.eye(k)[rows.true], np.eye(k)[_predicted_class(rows)]
    return w @ true, w @ predicted, w @ (true * predicted)


def _balanced_accuracy(rows: Rows, w: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present in the draw's true labels (scikit-learn's rule)."""
    true, _, correct = _per_class(rows, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(np.where(true > 0, correct / true, np.nan), axis=1)


def _f1(rows: Rows, w: np.ndarray) -> np.ndarray:
    """Binary: F1 of the second class; else the mean F1 over the classes in the draw's true or
    predicted labels; 0 where a class has no true positive (zero_division=0)."""
    true, predicted, correct = _per_class(rows, w)
    denominator = true + predicted
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denominator > 0, 2 * correct / denominator, 0.0)
    if rows.probabilities.shape[1] == 2:
        return f1[:, 1]
    present = denominator > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (f1 * present).sum(1) / present.sum(1)


def binary_auc(scores: np.ndarray, positive: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted ROC AUC (Mann-Whitney: the share of positive-negative pairs ranked right, ties
    half) for each row of weights; NaN where a draw lacks one of the two groups."""
    order = np.argsort(scores, kind="stable")
    ordered, positive, w = scores[order], positive[order], w[:, order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # groups of tied scores
    pos = np.add.reduceat(w * positive, starts, axis=1)
    neg = np.add.reduceat(w * ~positive, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, (pos * (below + 0.5 * neg)).sum(1) / pairs, np.nan)


def _roc_auc(rows: Rows, w: np.ndarray) -> np.ndarray:
    """Binary: AUC of the second class's probability; else the mean one-vs-rest AUC, undefined
    where a class is missing from the draw (scikit-learn's ``multi_class="ovr"``)."""
    k = rows.probabilities.shape[1]
    if k == 2:
        return binary_auc(rows.probabilities[:, 1], rows.true == 1, w)
    return np.mean([binary_auc(rows.probabilities[:, c], rows.true == c, w) for c in range(k)], axis=0)


METRICS = {
    "regression": [
        Metric("mae", True, _mae, "Mean absolute error", "Mean |predicted - true| over the test set (metrics.tsv: "
               "over participants, each one's mean prediction over its images; metrics_images.tsv: over images), in "
               "the target's units."),
        Metric("rmse", True, _rmse, "Root mean squared error", "Square root of the mean (predicted - true)² over the "
               "test set, in the target's units."),
        Metric("r2", False, _r2, "Coefficient of determination", "R²: 1 - residual / total sum of squares over the "
               "test set (1 is perfect, 0 is no better than the test mean, negative is worse)."),
        Metric("pearson_r", False, _pearson, "Pearson correlation", "Pearson correlation of predicted and true over "
               "the test set (-1 to 1)."),
    ],
    "classification": [
        Metric("accuracy", False, _accuracy, "Accuracy", "Share of the test set (participants, or images in "
               "metrics_images.tsv) whose most probable class is the true one (0 to 1)."),
        Metric("balanced_accuracy", False, _balanced_accuracy, "Balanced accuracy", "Mean over the classes of the "
               "share of each class classified right (0 to 1; 1 / classes is chance)."),
        Metric("roc_auc", False, _roc_auc, "Area under the ROC curve", "ROC AUC of the positive class's probability "
               "(binary; config positive_class), else the mean one-vs-rest AUC (0.5 is chance, 1 is perfect)."),
        Metric("f1", False, _f1, "F1 score", "Harmonic mean of precision and recall of the positive class "
               "(binary), else their macro mean over the classes (0 to 1)."),
    ],
}
HEADLINE = {"regression": "mae", "classification": "roc_auc"}


def _direction(metric: Metric) -> str:
    return " Lower is better." if metric.lower_is_better else " Higher is better."


# The data dictionary of the metrics' columns (``pipeline.common.columns``; writers pass it as
# ``atomic.to_csv(meanings=COLUMNS)``): every metric above, and the other numbers of a metrics row.
COLUMNS = {
    **{m.name: Column(m.long_name, m.description + _direction(m)) for task in METRICS.values() for m in task},
    "n": Column("Test images", "Number of test images scored."),
    "train_mean": Column("Training mean", "Mean target of the fold's training images: the prediction of the "
                         "trivial baseline (baseline_mae). Not a test metric."),
    "baseline_mae": Column("Baseline MAE", "The mean absolute error of always predicting train_mean, on the same "
                           "test set, in the target's units: what the model must beat."),
    "mae_ratio_to_baseline": Column("MAE relative to the baseline", "mae / baseline_mae: below 1 the model beats "
                                    "predicting the training mean (0.5: half its error). Lower is better."),
}


def lower_is_better(task: str, name: str) -> bool:
    return next(m.lower_is_better for m in METRICS[task] if m.name == name)


def regression_metrics(true, predicted, train_mean: float) -> dict:
    """MAE, RMSE, R², Pearson r, and the MAE of always predicting the training mean. R² and r need
    two images and varying values: where they are undefined they are NaN and ``undefined`` says why."""
    true, predicted = np.asarray(true, float), np.asarray(predicted, float)
    baseline = skm.mean_absolute_error(true, np.full_like(true, train_mean))
    mae = skm.mean_absolute_error(true, predicted)
    metrics = {"n": int(true.size), "mae": mae, "rmse": float(np.sqrt(skm.mean_squared_error(true, predicted))),
               "r2": float("nan"), "pearson_r": float("nan"), "train_mean": float(train_mean),
               "baseline_mae": baseline, "mae_ratio_to_baseline": mae / baseline if baseline else float("nan")}
    undefined = []
    if true.size < 2:
        undefined.append(f"r2, pearson_r: {true.size} test prediction(s); they need at least 2")
    elif np.ptp(true) == 0 or np.ptp(predicted) == 0:
        undefined.append("r2, pearson_r: the true or the predicted values are all equal")
    else:
        metrics["r2"] = skm.r2_score(true, predicted)
        metrics["pearson_r"] = float(pearsonr(true, predicted)[0])
    return {**metrics, "undefined": undefined} if undefined else metrics


def classification_metrics(true, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, ROC AUC and F1 (binary: positive class = ``classes[1]``; else macro)."""
    true = np.asarray(true).astype(str)
    predicted = np.asarray(classes)[probabilities.argmax(1)]
    binary = len(classes) == 2
    present = sorted(set(true.tolist()))
    auc, undefined = float("nan"), []
    if len(present) < len(classes):
        undefined.append(f"roc_auc: the test set holds only class(es) {present} of {classes}")
    elif binary:
        auc = skm.roc_auc_score(true == classes[1], probabilities[:, 1])
    else:
        auc = skm.roc_auc_score(true, probabilities, multi_class="ovr", labels=classes)
    with warnings.catch_warnings():  # balanced accuracy of a class absent from ``true`` warns
        warnings.simplefilter("ignore")
        balanced = skm.balanced_accuracy_score(true, predicted)
        f1 = (skm.f1_score(true, predicted, pos_label=classes[1], zero_division=0.0) if binary
              else skm.f1_score(true, predicted, average="macro", zero_division=0.0))
    metrics = {"n": int(true.size), "accuracy": skm.accuracy_score(true, predicted), "balanced_accuracy": balanced,
               "roc_auc": auc, "f1": f1}
    return {**metrics, "undefined": undefined} if undefined else metrics


def scores(predictions: pd.DataFrame, classes: list[str] | None, train_mean: float | None) -> dict:
    """The metrics of a predictions table (regression: raw and, when present, bias-corrected)."""
    if classes:
        return classification_metrics(predictions["true"], predictions[[f"p_{c}" for c in classes]].to_numpy(), classes)
    metrics = regression_metrics(predictions["true"], predictions["predicted"], train_mean)
    if "predicted_corrected" in predictions:
        corrected = regression_metrics(predictions["true"], predictions["predicted_corrected"], train_mean)
        metrics.update({f"corrected_{k}": corrected[k] for k in ("mae", "rmse", "r2", "pearson_r")})
    return metrics


def participant_weights(participants, samples: int = SAMPLES, seed: int = 0) -> np.ndarray:
    """(samples, rows) how many times each row's participant is drawn in each bootstrap draw."""
    ids, row_of = np.unique(np.asarray(participants).astype(str), return_inverse=True)
    drawn = np.random.default_rng(seed).integers(0, len(ids), size=(samples, len(ids)))
    counts = np.zeros((samples, len(ids)))
    np.add.at(counts, (np.arange(samples)[:, None], drawn), 1.0)
    return counts[:, row_of]


def rows_of(predictions: pd.DataFrame, classes: list[str] | None, column: str = "predicted") -> Rows:
    """The arrays of a predictions table (``column``: which prediction, e.g. ``predicted_corrected``)."""
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        return Rows(np.array([index[str(v)] for v in predictions["true"]]),
                    probabilities=predictions[[f"p_{c}" for c in classes]].to_numpy(float))
    return Rows(predictions["true"].to_numpy(float), predicted=predictions[column].to_numpy(float))


def draws(predictions: pd.DataFrame, classes: list[str] | None, train_mean: float | None,
          weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every bootstrapped metric of the predictions for each row of ``weights``."""
    task = "classification" if classes else "regression"
    rows = rows_of(predictions, classes)
    values = {m.name: m.weighted(rows, weights) for m in METRICS[task]}
    if not classes:
        values["baseline_mae"] = _mean(weights, np.abs(rows.true - train_mean))
        with np.errstate(invalid="ignore", divide="ignore"):
            values["mae_ratio_to_baseline"] = values["mae"] / values["baseline_mae"]
        if "predicted_corrected" in predictions:
            corrected = rows_of(predictions, None, "predicted_corrected")
            values.update({f"corrected_{m.name}": m.weighted(corrected, weights) for m in METRICS[task]})
    return values


def intervals(values: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """95 % percentile intervals of each metric's draws (NaN draws left out)."""
    with warnings.catch_warnings():  # a metric undefined in every draw: [NaN, NaN]
        warnings.simplefilter("ignore")
        return {k: [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))] for k, v in values.items()}


def with_intervals(predictions: pd.DataFrame, classes: list[str] | None, train_mean: float | None) -> dict:
    """Metrics plus ``<metric>_ci`` = [low, high] for each bootstrapped one."""
    point = scores(predictions, classes, train_mean)
    weights = participant_weights(predictions["participant_id"])
    spread = intervals(draws(predictions, classes, train_mean, weights))
    return {**point, **{f"{k}_ci": v for k, v in spread.items()}}


def mean_intervals(predictions: pd.DataFrame, columns: list[str]) -> dict[str, list[float]]:
    """Intervals of per-image scores' means (segmentation: each ``dice_*`` and ``hd95_*`` column,
    the mean over the images where it is defined)."""
    weights = participant_weights(predictions["participant_id"])
    values = predictions[columns].to_numpy(float)
    defined = ~np.isnan(values)
    sums, counts = weights @ np.where(defined, values, 0.0), weights @ defined
    with np.errstate(invalid="ignore", divide="ignore"):
        return intervals({c: sums[:, k] / counts[:, k] for k, c in enumerate(columns)})
