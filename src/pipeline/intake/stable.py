"""Stable split assignment: a participant's place depends only on its own id and the seed.

Each participant id is hashed with the seed (SHA-256) to a position in [0, 1). The unit interval
is cut into parts in proportion to the design's shares: the test set first, then either each
fold's validation set (k folds) or one validation and one training part (a single fold). A
participant goes to the part its position falls in, so adding or removing participants moves no
one else, and the same participant keeps its place in every study with the same seed and shares.

The price is balance: part sizes and their strata follow the binomial spread around the shares
instead of matching them exactly (``pipeline.intake.split.balance`` reports them). Only when a
part would be empty, which happens in cohorts of a handful of participants, is the participant
nearest that part moved into it; ``assign`` says so on stderr.
"""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import pandas as pd

from pipeline.common.errors import InputError

RESOLUTION = 16 ** 15  # positions have 60 bits: ties between ids are practically impossible


def positions(ids, seed: int) -> np.ndarray:
    """Each id's position in [0, 1): its SHA-256 hash with the seed, as a fraction."""
    return np.array([int(hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()[:15], 16) / RESOLUTION
                     for pid in ids])


def shares(test: float, folds: int, val: float) -> list[float]:
    """Each part's share of the participants: test, then the folds' validation sets (or, with one
    fold, validation and training)."""
    if folds > 1:
        return [test] + [(1 - test) / folds] * folds
    if test + val >= 1:
        raise InputError(f"split.test ({test}) and split.val ({val}) leave no participant for training; "
                         "Set a valid value: their sum must be below 1.")
    return [test, val, 1 - test - val]


def fill_empty(part: np.ndarray, position: np.ndarray, edges: np.ndarray) -> list[int]:
    """Move into each empty part the participant nearest its interval (from a part that keeps at
    least one member); return the moved rows. Changes ``part`` in place."""
    moved = []
    for empty in range(len(edges) - 1):
        if (part == empty).any():
            continue
        low, high = edges[empty], edges[empty + 1]
        distance = np.maximum(low - position, position - high).clip(min=0)
        counts = np.bincount(part, minlength=len(edges) - 1)
        distance[counts[part] < 2] = np.inf
        row = int(np.argmin(distance))
        part[row] = empty
        moved.append(row)
    return moved


def assign(ids: pd.Index, test: float, folds: int, val: float, seed: int) -> pd.DataFrame:
    """One row per participant of ``ids``, one column per fold (``fold-1`` …) holding ``train``,
    ``val`` or ``test``."""
    weights = shares(test, folds, val)
    if len(ids) < len(weights):
        raise InputError(f"{len(ids)} participants cannot fill a test set and {folds} fold(s); lower "
                         "`split.folds` or add participants.")
    edges = np.r_[0.0, np.cumsum(weights)]
    edges[-1] = 1.0
    position = positions(ids, seed)
    part = np.searchsorted(edges, position, side="right") - 1
    moved = fill_empty(part, position, edges)
    if moved:
        print(f"warning: in a cohort of {len(ids)} the stable split left {len(moved)} part(s) empty; moved "
              f"{', '.join(ids[moved])} into them (their place depends on the cohort)", file=sys.stderr)
    columns = [f"fold-{k}" for k in range(1, folds + 1)]
    table = pd.DataFrame("train", index=ids, columns=columns, dtype=object)
    table.loc[part == 0] = "test"
    if folds == 1:
        table.loc[part == 1, "fold-1"] = "val"
    else:
        for k, column in enumerate(columns, start=1):
            table.loc[part == k, column] = "val"
    return table
