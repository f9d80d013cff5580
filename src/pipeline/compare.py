"""The deep model against the linear baseline on the same test images, paired.

For each fold and for the ensembles of folds: both models' test metrics, their difference
(deep − linear) and its 95 % bootstrap interval, resampling participants (each draw scores both
models on the same participants, so the interval is of the paired difference), and a verdict
that says which is better only where the interval excludes 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.errors import InputError

# Per task: the compared metrics, the headline first, and whether lower is better.
METRICS = {"regression": (["mae", "rmse", "r2", "pearson_r"], {"mae": True, "rmse": True}),
           "classification": (["roc_auc", "balanced_accuracy", "accuracy"], {})}
KEYS = ["participant_id", "session", "image_id", "true"]


def paired_table(deep: pd.DataFrame, linear: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """One row per test image with both models' predictions: ``<column>`` (deep) and
    ``linear_<column>``; the two must hold the same images."""
    columns = [f"p_{c}" for c in classes] if classes else ["predicted"]
    if sorted(deep["image_id"]) != sorted(linear["image_id"]):
        raise InputError("The deep model and the linear baseline predicted different test images; rerun both.")
    keys = [k for k in KEYS if k in deep and k in linear]
    right = linear[keys + columns].rename(columns={c: f"linear_{c}" for c in columns})
    return deep[keys + columns].merge(right, on=keys, how="inner", validate="one_to_one")


def side(paired: pd.DataFrame, which: str, classes: list[str] | None) -> pd.DataFrame:
    """The predictions of one model (``deep`` or ``linear``) from a paired table."""
    columns = [f"p_{c}" for c in classes] if classes else ["predicted"]
    prefix = "" if which == "deep" else "linear_"
    return paired[[k for k in KEYS if k in paired]].assign(**{c: paired[prefix + c] for c in columns})


def differences(paired: pd.DataFrame, task: str, classes: list[str] | None, train_mean: float | None) -> dict:
    """Both models' metrics and deep − linear, for every compared metric."""
    from pipeline.evaluate import scores

    names = METRICS[task][0]
    deep, linear = (scores(side(paired, w, classes), classes, train_mean) for w in ("deep", "linear"))
    out = {}
    for name in names:
        out[f"deep_{name}"], out[f"linear_{name}"] = deep[name], linear[name]
        out[f"difference_{name}"] = deep[name] - linear[name]
    return out


def compare(deep: pd.DataFrame, linear: pd.DataFrame, task: str, classes: list[str] | None,
            train_mean: float | None) -> pd.DataFrame:
    """Rows per compared metric: deep, linear, difference, its 95 % interval and the verdict."""
    from pipeline.evaluate import bootstrap

    paired = paired_table(deep, linear, classes)
    point = differences(paired, task, classes, train_mean)
    intervals = bootstrap(paired, lambda p: {k: v for k, v in differences(p, task, classes, train_mean).items()
                                             if k.startswith("difference_")})
    names, lower_better = METRICS[task]
    rows = []
    for name in names:
        low, high = intervals.get(f"difference_{name}", [float("nan"), float("nan")])
        rows.append({"metric": name, "deep": point[f"deep_{name}"], "linear": point[f"linear_{name}"],
                     "difference": point[f"difference_{name}"], "difference_ci_low": low, "difference_ci_high": high,
                     "verdict": verdict(low, high, lower_better.get(name, False))})
    return pd.DataFrame(rows)


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    """``deep better``, ``linear better`` or ``no clear difference`` (the interval holds 0 or is undefined)."""
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return "no clear difference"
    deep_lower = high < 0
    return "deep better" if deep_lower == lower_is_better else "linear better"


def comparison_tables(deep: dict[str, pd.DataFrame], linear: dict[str, pd.DataFrame], task: str,
                      classes: list[str] | None, train_means: dict[str, float | None]) -> pd.DataFrame:
    """``compare`` for every model name (the folds and ``ensemble``) both sides have, stacked with a
    ``model`` column."""
    tables = [compare(deep[name], linear[name], task, classes, train_means.get(name)).assign(model=name)
              for name in deep if name in linear]
    if not tables:
        return pd.DataFrame(columns=["model", "metric", "deep", "linear", "difference", "difference_ci_low",
                                     "difference_ci_high", "verdict"])
    table = pd.concat(tables, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def headline(table: pd.DataFrame, task: str) -> dict | None:
    """The ensemble's headline row (MAE or ROC AUC) as a dict, or None without a comparison."""
    name = METRICS[task][0][0]
    rows = table[(table["model"] == "ensemble") & (table["metric"] == name)]
    return rows.iloc[0].to_dict() if len(rows) else None
