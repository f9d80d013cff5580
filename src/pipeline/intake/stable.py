"""Stable split assignment: a participant's place depends on its own id, the seed and its stratum.

Each participant id is hashed with the seed (SHA-256) to a position in [0, 1). Participants are
grouped into strata (the target class for classification, joined with any ``split.stratify``
columns); within a stratum they are ordered by position and cut into contiguous parts, in order:
the test set, then either each fold's validation set (k folds) or one validation and one training
part (a single fold). The parts' sizes come from a seat sequence (``seats``) that gives a stratum of
n participants every part's share of n to within one participant, and that grows by one seat when
the stratum grows by one participant. So every split holds its share of every stratum to within one
participant, and the same participant keeps its place in every study with the same seed, shares
and cohort.

What moves when the cohort changes: only participants of the stratum that gained or lost a
member. Adding (removing) a participant shifts one participant across each cut that lies between
the newcomer's place and the part that gains (loses) the seat: none when they coincide, otherwise
one per cut in between. With a test set and two folds (three parts, two cuts) that is at most two
participants, and in most changes none or one (``tests/test_split.py`` measures it). Strata of other classes and sites
never move.

Strata are cut independently, so a cohort of many tiny strata may leave a part empty (a handful of
participants): then the participant nearest that part is moved into it; ``assign`` says so on
stderr. ``strata=None`` gives the design used until December 2026 (``split.method: hash``): the
unit interval is cut into the shares and each participant goes to the part its position falls in,
so nothing else ever moves but part sizes and their classes follow the binomial spread.
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


def seats(weights, n: int, order=None) -> np.ndarray:
    """How many of ``n`` participants each part gets: |count - n·share| < 1 for every part, and the
    counts for n + 1 are those for n with one more seat in one part (so a growing stratum never
    takes a seat away). Seat by seat, the part whose lower quota falls due first gets it, among the
    parts an extra seat keeps below their upper quota; ``order`` (a permutation of the parts)
    breaks ties, so that equal shares do not always favour the first fold."""
    weights = np.asarray(weights, dtype=float)
    rank = np.empty(len(weights), dtype=int)
    rank[np.asarray(order if order is not None else range(len(weights)))] = np.arange(len(weights))
    counts = np.zeros(len(weights), dtype=int)
    for t in range(1, n + 1):
        due = np.where(counts + 1 - t * weights < 1, (counts + 1) / np.maximum(weights, 1e-12), np.inf)
        best = np.flatnonzero(due == due.min())
        counts[best[np.argmin(rank[best])]] += 1
    return counts


def tie_order(stratum: str, parts: int, seed: int) -> np.ndarray:
    """A permutation of the parts, fixed by the stratum's name and the seed."""
    return np.argsort(positions([f"{stratum}|part-{k}" for k in range(parts)], seed), kind="stable")


def stratified_parts(position: np.ndarray, labels: np.ndarray, weights, seed: int, line) -> np.ndarray:
    """Each participant's part: within each stratum, contiguous runs in position order, one per part
    in the order ``line``, whose sizes are ``seats`` of the stratum's size. A change moves one
    participant per cut between the part it lands in and the part that gains or loses the seat, so
    the largest part should sit between the others."""
    part = np.empty(len(position), dtype=int)
    for stratum in sorted(set(labels)):
        rows = np.flatnonzero(labels == stratum)
        rows = rows[np.argsort(position[rows], kind="stable")]
        counts = seats(weights, len(rows), tie_order(stratum, len(weights), seed))
        part[rows] = np.repeat(line, counts[line])
    return part


def assign(ids: pd.Index, test: float, folds: int, val: float, seed: int,
           strata: pd.Series | None = None) -> pd.DataFrame:
    """One row per participant of ``ids``, one column per fold (``fold-1`` …) holding ``train``,
    ``val`` or ``test``. ``strata``: a label per id (indexed by id) to balance every part by;
    None: the unstratified hash design (parts follow the binomial spread)."""
    weights = shares(test, folds, val)
    if len(ids) < len(weights):
        raise InputError(f"{len(ids)} participants cannot fill a test set and {folds} fold(s); lower "
                         "`split.folds` or add participants.")
    edges = np.r_[0.0, np.cumsum(weights)]
    edges[-1] = 1.0
    position = positions(ids, seed)
    if strata is None:
        part = np.searchsorted(edges, position, side="right") - 1
    else:
        line = np.array([0, 2, 1]) if folds == 1 else np.arange(len(weights))  # one fold: test, train, val
        part = stratified_parts(position, strata.loc[ids].astype(str).to_numpy(), weights, seed, line)
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
