"""The study's tab-separated tables, read one way everywhere."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV with ids kept as strings ('' for an absent session)."""
    return pd.read_csv(path, sep="\t", dtype={"session": str, "participant_id": str, "image_id": str},
                       keep_default_na=False)
