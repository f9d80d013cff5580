"""The study's tab-separated tables, read one way everywhere.

An undefined statistic (a correlation of a constant map, an AUC on one class) is written as
``n/a`` (BIDS' missing value, ``atomic.to_csv``'s default for TSVs) and read back as missing
(NaN), so every aggregate skips it instead of failing on a text column. Tables written before
this rule left such cells empty: a column whose other cells are all numbers reads them as missing
too. Id columns stay strings ('' for an absent session).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

MISSING = "n/a"
IDS = ("session", "participant_id", "image_id")


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV with ids kept as strings and ``n/a`` (or an empty cell in a numeric column) as NaN."""
    table = pd.read_csv(path, sep="\t", dtype={c: str for c in IDS}, keep_default_na=False, na_values=[MISSING])
    for column in table.columns:
        if column in IDS:
            table[column] = table[column].fillna("")
        elif table[column].dtype == object:
            table[column] = numeric_if_only_numbers(table[column])
    return table


def numeric_if_only_numbers(column: pd.Series) -> pd.Series:
    """``column`` as numbers when every cell that is not missing or empty is one; else unchanged."""
    present = column[column.notna() & (column != "")]
    numbers = pd.to_numeric(present, errors="coerce")
    if present.empty or numbers.isna().any():
        return column
    return pd.to_numeric(column.replace("", None), errors="coerce")
