"""The unit of evaluation: participants, not images, and the positive class of a binary target.

A participant with two sessions would weigh twice if metrics counted images, so the headline
metrics are over participants: the mean prediction (regression) or mean class probabilities
(classification) over a participant's test images, against the mean target (regression) or the
images' class. A participant whose images carry different classes (a diagnosis that changed
between sessions) gives one row per class. Image-level metrics are kept beside them.

The classes come in ``pipeline.intake.classes.ordered`` order: a binary target's positive class
last, where every metric and plot looks for it.
"""

from __future__ import annotations

import pandas as pd

from pipeline.intake.classes import positive_of
from pipeline.results.metrics import with_intervals


def by_participant(predictions: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """One row per participant (and class) with its image count and mean prediction(s)."""
    if classes:
        keys, columns = ["participant_id", "true"], [f"p_{c}" for c in classes]
    else:
        keys = ["participant_id"]
        columns = [c for c in ("true", "predicted", "predicted_corrected", "predicted_calibrated") if c in predictions]
    grouped = predictions.groupby(keys, sort=True)
    table = grouped[columns].mean().reset_index()
    table.insert(len(keys), "images", grouped.size().to_numpy())
    if classes:
        table["predicted"] = [classes[i] for i in table[columns].to_numpy().argmax(1)]
    return table


def participant_metrics(test: pd.DataFrame, classes: list[str] | None, train_mean: float | None) -> dict:
    """Test metrics over participants (``unit``), with the image-level ones under ``image_level``;
    ``classes`` in ``ordered`` order (a binary target's positive class last)."""
    unit = {"unit": "participant", "positive_class": positive_of(classes)} if classes else {"unit": "participant"}
    return {**unit, **with_intervals(by_participant(test, classes), classes, train_mean),
            "image_level": with_intervals(test, classes, train_mean)}
