"""Recalibrate a regression package to a new site without training (``apply --calibrate-on``).

The brain-age convention, as the study's own bias correction (``pipeline.results.evaluate``):
fit ``predicted = intercept + slope * true`` by least squares on the calibration participants
only (one point each: its mean prediction over its images against its target), then
``calibrated = (predicted - intercept) / slope`` for everyone else. The fit's 95 % intervals are
the analytic ones of ordinary least squares (Student's t on n - 2 degrees of freedom; SciPy's
``linregress``). The raw ensemble ``predicted`` is corrected, not the package's own training-site
``predicted_corrected``.

The calibration participants are never scored: their rows say ``role: calibration`` and have no
calibrated value. Participants with a target in the table who were not used for calibration
(``role: evaluation``) are scored, raw and calibrated, over participants with 95 % bootstrap
intervals (``pipeline.results.metrics``); the rest are ``role: applied``.

    python -m pipeline.sharing.calibrate --predictions predictions.tsv --table participants.tsv \\
        --column age [--participants 01 02 ...] --out-json calibration.json --out-tsv predictions_calibrated.tsv
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.tables import read_tsv
from pipeline.intake.ids import with_sub_prefix

MISSING = ("", "n/a", "na", "nan")  # a target cell without a value
MINIMUM = 3  # calibration participants: two points fit any line exactly and leave no interval


def targets(table: Path, column: str) -> pd.Series:
    """The known ``column`` values of ``table`` (a TSV with ``participant_id``) by ``sub-`` id;
    a cell that is neither a number nor empty/``n/a`` is an error naming its row."""
    rows = read_tsv(table)
    for needed in ("participant_id", column):
        if needed not in rows:
            raise InputError(f"{table} has no column {needed!r} (its columns: {', '.join(rows.columns)}); the "
                             "calibration table needs participant_id and the target column (--calibrate-column).")
    values = rows[column].astype(str).str.strip()
    known = ~values.str.lower().isin(MISSING)
    numbers = pd.to_numeric(values[known], errors="coerce")
    if numbers.isna().any():
        row = numbers.index[numbers.isna()][0]
        raise InputError(f"{table} row {row + 2}: {column} is {values[row]!r}, not a number; calibration needs numbers "
                         "(or empty / n/a for participants without a value).")
    ids = rows.loc[known, "participant_id"].map(with_sub_prefix)
    if ids.duplicated().any():
        raise InputError(f"{table} lists participant {ids[ids.duplicated()].iloc[0]} twice; give one row each.")
    return pd.Series(numbers.to_numpy(float), index=ids.to_numpy(), name=column)


def fit(predicted: pd.Series, true: pd.Series) -> dict:
    """``predicted = intercept + slope * true`` on participants' values, with 95 % t intervals."""
    n = len(true)
    if n < MINIMUM or true.nunique() < 2:
        raise InputError(f"Calibration needs at least {MINIMUM} participants with predictions and at least 2 different "
                         f"targets; it has {n} participant(s) with {true.nunique()} value(s). Label more participants.")
    result = stats.linregress(true.to_numpy(float), predicted.to_numpy(float))
    if abs(result.slope) < 1e-3:
        raise InputError(f"The predictions of the calibration participants do not vary with the target (slope "
                         f"{result.slope:.2g}); the linear correction is undefined. Calibrate on a wider range of targets.")
    t = stats.t.ppf(0.975, n - 2)
    interval = (lambda value, se: [value - t * se, value + t * se]) if n > 2 else (lambda value, se: [math.nan] * 2)
    residuals = predicted.to_numpy(float) - (result.intercept + result.slope * true.to_numpy(float))
    return {"slope": float(result.slope), "slope_ci": interval(result.slope, result.stderr),
            "intercept": float(result.intercept), "intercept_ci": interval(result.intercept, result.intercept_stderr),
            "r": float(result.rvalue), "residual_sd": float(np.sqrt(np.sum(residuals ** 2) / max(n - 2, 1))), "n": n,
            "target_range": [float(true.min()), float(true.max())]}


def calibrate(predictions: pd.DataFrame, known: pd.Series, chosen: list[str] | None, source: str) -> tuple[pd.DataFrame, dict]:
    """(every image's row with ``role``, ``true`` and ``predicted_calibrated``; the fit and the
    held-out evaluation). ``chosen``: the calibration participants (default: every one with a
    known target); ``source``: the table, named in messages."""
    from pipeline.results.participants import by_participant
    from pipeline.results.metrics import with_intervals

    chosen = sorted(set(map(with_sub_prefix, chosen))) if chosen else sorted(known.index)
    unlabelled = [p for p in chosen if p not in known.index]
    if unlabelled:
        raise InputError(f"Calibration participant(s) {', '.join(unlabelled)} have no {known.name} in {source}; "
                         "calibrate only on participants with a known target.")
    applied = set(predictions["participant_id"])
    absent = [p for p in chosen if p not in applied]
    used = [p for p in chosen if p in applied]
    table = predictions[[c for c in ("participant_id", "session", "image_id", "predicted") if c in predictions]].copy()
    table.insert(3, "true", table["participant_id"].map(known))
    table.insert(3, "role", np.where(table["participant_id"].isin(used), "calibration",
                                     np.where(table["true"].notna(), "evaluation", "applied")))
    means = table[table["role"] == "calibration"].groupby("participant_id")[["predicted", "true"]].mean()
    correction = fit(means["predicted"], means["true"])
    others = table["role"] != "calibration"
    table["predicted_calibrated"] = np.where(others, (table["predicted"] - correction["intercept"]) / correction["slope"],
                                             np.nan)
    held_out = table[table["role"] == "evaluation"].rename(columns={"predicted_calibrated": "predicted_corrected"})
    evaluation = None
    if len(held_out):
        scores = with_intervals(by_participant(held_out, None), None, float(means["true"].mean()))
        evaluation = {k.replace("corrected_", "calibrated_"): v for k, v in scores.items()}
        evaluation["baseline"] = "predicting the calibration participants' mean target"
    summary = {"convention": "predicted = intercept + slope * true, fitted on the calibration participants; "
                             "calibrated = (predicted - intercept) / slope",
               "interval": "95 % t interval of ordinary least squares (n - 2 degrees of freedom)",
               "target": known.name, "table": source, **correction,
               "calibration_participants": used, "without_predictions": absent,
               "participants": {role: int(table.loc[table["role"] == role, "participant_id"].nunique())
                                for role in ("calibration", "evaluation", "applied")},
               "evaluation": evaluation, "warnings": warnings(correction, absent)}
    return table, summary


def warnings(correction: dict, absent: list[str]) -> list[str]:
    """What makes the fit doubtful: a slope interval that holds 0 or is far from 1, participants left out."""
    found = []
    low, high = correction["slope_ci"]
    if low <= 0 <= high:
        found.append(f"the slope's 95 % interval ({low:.3g} to {high:.3g}) includes 0: the predictions of the calibration "
                     "participants barely follow their targets, and dividing by the slope may amplify noise; calibrate "
                     "on more participants or a wider range of targets")
    if absent:
        found.append(f"{len(absent)} calibration participant(s) have no prediction (no image, or excluded): "
                     f"{', '.join(absent)}")
    return found


def summary_line(summary: dict) -> str:
    """The fit in one sentence (the apply report and the log)."""
    slope, intercept = summary["slope_ci"], summary["intercept_ci"]
    return (f"predicted = {summary['intercept']:.3g} (95 % CI {intercept[0]:.3g} to {intercept[1]:.3g}) + "
            f"{summary['slope']:.3g} (95 % CI {slope[0]:.3g} to {slope[1]:.3g}) × true {summary['target']}, fitted on "
            f"{summary['n']} participants (r {summary['r']:.2f}, residual sd {summary['residual_sd']:.3g})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", type=Path, required=True, help="the ensemble's predictions.tsv")
    parser.add_argument("--table", type=Path, required=True, help="TSV with participant_id and the target column")
    parser.add_argument("--column", required=True, help="the target column of --table")
    parser.add_argument("--participants", nargs="*", default=[],
                        help="calibration participants (default: every one with a value in --table)")
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--out-tsv", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        table, summary = calibrate(read_tsv(args.predictions), targets(args.table, args.column), args.participants,
                                   str(args.table))
    atomic.to_csv(table, args.out_tsv, sep="\t", index=False)
    atomic.write_text(args.out_json, json.dumps(summary, indent=2, default=float) + "\n")
    print(summary_line(summary), *[f"warning: {w}" for w in summary["warnings"]], sep="\n", file=sys.stderr)


if __name__ == "__main__":
    main()
