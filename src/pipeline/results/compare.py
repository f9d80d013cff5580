"""The deep model against the linear baseline on the same test images or participants, paired.

For each fold and for the ensembles of folds: both models' test metrics, their difference
(deep − linear) and its 95 % bootstrap interval, resampling participants (each draw scores both
models on the same participants, so the interval is of the paired difference), and a verdict
that says which is better only where the interval excludes 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.results import metrics
from pipeline.common.errors import InputError

KEYS = ["participant_id", "session", "image_id", "true"]


def paired_table(deep: pd.DataFrame, linear: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """One row per test image, or per participant (and class) of participant-level tables
    (``pipeline.results.participants``), with both models' predictions: ``<column>`` (deep) and
    ``linear_<column>``; the two must hold the same rows."""
    columns = [f"p_{c}" for c in classes] if classes else ["predicted"]
    unit = ["image_id"] if "image_id" in deep else ["participant_id", *(["true"] if classes else [])]
    if sorted(map(tuple, deep[unit].astype(str).to_numpy())) != sorted(map(tuple, linear[unit].astype(str).to_numpy())):
        raise InputError("The deep model and the linear baseline predicted different test images; rerun both.")
    keys = [k for k in KEYS if k in deep and k in linear]
    right = linear[keys + columns].rename(columns={c: f"linear_{c}" for c in columns})
    return deep[keys + columns].merge(right, on=keys, how="inner", validate="one_to_one")


def side(paired: pd.DataFrame, which: str, classes: list[str] | None) -> pd.DataFrame:
    """The predictions of one model (``deep`` or ``linear``) from a paired table."""
    columns = [f"p_{c}" for c in classes] if classes else ["predicted"]
    prefix = "" if which == "deep" else "linear_"
    return paired[[k for k in KEYS if k in paired]].assign(**{c: paired[prefix + c] for c in columns})


def compare(deep: pd.DataFrame, linear: pd.DataFrame, task: str, classes: list[str] | None,
            train_mean: float | None) -> pd.DataFrame:
    """Rows per metric: deep, linear, difference, its 95 % interval and the verdict. Each bootstrap
    draw weighs both models' predictions by the same participants."""
    paired = paired_table(deep, linear, classes)
    sides = [side(paired, which, classes) for which in ("deep", "linear")]
    point = [metrics.scores(p, classes, train_mean) for p in sides]
    weights = metrics.participant_weights(paired["participant_id"])
    deep_draws, linear_draws = (metrics.draws(p, classes, train_mean, weights) for p in sides)
    rows = []
    for metric in metrics.METRICS[task]:
        name = metric.name
        low, high = metrics.intervals({name: deep_draws[name] - linear_draws[name]})[name]
        rows.append({"metric": name, "deep": point[0][name], "linear": point[1][name],
                     "difference": point[0][name] - point[1][name], "difference_ci_low": low,
                     "difference_ci_high": high, "verdict": verdict(low, high, metric.lower_is_better)})
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
    name = metrics.HEADLINE[task]
    rows = table[(table["model"] == "ensemble") & (table["metric"] == name)]
    return rows.iloc[0].to_dict() if len(rows) else None
