"""The unit of evaluation: participants, not images, and the positive class of a binary target.

A participant with two sessions would weigh twice if metrics counted images, so the headline
metrics are over participants: the mean prediction (regression) or mean class probabilities
(classification) over a participant's test images, against the mean target (regression) or the
images' class. A participant whose images carry different classes (a diagnosis that changed
between sessions) gives one row per class. Image-level metrics are kept beside them.

``ordered`` puts the positive class of a binary target last, where every metric and plot looks
for it (``pipeline.results.metrics``: ROC AUC, F1 and the precision-recall curve of the last of
two classes).
"""

from __future__ import annotations

import pandas as pd

from pipeline.common.errors import InputError
from pipeline.results.metrics import with_intervals


def by_participant(predictions: pd.DataFrame, classes: list[str] | None) -> pd.DataFrame:
    """One row per participant (and class) with its image count and mean prediction(s)."""
    if classes:
        keys, columns = ["participant_id", "true"], [f"p_{c}" for c in classes]
    else:
        keys = ["participant_id"]
        columns = ["true", *[c for c in ("predicted", "predicted_corrected") if c in predictions]]
    grouped = predictions.groupby(keys, sort=True)
    table = grouped[columns].mean().reset_index()
    table.insert(len(keys), "images", grouped.size().to_numpy())
    if classes:
        table["predicted"] = [classes[i] for i in table[columns].to_numpy().argmax(1)]
    return table


def ordered(classes: list[str] | None, positive: str | None) -> list[str] | None:
    """``classes`` with ``positive`` last for a binary target (unchanged without one: the last of
    the sorted classes is positive); InputError naming the key when it is not a class."""
    if not classes or positive is None:
        return classes
    if positive not in classes:
        raise InputError(f"config `positive_class` is {positive!r}, which is not a class of the target; choose one "
                         f"of: {', '.join(classes)}.")
    return [c for c in classes if c != positive] + [positive] if len(classes) == 2 else list(classes)


def positive_of(classes: list[str] | None) -> str | None:
    """The positive class of ``ordered`` classes (None unless binary)."""
    return classes[-1] if classes and len(classes) == 2 else None


def participant_metrics(test: pd.DataFrame, classes: list[str] | None, train_mean: float | None) -> dict:
    """Test metrics over participants (``unit``), with the image-level ones under ``image_level``;
    ``classes`` in ``ordered`` order (a binary target's positive class last)."""
    unit = {"unit": "participant", "positive_class": positive_of(classes)} if classes else {"unit": "participant"}
    return {**unit, **with_intervals(by_participant(test, classes), classes, train_mean),
            "image_level": with_intervals(test, classes, train_mean)}
