"""Target tables and their joins: participants.tsv, the sessions.tsv files or a non-BIDS table
read as strings, each joined to the samples by id, and the samples without a usable target reported."""

from __future__ import annotations

import csv
import difflib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.common.errors import InputError
from pipeline.intake.ids import strip_prefix, with_sub_prefix
from pipeline.intake.nonbids import non_bids_label
from pipeline.intake.reportrows import report_rows

MISSING = {"", "n/a", "na", "nan", "none"}


# --- reading tables -------------------------------------------------------------------------

def read_table(path: Path) -> pd.DataFrame:
    """A .tsv or .csv table with every cell as a string (``n/a`` kept as text)."""
    sep = "," if Path(path).suffix.lower() == ".csv" else "\t"
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)


def check_unique(ids: pd.Series, path: Path, what: str) -> None:
    """InputError naming the rows (1-based, header = row 1) where ``ids`` repeat."""
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        rows = [f"row {i + 2} ({v})" for i, v in ids[duplicated].items()]
        raise InputError(f"{path} lists a {what} more than once: {', '.join(rows)}. Keep one row each.")


def read_participants(bids_dir: Path) -> pd.DataFrame:
    """participants.tsv as strings, indexed by ``participant_id`` (always with the ``sub-`` prefix)."""
    path = Path(bids_dir) / "participants.tsv"
    if not path.exists():
        raise InputError(f"{path} does not exist: a BIDS dataset needs participants.tsv with the targets "
                         "(or set `target_source: sessions` to read sub-*/sub-*_sessions.tsv).")
    table = read_table(path)
    if "participant_id" not in table.columns:
        raise InputError(f"{path} has no 'participant_id' column (columns: {', '.join(table.columns)}). "
                         "Its first column must be participant_id.")
    table["participant_id"] = table["participant_id"].map(with_sub_prefix)
    check_unique(table["participant_id"], path, "participant")
    return table.set_index("participant_id")


def read_sessions(bids_dir: Path, participants: list[str]) -> tuple[pd.DataFrame, set[str]]:
    """Every ``sub-X/sub-X_sessions.tsv`` of ``participants``: one row per (participant_id, session).

    Returns the rows (``session`` as ``ses-<label>``) and the participants without a sessions file.
    Read with the csv module: thousands of small files are too slow for pandas.
    """
    rows, absent = [], set()
    for pid in participants:
        path = Path(bids_dir) / pid / f"{pid}_sessions.tsv"
        try:
            with open(path, newline="") as f:
                table = list(csv.reader(f, delimiter="\t"))
        except FileNotFoundError:
            absent.add(pid)
            continue
        header = table[0] if table else []
        if "session_id" not in header:
            raise InputError(f"{path} has no 'session_id' column (columns: {', '.join(header)}).")
        records = [dict(zip(header, r)) for r in table[1:] if any(cell.strip() for cell in r)]
        sessions = pd.Series([f"ses-{strip_prefix(r['session_id'], 'ses')}" for r in records], dtype=str)
        check_unique(sessions, path, "session")
        rows += [{**r, "participant_id": pid, "session": s} for r, s in zip(records, sessions)]
    table = pd.DataFrame(rows, dtype=str).fillna("")
    return table.drop(columns="session_id", errors="ignore"), absent


# --- targets --------------------------------------------------------------------------------

def target_problem(value: str, target: str, task: str) -> str:
    """Why a target value cannot be used (``""`` when it can)."""
    value = value.strip()
    if value.lower() in MISSING:
        return f"target {target!r} is missing ({value or 'empty'})"
    if task == "regression":
        try:
            number = float(value)
        except ValueError:
            return f"target {target!r} is not a number ({value!r})"
        if not np.isfinite(number):
            return f"target {target!r} is not a finite number ({value!r})"
    return ""


def join_table(samples: pd.DataFrame, table: pd.DataFrame, on: list[str], absent_reason,
               source: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Left-join ``table`` (read from ``source``) onto ``samples`` by ``on``; samples without a row go to the report."""
    clash = [c for c in table.columns if c in samples.columns and c not in on]
    if clash:
        raise InputError(f"{source}: column(s) {', '.join(clash)} would clash with the manifest's own columns; "
                         "rename them in the table.")
    merged = samples.merge(table, on=on, how="left", indicator=True)
    absent = merged["_merge"] == "left_only"
    reasons = merged[absent].apply(absent_reason, axis=1) if absent.any() else []
    report = report_rows(merged[absent], reasons)
    return merged[~absent].drop(columns="_merge"), report


def check_targets(samples: pd.DataFrame, target: str, task: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Samples with a usable ``target`` value, and report rows for the others."""
    problems = samples[target].map(lambda v: target_problem(v, target, task))
    bad = problems != ""
    return samples[~bad], report_rows(samples[bad], problems[bad])


def missing_column_error(target: str, path: Path, columns) -> InputError:
    """The error for a ``target`` the table lacks: its columns, and the closest one (``agee`` → ``age``)."""
    columns = [str(c) for c in columns]
    lowered = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(str(target).lower(), list(lowered), n=1)
    hint = f" Did you mean `target: {lowered[close[0]]}`?" if close else ""
    return InputError(f"{path} has no column {target!r} (the configured `target`).{hint} "
                      f"Its columns are: {', '.join(columns)}. Set `target` to one of them, or add the column.")


# --- the target table of a study ------------------------------------------------------------

class TargetTable(NamedTuple):
    """A table of targets and how samples join it."""

    rows: pd.DataFrame  # the join columns ``on`` and the table's own columns
    on: list[str]
    absent: object  # row → reason, for samples the table has no row for
    where: str  # the file(s), for messages
    participants: pd.Series | None  # participant ids the table lists (None: not a per-participant table)
    source: str  # targets.json "source"
    fallback: frozenset = frozenset()  # participants whose rows came from participants.tsv instead


def join_targets(samples: pd.DataFrame, bids_dir: Path, target: str, task: str, target_source: str,
                 non_bids: dict | None, target_fallback: str = "none") -> tuple[pd.DataFrame, list, pd.Series | None, dict]:
    """Join the target table by id and keep samples with a usable target.

    Returns (samples, report parts, participant ids of the participants table or None, where the
    targets came from: ``{"source": table name, "fallback": participants whose target came from
    participants.tsv instead (target_fallback)}``).
    """
    if non_bids:
        table = non_bids_table(bids_dir, non_bids, target)
    elif target_source == "participants":
        table = participants_table(bids_dir, target)
    else:
        table = sessions_table(bids_dir, sorted(samples["participant_id"].unique()), target,
                               samples if target_fallback == "participants" else None)
    joined, report = join_table(samples, table.rows, table.on, table.absent, table.where)
    joined, bad = check_targets(joined, target, task)
    bad["reason"] = bad["reason"] + f"; correct it in {table.where} or leave the participant out (participants.exclude)"
    return joined, [report, bad], table.participants, {"source": table.source, "fallback": table.fallback}


def participants_table(bids_dir: Path, target: str) -> TargetTable:
    """participants.tsv, joined by participant id."""
    participants = read_participants(bids_dir)
    if target not in participants.columns:
        raise missing_column_error(target, bids_dir / "participants.tsv", participants.columns)
    return TargetTable(participants.reset_index(), ["participant_id"], lambda row: "participant not listed in participants.tsv; add "
                       "its row (with the target) or leave it out (participants.exclude)",
                       str(bids_dir / "participants.tsv"), participants.index.to_series(), "participants.tsv")


def sessions_table(bids_dir: Path, participant_ids: list[str], target: str,
                   fallback_samples: pd.DataFrame | None = None) -> TargetTable:
    """The participants' sessions.tsv files joined by participant and session; participants.tsv
    (optional) adds its other columns. With ``fallback_samples`` (``target_fallback: participants``)
    a participant without a sessions.tsv takes its row of participants.tsv for each of its samples."""
    sessions, absent = read_sessions(bids_dir, participant_ids)
    fallback = fallback_samples is not None
    if sessions.empty and not fallback:
        raise InputError(f"No sub-*/sub-*_sessions.tsv found in {bids_dir} for the selected participants; "
                         "target_source: sessions needs them (or set `target_fallback: participants`).")
    where = str(bids_dir / "sub-*/sub-*_sessions.tsv")
    if not sessions.empty and target not in sessions.columns:
        raise missing_column_error(target, where, [c for c in sessions.columns if c not in ("participant_id", "session")])
    listed, from_participants = None, pd.DataFrame()
    if (bids_dir / "participants.tsv").exists():
        participants = read_participants(bids_dir)
        listed = participants.index.to_series()
        if not sessions.empty:
            extra = participants[[c for c in participants.columns if c not in sessions.columns]].reset_index()
            sessions = sessions.merge(extra, on="participant_id", how="left").fillna("")
        if fallback and absent:
            if target not in participants.columns:
                raise missing_column_error(target, bids_dir / "participants.tsv", participants.columns)
            pairs = fallback_samples.loc[fallback_samples["participant_id"].isin(absent), ["participant_id", "session"]]
            from_participants = pairs.drop_duplicates().merge(participants.reset_index(), on="participant_id")
    elif fallback and absent:
        raise InputError(f"`target_fallback: participants` needs {bids_dir / 'participants.tsv'} for the participants "
                         f"without a sessions.tsv ({', '.join(sorted(absent)[:5])}{' …' if len(absent) > 5 else ''}); "
                         "Add the file, or add their sessions.tsv.")
    rows = pd.concat([sessions, from_participants], ignore_index=True).fillna("") if len(from_participants) else sessions
    covered = frozenset(from_participants["participant_id"]) if len(from_participants) else frozenset()

    def absent_reason(row) -> str:
        pid = row["participant_id"]
        if pid in absent:
            more = (" and no row in participants.tsv (target_fallback: participants)" if fallback else
                    "; set `target_fallback: participants` to take its target from participants.tsv")
            return f"no {pid}/{pid}_sessions.tsv (target_source: sessions){more}"
        if not row["session"]:
            return "image has no session, so it has no row in a sessions.tsv (target_source: sessions)"
        return f"session {row['session']} not listed in {pid}/{pid}_sessions.tsv"

    return TargetTable(rows, ["participant_id", "session"], absent_reason, where, listed, "sessions.tsv", covered)


def non_bids_table(root: Path, non_bids: dict, target: str) -> TargetTable:
    """The non-BIDS table, its ids made participant ids as the file names' ids are (``non_bids_label``)."""
    path = Path(non_bids["table"])
    path = path if path.is_absolute() else root / path
    if not path.exists():
        raise InputError(f"non_bids.table {path} does not exist (relative paths start at bids_dir).")
    table, id_column = read_table(path), non_bids["id_column"]
    if id_column not in table.columns:
        raise InputError(f"{path} has no id column {id_column!r} (non_bids.id_column); columns: {', '.join(table.columns)}.")
    if target not in table.columns:
        raise missing_column_error(target, path, table.columns)
    table = table.assign(participant_id="sub-" + table[id_column].map(non_bids_label))
    check_unique(table["participant_id"], path, "participant")
    return TargetTable(table, ["participant_id"], lambda row: f"id not listed in {path.name}; add its row", str(path),
                       table["participant_id"], non_bids["table"])
