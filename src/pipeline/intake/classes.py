"""The classes of a classification target in the order every later stage uses: sorted, as ingest
records them in ``targets.json``, with a binary target's positive class (config ``positive_class``)
last. Its own module so that the stages that score predictions (the linear baseline, evaluation)
import nothing else of intake's target tables."""

from __future__ import annotations

from pipeline.common.errors import InputError


def ordered(classes: list[str] | None, positive: str | None) -> list[str] | None:
    """``classes`` with ``positive`` last for a binary target (unchanged without one: the last of
    the sorted classes is positive), where every metric and plot looks for it
    (``pipeline.results.metrics``: ROC AUC, F1 and the precision-recall curve of the last of two
    classes); InputError naming the key when it is not a class."""
    if not classes or positive is None:
        return classes
    if positive not in classes:
        raise InputError(f"config `positive_class` is {positive!r}, which is not a class of the target; choose one "
                         f"of: {', '.join(classes)}.")
    return [c for c in classes if c != positive] + [positive] if len(classes) == 2 else list(classes)


def positive_of(classes: list[str] | None) -> str | None:
    """The positive class of ``ordered`` classes (None unless binary)."""
    return classes[-1] if classes and len(classes) == 2 else None
