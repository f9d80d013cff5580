"""Rows of ingest's report: one per excluded sample or participant, with the reason it was left out."""

from __future__ import annotations

import pandas as pd

REPORT_COLUMNS = ["participant_id", "image_id", "path", "reason"]


def report_rows(samples: pd.DataFrame, reason, path_column: str = "path") -> pd.DataFrame:
    """Report rows (REPORT_COLUMNS) for ``samples`` with one reason or a reason per row."""
    return pd.DataFrame({
        "participant_id": samples["participant_id"], "image_id": samples["image_id"],
        "path": samples[path_column], "reason": reason,
    }, columns=REPORT_COLUMNS)
