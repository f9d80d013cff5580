"""The samples of a non-BIDS folder: files found by a glob pattern with an ``{id}`` placeholder
(one pattern per channel), their ids made participant labels, other channels matched by id."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from pipeline.common.errors import InputError
from pipeline.intake.ids import strip_prefix
from pipeline.intake.reportrows import report_rows
from pipeline.intake.selection import MANIFEST_COLUMNS, match_by_key


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
