"""Ingestion: select the images of each sample, join its target, check every header, report exclusions.

Writes ``manifest.tsv`` (one row per usable sample), ``ingest_report.tsv`` (one row per excluded
sample or participant, with the reason) and ``targets.json`` (target, task, source table, class
list). Input is a BIDS dataset, read through pybids' entity rules (``pipeline.bidsindex``), or a
non-BIDS folder described by a glob pattern and a table. The input is only ever read.

Steps, each reported when it loses a sample: entity filters per channel → one sample per
reference-channel image, other channels and the label image matched by entities → sessions/runs
policy → participant include/exclude → target joined by id → header (and data) checks.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.intake import bidsindex
from pipeline.common.errors import InputError
from pipeline.intake.imagecheck import image_problems
from pipeline.common.outputs import check_writable

MANIFEST_COLUMNS = ["image_id", "participant_id", "session", "subdir", "path"]
REPORT_COLUMNS = ["participant_id", "image_id", "path", "reason"]
MISSING = {"", "n/a", "na", "nan", "none"}
DEFAULT_FILTERS = {"datatype": "anat", "extension": [".nii", ".nii.gz"]}
DEFAULT_CHANNELS = {"T1w": {"suffix": "T1w"}}
IMAGE_ID = re.compile(r"sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*")
UNMATCHED = ("suffix", "extension")  # never part of the entities that match channels


class Ingested(NamedTuple):
    """What ingest hands on: the three outputs' contents."""

    manifest: pd.DataFrame  # MANIFEST_COLUMNS, path_<channel>…, [label], table columns
    report: pd.DataFrame  # REPORT_COLUMNS
    targets: dict  # target, task, source, classes


# --- tables ---------------------------------------------------------------------------------

def with_sub_prefix(label: str) -> str:
    """``01`` or ``sub-01`` → ``sub-01``."""
    label = str(label).strip()
    return label if label.startswith("sub-") else f"sub-{label}"


def strip_prefix(label: str, prefix: str) -> str:
    """``ses-01`` or ``01`` → ``01`` (for ``prefix`` ``ses``)."""
    label = str(label).strip()
    return label[len(prefix) + 1:] if label.startswith(f"{prefix}-") else label


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


# --- samples from a BIDS dataset ------------------------------------------------------------

def check_bids_root(bids_dir: Path) -> None:
    """InputError unless ``bids_dir`` is a BIDS dataset root with at least one ``sub-*`` folder."""
    if not bids_dir.exists():
        raise InputError(f"bids_dir {bids_dir} does not exist. Set `bids_dir` in config to the dataset's root folder.")
    if not bids_dir.is_dir():
        raise InputError(f"bids_dir {bids_dir} is a file, not a folder. Set `bids_dir` to the dataset's root folder.")
    with os.scandir(bids_dir) as entries:
        subjects = any(e.name.startswith("sub-") and e.is_dir() for e in entries)
    if not (bids_dir / "dataset_description.json").exists():
        if subjects:
            raise InputError(f"{bids_dir} has no dataset_description.json, which a BIDS dataset needs at its root. "
                             'Add one (e.g. {"Name": "my study", "BIDSVersion": "1.9.0"}); ingest never writes '
                             "into the dataset.")
        inner = sorted(p.parent.name for p in bids_dir.glob("*/dataset_description.json"))
        hint = f" Did you mean {', '.join(str(bids_dir / n) for n in inner)}?" if inner else ""
        raise InputError(f"{bids_dir} is not a BIDS dataset: no dataset_description.json and no sub-* folders. "
                         f"Point `bids_dir` at the dataset root, or describe a non-BIDS folder with `non_bids`.{hint}")
    if not subjects:
        raise InputError(f"{bids_dir} is an empty BIDS dataset: it has no sub-* folders. Add the participants' "
                         "sub-*/anat images, or point `bids_dir` at the dataset that has them.")


def entity(files: pd.DataFrame, name: str) -> pd.Series:
    """One entity column of an index, ``""`` everywhere when no file has the entity."""
    return files[name] if name in files else pd.Series("", index=files.index, dtype=object)


def used_entities(files: pd.DataFrame, rules: dict) -> list[str]:
    """Entities (pybids order) that at least one file of ``files`` has."""
    return [name for name in rules if name in files and (files[name] != "").any()]


def image_ids(samples: pd.DataFrame, key: list[str], rules: dict) -> pd.Series:
    """``sub-X[_ses-Y]`` plus the key entities whose value differs within that participant/session.

    Entities follow BIDS order with their file-name keys (``_acq-fast_run-2``); an image keeps
    its id when other participants gain or lose scans.
    """
    subject, session = entity(samples, "subject"), entity(samples, "session")
    ids = "sub-" + subject + np.where(session != "", "_ses-" + session, "")
    groups = [subject, session]
    for name in key:
        if name in ("subject", "session") or rules[name].key is None:
            continue
        values = samples[name]
        varies = values.groupby(groups).transform("nunique") > 1
        ids = ids + np.where(varies & (values != ""), f"_{rules[name].key}-" + values, "")
    return pd.Series(ids, index=samples.index)


def report_rows(samples: pd.DataFrame, reason, path_column: str = "path") -> pd.DataFrame:
    """Report rows (REPORT_COLUMNS) for ``samples`` with one reason or a reason per row."""
    return pd.DataFrame({
        "participant_id": samples["participant_id"], "image_id": samples["image_id"],
        "path": samples[path_column], "reason": reason,
    }, columns=REPORT_COLUMNS)


def match_by_key(samples: pd.DataFrame, candidates: pd.DataFrame, key: list[str]) -> tuple[pd.Series, pd.Series]:
    """For each sample: the path of the one candidate with equal ``key`` entities, and the
    number of such candidates (0 or >1 means no path)."""
    left = samples[key].reset_index()
    counts = candidates.groupby(key, sort=False).agg(n=("path", "size"), paths=("path", list)).reset_index()
    merged = left.merge(counts, on=key, how="left").set_index("index")
    n = merged["n"].fillna(0).astype(int)
    paths = merged["paths"].map(lambda p: p if isinstance(p, list) else [])
    return paths, n


def bids_samples(files: pd.DataFrame, root: Path, channels: dict[str, dict], rules: dict,
                 channel_keys: set[str]) -> tuple[pd.DataFrame, list[pd.DataFrame], list[str]]:
    """One sample per image of the first (reference) channel, with the other channels matched.

    ``channels`` maps names to Conditions (bids_filters merged with the channel's own). Images
    match when every entity agrees except suffix, extension and the entities ``channel_keys``
    that channel filters set. Returns (samples, report parts, key entities).
    """
    names, absolute, selected = list(channels), str(root.absolute()) + "/", {}
    for name, conds in channels.items():
        selected[name] = bidsindex.select(files, conds)
        if selected[name].empty:
            raise InputError(bidsindex.explain_empty(files, conds, f"bids_filters + channels.{name}"))
    reference = selected[names[0]]
    used = set().union(*(used_entities(s, rules) for s in selected.values()))
    ignored = set(UNMATCHED) | (channel_keys - {"subject", "session"})
    key = [n for n in rules if n in used and n not in ignored]
    samples = reference.reindex(columns=list(dict.fromkeys(["path", "subject", "session", *key])), fill_value="")
    samples["participant_id"] = "sub-" + samples["subject"]
    samples["image_id"] = image_ids(samples, key, rules)
    samples["path"] = absolute + samples["path"]
    samples, report = unique_ids(samples, names[0])
    for name in names[1:]:
        samples, lost = match_channel(samples, selected[name].reindex(columns=["path", *key], fill_value=""), key, name, absolute)
        report += lost
    return samples, report, key


def unique_ids(samples: pd.DataFrame, channel: str) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Drop (and report) samples whose image id is shared or not a valid id."""
    clash = samples["image_id"].duplicated(keep=False)
    shared = samples[clash].groupby("image_id")["path"].agg(", ".join)
    report = [report_rows(samples[clash], [f"several {channel} images for one sample ({shared[i]}); narrow "
                                          f"bids_filters or channels.{channel} to one" for i in samples.loc[clash, "image_id"]])]
    samples = samples[~clash]
    invalid = ~samples["image_id"].str.fullmatch(IMAGE_ID.pattern)
    report.append(report_rows(samples[invalid], "labels must be letters and digits only (no '+') to form an image id"))
    return samples[~invalid], report


def match_channel(samples: pd.DataFrame, candidates: pd.DataFrame, key: list[str], name: str,
                  absolute: str) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Add ``path_<name>``: the one candidate image with the sample's ``key`` entities; samples with
    none or several are dropped and reported."""
    paths, n = match_by_key(samples, candidates, key)
    samples = samples.assign(**{f"path_{name}": [absolute + p[0] if len(p) == 1 else "" for p in paths]})
    report = [report_rows(samples[n == 0], f"no {name} image with the same entities (channels.{name})"),
              report_rows(samples[n > 1], [f"{len(p)} {name} images match ({', '.join(p)}); narrow channels.{name} to one"
                                           for p in paths[n > 1]])]
    return samples[n == 1], report


def apply_policy(samples: pd.DataFrame, column: str, policy: str, by: list[str]) -> pd.Series:
    """Mask of the samples a ``sessions``/``runs`` policy keeps: all, first, last or a named label.

    ``first``/``last`` order labels numerically when they are numbers (else alphabetically) within
    each ``by`` group; samples without the entity are kept by first/last when their group has none.
    """
    values = entity(samples, column)
    prefix = {"session": "ses", "run": "run"}[column]
    if policy == "all":
        return pd.Series(True, index=samples.index)
    if policy not in ("first", "last"):
        wanted = strip_prefix(policy, prefix)
        if column == "run" and wanted.isdigit():
            return pd.to_numeric(values, errors="coerce") == int(wanted)
        return values == wanted
    order = values.map(label_order)
    groups = [samples[b] for b in by] if by else [pd.Series(0, index=samples.index)]
    pick = order.groupby(groups).transform("min" if policy == "first" else "max")
    return order == pick


def label_order(label: str) -> tuple:
    """Sort key of an entity label: absent first, numbers by value, then text."""
    return (0, 0, "") if label == "" else (1, int(label), "") if label.isdigit() else (2, 0, label)


# --- samples from a non-BIDS folder -----------------------------------------------------------

def pattern_regex(pattern: str) -> re.Pattern:
    """A glob pattern with ``{id}`` captures as a regex: ``*`` and ``?`` stay within a folder, ``**/`` spans folders."""
    out, seen = [], False
    for part in re.split(r"(\{id\}|\*\*/|\*\*|\*|\?)", pattern):
        if part == "{id}":
            out.append("(?P=id)" if seen else "(?P<id>[^/]+)")
            seen = True
        else:
            out.append({"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part)))
    if not seen:
        raise InputError(f"non_bids.pattern {pattern!r} has no {{id}}; mark where the participant id is, "
                         "e.g. images/{id}_t1.nii.gz.")
    return re.compile("".join(out))


def non_bids_label(raw: str) -> str:
    """A participant label from a non-BIDS id: ``sub-`` prefix dropped, letters and digits kept (``002_S_0295`` → ``002S0295``)."""
    return re.sub(r"[^A-Za-z0-9]", "", strip_prefix(raw, "sub"))


def find_pattern(root: Path, pattern: str) -> pd.DataFrame:
    """Files under ``root`` matching a non-BIDS pattern: columns id (as written), label, path (absolute)."""
    regex = pattern_regex(pattern)
    rows = []
    for path in sorted(root.glob(pattern.replace("{id}", "*"))):
        match = regex.fullmatch(path.relative_to(root).as_posix())
        if match and path.is_file():
            rows.append((match["id"], non_bids_label(match["id"]), str(path.absolute())))
    return pd.DataFrame(rows, columns=["id", "label", "path"])


def non_bids_samples(root: Path, patterns: dict[str, str]) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """One sample per id found by the first channel's pattern, other channels matched by id."""
    found = {}
    for name, pattern in patterns.items():
        found[name] = find_pattern(root, pattern)
        if found[name].empty:
            raise InputError(f"non_bids pattern {pattern!r} (channel {name}) matches no file under {root}.")
    names = list(found)
    samples = found[names[0]]
    for label, rows in samples.groupby("label"):
        if rows["id"].nunique() > 1:
            raise InputError(f"ids {', '.join(sorted(set(rows['id'])))} all become participant sub-{label} "
                             "(only letters and digits are kept); rename all but one of the files.")
    samples = samples.assign(participant_id="sub-" + samples["label"], session="")
    samples = samples.assign(image_id=samples["participant_id"], subdir=samples["participant_id"])
    several = samples.duplicated("label", keep=False)
    report = [report_rows(samples[several], "several files match non_bids.pattern for this id; make it match one")]
    samples = samples[~several]
    for name in names[1:]:
        paths, n = match_by_key(samples, found[name], ["label"])
        samples = samples.assign(**{f"path_{name}": [p[0] if len(p) == 1 else "" for p in paths]})
        report.append(report_rows(samples[n == 0], f"no {name} image for this id (non_bids.pattern.{name})"))
        report.append(report_rows(samples[n > 1], [f"{len(p)} {name} images match ({', '.join(p)})" for p in paths[n > 1]]))
        samples = samples[n == 1]
    return samples.drop(columns=["id", "label"]), report


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
    return InputError(f"{path} has no column {target!r} (the configured `target`). "
                      f"Its columns are: {', '.join(columns)}. Set `target` to one of them, or add the column.")


# --- the whole stage ------------------------------------------------------------------------

def ingest(bids_dir: Path, target: str | None, task: str, filters: dict | None = None, *,
           channels: dict | None = None, sessions: str = "all", runs: str = "all",
           include=(), exclude=(), target_source: str = "participants", label_image: dict | None = None,
           non_bids: dict | None = None, check_data: bool = True, cache_dir: Path | None = None,
           limits: dict | None = None, on_error: str = "continue") -> Ingested:
    """Select, match, join and check (see the module docstring): manifest, report and target info.

    Arguments are the config keys of the same names (config/README.md; ``limits`` is
    ``image_limits``); ``cache_dir`` keeps the parsed index and header checks between runs.
    ``target`` None selects images without joining a target table (applying a trained model:
    ``pipeline.apply``). ``on_error: stop`` raises InputError at the first exclusion instead of
    reporting it.
    """
    bids_dir = Path(bids_dir)
    channels = channels or DEFAULT_CHANNELS
    if non_bids:
        samples, report = non_bids_input(bids_dir, non_bids, channels, sessions, runs, target_source, label_image)
        matched = samples
    else:
        samples, report, matched = bids_input(bids_dir, DEFAULT_FILTERS if filters is None else filters, channels,
                                              sessions, runs, label_image, cache_dir)
    include, exclude = {with_sub_prefix(p) for p in include}, {with_sub_prefix(p) for p in exclude}
    reported = set().union(*(r["participant_id"] for r in report))
    seen = set(matched["participant_id"]) | reported  # participants with at least one selected image
    dropped = set(matched["participant_id"]) - set(samples["participant_id"]) - reported  # by sessions/runs only
    samples = samples[chosen(samples["participant_id"], include, exclude)]
    images = [c for c in samples.columns if c == "path" or c.startswith("path_") or c == "label"]

    participants, source = None, None
    if target is not None:
        samples, table_report, participants, source = join_targets(samples, bids_dir, target, task, target_source,
                                                                   non_bids)
        report += table_report
    if participants is not None:
        report.append(unimaged(participants[chosen(participants, include, exclude)], seen, dropped, f"sessions: {sessions}, runs: {runs}"))

    problems = image_problems([p for c in images for p in samples[c]], check_data, cache_dir, limits)
    for column in images:
        reasons = samples[column].map(problems)
        bad = reasons != ""
        what = "" if column == "path" else f"{column.removeprefix('path_')} image: "
        report.append(report_rows(samples[bad], what + reasons[bad], path_column=column))
        samples = samples[~bad]

    report = pd.concat([r for r in report if len(r)] or [pd.DataFrame(columns=REPORT_COLUMNS)], ignore_index=True)
    if on_error == "stop" and len(report):
        raise stop_error(report)
    if samples.empty:
        more = f"\n(and {len(report) - 20} more)" if len(report) > 20 else ""
        wanted = f" for target {target!r}" if target else ""
        raise InputError(f"No usable image in {bids_dir}{wanted}; the exclusions:\n"
                         f"{report.head(20).to_string()}{more}")
    manifest = samples.sort_values("image_id", ignore_index=True)
    classes = sorted(set(manifest[target])) if task == "classification" and target else None  # as pipeline.data encodes them
    return Ingested(manifest, report, {"target": target, "task": task, "source": source, "classes": classes})


def stop_error(report: pd.DataFrame) -> InputError:
    """The error ``on_error: stop`` ends ingestion with: the first exclusion, its file and reason."""
    first = report.iloc[0]
    what = first["path"] or first["image_id"] or first["participant_id"]
    who = f" ({first['image_id'] or first['participant_id']})" if first["path"] else ""
    more = f" ({len(report) - 1} more exclusions follow it)" if len(report) > 1 else ""
    return InputError(f"{what}{who}: {first['reason']}.{more} With `on_error: stop` the first excluded sample ends "
                      "the run: fix it, or set `on_error: continue` to leave such samples out and list them "
                      "in excluded.tsv.")


def chosen(ids: pd.Series, include: set[str], exclude: set[str]) -> pd.Series:
    """Mask of the participant ids that ``participants.include``/``exclude`` keep."""
    return (ids.isin(include) if include else pd.Series(True, index=ids.index)) & ~ids.isin(exclude)


def bids_input(bids_dir: Path, filters: dict, channels: dict, sessions: str, runs: str, label_image: dict | None,
               cache_dir: Path | None) -> tuple[pd.DataFrame, list[pd.DataFrame], pd.DataFrame]:
    """Samples of a BIDS dataset after the sessions/runs policy, with label images when asked.

    Returns (samples with the manifest's path columns, report parts, samples before the policy).
    """
    check_bids_root(bids_dir)
    rules = bidsindex.entity_rules(("bids",))
    conds = {name: {**bidsindex.conditions(filters, rules, "bids_filters"),
                    **bidsindex.conditions(extra, rules, f"channels.{name}")} for name, extra in channels.items()}
    files = bidsindex.load_index(bids_dir, cache_dir)
    if files.empty:
        raise InputError(f"{bids_dir} holds no NIfTI image (.nii or .nii.gz) under its sub-* folders. Add the "
                         "images (with DataLad or git-annex: `datalad get` them), or point `bids_dir` elsewhere.")
    channel_keys = {k for extra in channels.values() for k in (extra or {})}
    matched, report, key = bids_samples(files, bids_dir, conds, rules, channel_keys)
    samples = matched[apply_policy(matched, "session", sessions, ["participant_id"])]
    samples = samples[apply_policy(samples, "run", runs, ["participant_id", "session"])]
    if samples.empty:
        raise InputError(f"No image is left after `sessions: {sessions}` and `runs: {runs}`. Sessions: "
                         f"{bidsindex.value_counts(matched, 'session')}; runs: {bidsindex.value_counts(matched, 'run')}.")
    if label_image:
        samples, label_report = attach_labels(samples, bids_dir, label_image, key, cache_dir)
        report += label_report
    session = np.where(samples["session"] != "", "ses-" + samples["session"], "")
    samples = samples.assign(session=session, subdir=samples["participant_id"] + np.where(session != "", "/" + session, ""))
    paths = [c for c in samples.columns if c.startswith("path_") or c == "label"]
    return samples[MANIFEST_COLUMNS + paths], report, matched


def non_bids_input(root: Path, non_bids: dict, channels: dict, sessions: str, runs: str, target_source: str,
                   label_image: dict | None) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """Samples of a non-BIDS folder (``non_bids.pattern``; a mapping gives one pattern per channel)."""
    if label_image or target_source != "participants" or sessions != "all" or runs != "all":
        raise InputError("non_bids input has no sessions, runs or derivatives: use it with sessions: all, "
                         "runs: all, target_source: participants and label_image: null.")
    if not root.is_dir():
        raise InputError(f"bids_dir {root} (the non_bids root) is not a folder.")
    pattern = non_bids["pattern"]
    patterns = pattern if isinstance(pattern, dict) else {next(iter(channels)): pattern}
    samples, report = non_bids_samples(root, patterns)
    return samples[[*MANIFEST_COLUMNS, *(c for c in samples.columns if c.startswith("path_"))]], report


def attach_labels(samples: pd.DataFrame, bids_dir: Path, label_image: dict, key: list[str],
                  cache_dir: Path | None = None) -> tuple[pd.DataFrame, list]:
    """Add the ``label`` column: the one derivatives image whose entities match each sample.

    Matched on the sample's key entities except datatype and those ``label_image.filters`` set;
    derivative-only entities (desc-, space-, label-…) must be pinned by the filters when they vary.
    """
    root = Path(label_image["derivatives"])
    root = root if root.is_absolute() else bids_dir / root
    if not root.is_dir():
        raise InputError(f"label_image.derivatives {root} is not a folder (relative paths start at bids_dir).")
    rules = bidsindex.entity_rules(("bids", "derivatives"))
    conds = bidsindex.conditions(label_image.get("filters") or {}, rules, "label_image.filters")
    files = bidsindex.load_index(root, cache_dir, ("bids", "derivatives"))
    labels = bidsindex.select(files, conds) if not files.empty else files
    if labels.empty:
        raise InputError(bidsindex.explain_empty(files, conds, f"label_image (under {root})") if not files.empty
                         else f"label_image.derivatives {root} holds no NIfTI image under sub-* folders.")
    match_key = [k for k in key if k not in conds and k != "datatype"]
    labels = labels.reindex(columns=["path", *match_key], fill_value="")
    paths, n = match_by_key(samples, labels, match_key)
    absolute = str(root.absolute()) + "/"
    samples = samples.assign(label=[absolute + p[0] if len(p) == 1 else "" for p in paths])
    report = [report_rows(samples[n == 0], f"no label image in {root} with the same entities ({', '.join(match_key)})"),
              report_rows(samples[n > 1], [f"{len(p)} label images match ({', '.join(p)}); pin the entity that "
                                           "differs in label_image.filters" for p in paths[n > 1]])]
    return samples[n == 1], report


class TargetTable(NamedTuple):
    """A table of targets and how samples join it."""

    rows: pd.DataFrame  # the join columns ``on`` and the table's own columns
    on: list[str]
    absent: object  # row → reason, for samples the table has no row for
    where: str  # the file(s), for messages
    participants: pd.Series | None  # participant ids the table lists (None: not a per-participant table)
    source: str  # targets.json "source"


def join_targets(samples: pd.DataFrame, bids_dir: Path, target: str, task: str, target_source: str,
                 non_bids: dict | None) -> tuple[pd.DataFrame, list, pd.Series | None, str]:
    """Join the target table by id and keep samples with a usable target.

    Returns (samples, report parts, participant ids of the participants table or None, source name).
    """
    if non_bids:
        table = non_bids_table(bids_dir, non_bids, target)
    elif target_source == "participants":
        table = participants_table(bids_dir, target)
    else:
        table = sessions_table(bids_dir, sorted(samples["participant_id"].unique()), target)
    joined, report = join_table(samples, table.rows, table.on, table.absent, table.where)
    joined, bad = check_targets(joined, target, task)
    bad["reason"] = bad["reason"] + f"; correct it in {table.where} or leave the participant out (participants.exclude)"
    return joined, [report, bad], table.participants, table.source


def participants_table(bids_dir: Path, target: str) -> TargetTable:
    """participants.tsv, joined by participant id."""
    participants = read_participants(bids_dir)
    if target not in participants.columns:
        raise missing_column_error(target, bids_dir / "participants.tsv", participants.columns)
    return TargetTable(participants.reset_index(), ["participant_id"], lambda row: "participant not listed in participants.tsv; add "
                       "its row (with the target) or leave it out (participants.exclude)",
                       str(bids_dir / "participants.tsv"), participants.index.to_series(), "participants.tsv")


def sessions_table(bids_dir: Path, participant_ids: list[str], target: str) -> TargetTable:
    """The participants' sessions.tsv files joined by participant and session; participants.tsv
    (optional) adds its other columns."""
    sessions, absent = read_sessions(bids_dir, participant_ids)
    if sessions.empty:
        raise InputError(f"No sub-*/sub-*_sessions.tsv found in {bids_dir} for the selected participants; "
                         "target_source: sessions needs them.")
    where = str(bids_dir / "sub-*/sub-*_sessions.tsv")
    if target not in sessions.columns:
        raise missing_column_error(target, where, [c for c in sessions.columns if c not in ("participant_id", "session")])
    listed = None
    if (bids_dir / "participants.tsv").exists():
        participants = read_participants(bids_dir)
        listed = participants.index.to_series()
        extra = participants[[c for c in participants.columns if c not in sessions.columns]].reset_index()
        sessions = sessions.merge(extra, on="participant_id", how="left").fillna("")

    def absent_reason(row) -> str:
        pid = row["participant_id"]
        if pid in absent:
            return f"no {pid}/{pid}_sessions.tsv (target_source: sessions)"
        if not row["session"]:
            return "image has no session, so it has no row in a sessions.tsv (target_source: sessions)"
        return f"session {row['session']} not listed in {pid}/{pid}_sessions.tsv"

    return TargetTable(sessions, ["participant_id", "session"], absent_reason, where, listed, "sessions.tsv")


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


def unimaged(participants: pd.Series, seen: set, dropped: set, policy: str) -> pd.DataFrame:
    """Report rows for table participants without a selected image (``seen``) or whose images the
    sessions/runs policy left out (``dropped``); images lost at later steps are reported as images."""
    rows = []
    for pid in sorted(set(participants)):
        if pid not in seen:
            rows.append((pid, "", "", "participant has no image matching the filters; add its image, "
                                "check bids_filters/channels, or remove its row"))
        elif pid in dropped:
            rows.append((pid, "", "", f"no image left after {policy}"))
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def write_outputs(result: Ingested, manifest: Path, report: Path, targets: Path) -> None:
    """The three outputs: manifest and report TSVs, target JSON; each replaced whole (never half-written)."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    # Nested: nothing is renamed into place unless all three were written.
    with atomic.path(targets) as t:
        t.write_text(json.dumps(result.targets, indent=2) + "\n")
        with atomic.path(report) as r:
            result.report.to_csv(r, sep="\t", index=False)
            with atomic.path(manifest) as m:
                result.manifest.to_csv(m, sep="\t", index=False)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="BIDS dataset root (or the non_bids root)")
    wanted = parser.add_mutually_exclusive_group(required=True)
    wanted.add_argument("--target", help="column of the target table")
    wanted.add_argument("--no-target", action="store_true", help="select images only, join no target table")
    parser.add_argument("--task", choices=["regression", "classification"], required=True)
    parser.add_argument("--filters", type=json.loads, default=DEFAULT_FILTERS, help="JSON: bids_filters")
    parser.add_argument("--channels", type=json.loads, default=DEFAULT_CHANNELS, help="JSON: channels")
    parser.add_argument("--sessions", default="all", help="all, first, last or a session label")
    parser.add_argument("--runs", default="all", help="all, first, last or a run label")
    parser.add_argument("--include", nargs="*", default=[])
    parser.add_argument("--exclude", nargs="*", default=[])
    parser.add_argument("--target-source", choices=["participants", "sessions"], default="participants")
    parser.add_argument("--label-image", type=json.loads, default=None, help="JSON: label_image")
    parser.add_argument("--non-bids", type=json.loads, default=None, help="JSON: non_bids")
    parser.add_argument("--check-data", action=argparse.BooleanOptionalAction, default=True,
                        help="read every image's data (NaN/Inf, constant); the header is always read")
    parser.add_argument("--limits", type=json.loads, default=None, help="JSON: image_limits")
    parser.add_argument("--on-error", choices=["continue", "stop"], default="continue",
                        help="continue: exclude and report bad samples; stop: fail at the first")
    parser.add_argument("--cache-dir", "--database-dir", type=Path, help="keeps the file index and checks between runs")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--targets", type=Path, help="target JSON (default: targets.json next to the manifest)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        for folder in dict.fromkeys(p.parent for p in (args.manifest, args.report, args.targets or args.manifest)):
            check_writable(folder)  # before the work, not after it
        result = ingest(args.bids_dir, args.target, args.task, args.filters, channels=args.channels,
                        sessions=args.sessions, runs=args.runs, include=args.include, exclude=args.exclude,
                        target_source=args.target_source, label_image=args.label_image, non_bids=args.non_bids,
                        check_data=args.check_data, cache_dir=args.cache_dir, limits=args.limits,
                        on_error=args.on_error)
    write_outputs(result, args.manifest, args.report, args.targets or args.manifest.parent / "targets.json")
    manifest, report = result.manifest, result.report
    print(f"{len(manifest)} samples of {manifest['participant_id'].nunique()} participants; "
          f"{len(report)} exclusions (see {args.report})", file=sys.stderr)
    for row in report.itertuples(index=False):
        print(f"excluded {row.image_id or row.participant_id}: {row.reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
