"""The samples of a BIDS dataset: entity filters per channel, one sample per reference-channel
image with its image id, the other channels and the label image matched by entities, the
sessions/runs policies and the participants' include/exclude lists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.intake import bidsindex
from pipeline.common.errors import InputError
from pipeline.intake.ids import strip_prefix
from pipeline.intake.reportrows import report_rows

MANIFEST_COLUMNS = ["image_id", "participant_id", "session", "subdir", "path"]
DERIVED_COLUMNS = ("label", "brain_mask")  # images from derivatives folders, per sample (config label_image, brain_mask)
IMAGE_ID = re.compile(r"sub-[A-Za-z0-9]+(_[a-z]+-[A-Za-z0-9]+)*")
UNMATCHED = ("suffix", "extension")  # never part of the entities that match channels


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


def chosen(ids: pd.Series, include: set[str], exclude: set[str]) -> pd.Series:
    """Mask of the participant ids that ``participants.include``/``exclude`` keep."""
    return (ids.isin(include) if include else pd.Series(True, index=ids.index)) & ~ids.isin(exclude)


def bids_input(bids_dir: Path, filters: dict, channels: dict, sessions: str, runs: str, label_image: dict | None,
               cache_dir: Path | None, brain_mask: dict | None = None
               ) -> tuple[pd.DataFrame, list[pd.DataFrame], pd.DataFrame]:
    """Samples of a BIDS dataset after the sessions/runs policy, with label images and brain masks
    (columns ``label``, ``brain_mask``) when asked.

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
    if brain_mask:
        samples, mask_report = attach_labels(samples, bids_dir, brain_mask, key, cache_dir, "brain_mask", "brain_mask")
        report += mask_report
    session = np.where(samples["session"] != "", "ses-" + samples["session"], "")
    samples = samples.assign(session=session, subdir=samples["participant_id"] + np.where(session != "", "/" + session, ""))
    paths = [c for c in samples.columns if c.startswith("path_") or c in DERIVED_COLUMNS]
    return samples[MANIFEST_COLUMNS + paths], report, matched


def attach_labels(samples: pd.DataFrame, bids_dir: Path, label_image: dict, key: list[str],
                  cache_dir: Path | None = None, column: str = "label", config_key: str = "label_image"
                  ) -> tuple[pd.DataFrame, list]:
    """Add the ``column`` (``label``): the one derivatives image whose entities match each sample,
    as config ``config_key`` (``label_image``, or ``brain_mask``: {derivatives, filters}) selects.

    Matched on the sample's key entities except datatype and those ``<config_key>.filters`` set;
    derivative-only entities (desc-, space-, label-…) must be pinned by the filters when they vary.
    """
    root = Path(label_image["derivatives"])
    root = root if root.is_absolute() else bids_dir / root
    if not root.is_dir():
        raise InputError(f"{config_key}.derivatives {root} is not a folder (relative paths start at bids_dir).")
    rules = bidsindex.entity_rules(("bids", "derivatives"))
    conds = bidsindex.conditions(label_image.get("filters") or {}, rules, f"{config_key}.filters")
    files = bidsindex.load_index(root, cache_dir, ("bids", "derivatives"))
    labels = bidsindex.select(files, conds) if not files.empty else files
    if labels.empty:
        raise InputError(bidsindex.explain_empty(files, conds, f"{config_key} (under {root})") if not files.empty
                         else f"{config_key}.derivatives {root} holds no NIfTI image under sub-* folders.")
    match_key = [k for k in key if k not in conds and k != "datatype"]
    labels = labels.reindex(columns=["path", *match_key], fill_value="")
    paths, n = match_by_key(samples, labels, match_key)
    absolute = str(root.absolute()) + "/"
    samples = samples.assign(**{column: [absolute + p[0] if len(p) == 1 else "" for p in paths]})
    what = "label image" if column == "label" else column.replace("_", " ")
    report = [report_rows(samples[n == 0], f"no {what} in {root} with the same entities ({', '.join(match_key)})"),
              report_rows(samples[n > 1], [f"{len(p)} {what}s match ({', '.join(p)}); pin the entity that "
                                           f"differs in {config_key}.filters" for p in paths[n > 1]])]
    return samples[n == 1], report
