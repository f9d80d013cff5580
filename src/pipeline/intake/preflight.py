"""Pre-flight: what a study will find in its dataset, said before anything runs.

``bids-deepstudy check`` and ``bids-deepstudy run`` (before Snakemake plans anything) call
``preflight(config)``. It reads what ingestion reads first and nothing more: the BIDS index and
every selected image's NIfTI header (``pipeline.intake.ingest`` with ``check_data: false``, sharing
ingest's cache folder when one is given), never the image data. From that it reports:

- errors (the run would stop): ``bids_dir`` missing or not BIDS, a ``target`` the table lacks (with
  the closest column), a text target under ``task: regression``, a single class, no usable image,
  a cohort too small for ``split.folds`` and ``split.test``, and under ``on_error: stop`` every
  exclusion (the first one would end ingestion), an ``explain.groundtruth`` without the target's mask;
- warnings (the run goes on without them): unreadable or unusable headers, participants without
  images, images without a participants row, missing or non-numeric target values, classes with
  too few participants for the test share and the folds (with the expected number per split), a
  fold that trains on fewer than 10 participants of a class (``split.small_training_sets``: the
  numbers, and the ``split.folds`` that would reach 10),
  a target whose values look like the other task's;
- a summary: participants, images per channel and session, the target, and the design (folds and
  test participants, drawn with the study's own split method and seed).

Every line names the file, row or key and says what to do. The dataset is only read.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common.config import fill, schema
from pipeline.common.errors import InputError
from pipeline.common.paths import missing_groundtruth
from pipeline.intake import split
from pipeline.intake.imagecheck import image_problems
from pipeline.intake.ingest import IngestSettings, ingest

SHOWN = 5  # ids or files named per finding before "and N more"
MAX_EXCLUSIONS = 20  # exclusion lines shown before the rest is counted
CONTINUOUS = 10  # a classification target with more distinct numbers than this looks continuous


@dataclass
class Findings:
    """What the pre-flight found: errors stop a run, warnings do not, the summary says what runs."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Errors, then warnings, then the summary, one finding per line (prefixed)."""
        return ([f"ERROR: {e}" for e in self.errors] + [f"warning: {w}" for w in self.warnings]
                + list(self.summary))


def for_config(config: dict, folder: Path = Path("."), split: bool = True) -> Findings:
    """The pre-flight of a schema-checked ``config`` run from ``folder`` (relative ``bids_dir`` and
    ``results_dir`` start there; the schema's defaults are filled in). Ingest's cache folder
    (``<work_dir or results_dir>/ingest_cache``) is used when that folder exists already; otherwise
    nothing is written. ``split``: False for the BIDS-App participant level, which makes no split."""
    filled = fill(schema(), config)
    filled["bids_dir"] = str((Path(folder) / filled["bids_dir"]).absolute())  # messages name the folder looked at
    work = Path(folder) / (filled["work_dir"] or filled["results_dir"])
    found = preflight(filled, work / "ingest_cache" if work.is_dir() else None, split)
    found.errors += groundtruth_problems(filled, Path(folder))
    return found


def groundtruth_problems(config: dict, folder: Path) -> list[str]:
    """``explain.groundtruth`` without the target's mask (the demo's, carried into another study's
    config): the last explain job would stop on it, so the pre-flight says it first."""
    truth_dir, target = config["explain"]["groundtruth"], config["target"]
    if not truth_dir or not target or config["task"] == "segmentation" or config["apply"]:
        return []
    problem = missing_groundtruth(Path(folder) / truth_dir, target)
    return [problem] if problem else []


def named(items, shown: int = SHOWN) -> str:
    """``a, b, c and 4 more``."""
    items = list(items)
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(map(str, items[:shown])) + more


def is_number(value: str) -> bool:
    """True for a finite number written as text."""
    try:
        return bool(np.isfinite(float(value)))
    except ValueError:
        return False


def preflight(config: dict, cache_dir: Path | None = None, split: bool = True) -> Findings:
    """The pre-flight of a config filled in with the schema's defaults (see the module docstring).

    ``cache_dir``: ingest's cache folder (``<results_dir>/ingest_cache``), reused and updated;
    None reads the index and headers afresh and writes nothing. ``split``: False leaves out the
    split's checks (folds, test share, classes per split) and its summary line.
    """
    found = Findings()
    apply = bool(config["apply"])
    task = config["task"]
    target = None if apply else config["target"]
    split_task = "classification" if task == "segmentation" else task
    try:
        # Selected as classification so that text values stay in view: the task's own test follows.
        # Headers only, every exclusion reported (not stopped at), the positive class checked below.
        settings = replace(IngestSettings.of(config), target=target, task="classification", positive_class=None,
                           check_data=False, on_error="continue")
        result = ingest(settings, cache_dir=cache_dir)
    except InputError as exc:
        found.errors.append(str(exc))
        return found
    manifest, report = result.manifest, result.report
    report = with_headers(report, cache_dir, config["image_limits"])
    non_bids = config["non_bids"]
    table = Path(config["bids_dir"]) / (non_bids["table"] if non_bids else "participants.tsv")  # absolute stays
    exclusions(report, config["on_error"] == "stop", found, table)
    if target is not None and task == "regression":
        manifest = regression_values(manifest, target, result.targets["source"] or "the target table", found)
    elif target is not None and task == "classification":
        classification_values(manifest, target, config["positive_class"], found)
    if manifest.empty:
        if not found.errors:
            found.errors.append(f"No usable image is left in {config['bids_dir']}: see the warnings above.")
        return found
    channels = list(config["channels"])
    design = None if apply or not split else design_findings(manifest, target, split_task, config["split"], found)
    found.summary[:0] = [headline(manifest, channels, design), selection_line(manifest, channels)]
    if target is not None:
        found.summary.insert(2, target_line(manifest, target, task))
    return found


# --- exclusions -----------------------------------------------------------------------------

def kind(row) -> str:
    """The finding an ingest exclusion belongs to."""
    reason = row.reason
    if reason.startswith("participant has no image"):
        return "unimaged"
    if reason.startswith("participant not listed in"):
        return "unlisted"
    if " is missing (" in reason and reason.startswith("target "):
        return "missing"
    return "other"


def with_headers(report: pd.DataFrame, cache_dir: Path | None, limits: dict) -> pd.DataFrame:
    """``report`` plus a row for each image excluded before ingest read its header (no participants
    row, no target value) whose header is unusable too: both need fixing."""
    earlier = report[(report["path"] != "") & report["reason"].str.startswith(("participant not listed", "target "))]
    problems = image_problems(list(earlier["path"]), False, cache_dir, limits)
    bad = earlier[earlier["path"].map(problems) != ""]
    return pd.concat([report, bad.assign(reason=bad["path"].map(problems))], ignore_index=True)


def exclusions(report: pd.DataFrame, stop: bool, found: Findings, table: Path) -> None:
    """Ingest's exclusions as findings: warnings, or errors under ``on_error: stop``."""
    if report.empty:
        return
    out = found.errors if stop else found.warnings
    action = (" With `on_error: stop` the first of these ends ingestion: fix them, or set `on_error: continue`."
              if stop else "")
    report = report.assign(kind=[kind(r) for r in report.itertuples(index=False)])
    unimaged = report.loc[report["kind"] == "unimaged", "participant_id"]
    if len(unimaged):
        out.append(f"{table} lists {len(unimaged)} participant(s) without an image the filters select: "
                   f"{named(unimaged)}. Add their images, check `bids_filters`/`channels`, or remove their rows."
                   + action)
    unlisted = report[report["kind"] == "unlisted"]
    if len(unlisted):
        out.append(f"{len(unlisted)} image(s) of participant(s) not listed in {table}: "
                   f"{named(unlisted['participant_id'].unique())} ({named(unlisted['path'], 2)}). Add their rows "
                   "(with the target), or leave them out with `participants.exclude`." + action)
    missing = report[report["kind"] == "missing"]
    if len(missing):
        out.append(f"{len(missing)} image(s) have no target value ({missing['reason'].iloc[0].split(';')[0]}): "
                   f"{named(missing['participant_id'].unique())}. Fill in the value, or leave them out "
                   "(participants.exclude)." + action)
    other = report[report["kind"] == "other"]
    for row in other.head(MAX_EXCLUSIONS).itertuples(index=False):
        what = row.path or row.image_id or row.participant_id
        who = f" ({row.image_id or row.participant_id})" if row.path else ""
        out.append(f"{what}{who}: {row.reason}." + action)
    if len(other) > MAX_EXCLUSIONS:
        out.append(f"... and {len(other) - MAX_EXCLUSIONS} more excluded images; ingest lists every one in "
                   "ingest_report.tsv.")


# --- the target's values ----------------------------------------------------------------------

def regression_values(manifest: pd.DataFrame, target: str, source: str, found: Findings) -> pd.DataFrame:
    """The samples with a numeric target; text values are an error (all) or a warning (some)."""
    numeric = manifest[target].map(is_number)
    text = manifest.loc[~numeric]
    if len(manifest) and not numeric.any():
        values = sorted(set(text[target]))
        found.errors.append(f"`target: {target}` with `task: regression`: every value in {source} is text "
                            f"({named(map(repr, values))}); it looks categorical: use `task: classification` "
                            f"(or set `target` to a numeric column).")
        return manifest.iloc[0:0]
    if len(text):
        rows = [f"{p} ({v!r})" for p, v in zip(text["participant_id"], text[target])]
        found.warnings.append(f"{len(text)} value(s) of `{target}` in {source} are not numbers: {named(rows)}; "
                              "these images will be excluded. Correct the values, or leave the participants out "
                              "(participants.exclude).")
    kept = manifest.loc[numeric]
    distinct = sorted(set(kept[target].astype(float)))
    if 1 <= len(distinct) <= 2 and len(kept) > 2:
        found.warnings.append(f"`{target}` has only {len(distinct)} distinct value(s) ({named(f'{v:g}' for v in distinct)}) "
                              "under `task: regression`: if they are classes, use `task: classification`.")
    return kept


def classification_values(manifest: pd.DataFrame, target: str, positive_class, found: Findings) -> None:
    """Classes of a classification target: one class is an error, many numbers look continuous."""
    classes = sorted(set(manifest[target]))
    numeric = bool(classes) and all(is_number(c) for c in classes)
    if len(classes) == 1:
        found.errors.append(f"`target: {target}` has a single class ({classes[0]!r}) among the selected images; "
                            "classification needs two or more: check `target`, `participants.include`, or the data.")
    elif numeric and len(classes) > CONTINUOUS:
        found.warnings.append(f"`target: {target}` has {len(classes)} distinct numeric values under "
                              "`task: classification`; it looks continuous: use `task: regression`.")
    elif numeric:
        found.summary.append(f"note: `{target}` holds numbers ({named(classes)}); classification treats them as "
                             "class names.")
    if positive_class is not None and classes and str(positive_class) not in classes:
        found.errors.append(f"`positive_class: {positive_class}` is not a class of `{target}` "
                            f"(classes: {named(classes, 20)}). Set it to one of them, or to null.")


# --- summary and design -----------------------------------------------------------------------

def headline(manifest: pd.DataFrame, channels: list[str], design: pd.DataFrame | None) -> str:
    """``38 participants, 41 images, 1 channel → 5 folds; 8 test participants``."""
    n, people = len(manifest), manifest["participant_id"].nunique()
    line = (f"{people} participants, {n * len(channels)} images, {len(channels)} "
            f"channel{'s' * (len(channels) != 1)}")
    if design is None:
        return line
    folds = [c for c in design.columns if c.startswith("fold-")]
    n_test = int(design.drop_duplicates("participant_id")["fold-1"].eq("test").sum())
    return f"{line} → {len(folds)} fold{'s' * (len(folds) != 1)}; {n_test} test participant{'s' * (n_test != 1)}"


def selection_line(manifest: pd.DataFrame, channels: list[str]) -> str:
    """``images per channel: T1w 41 (ses-01 38, ses-02 3)``."""
    sessions = manifest["session"].replace("", "no session").value_counts().sort_index()
    per_session = "" if list(sessions.index) == ["no session"] else \
        " (" + ", ".join(f"{s} {c}" for s, c in sessions.items()) + ")"
    return "images per channel: " + ", ".join(f"{c} {len(manifest)}{per_session}" for c in channels)


def target_line(manifest: pd.DataFrame, target: str, task: str) -> str:
    if task == "regression":
        values = manifest[target].astype(float)
        return f"target `{target}` (regression): {values.min():g} to {values.max():g}, mean {values.mean():.3g}"
    counts = manifest.drop_duplicates("participant_id")[target].value_counts().sort_index()
    return f"target `{target}` ({task}): " + ", ".join(f"{c} {n}" for c, n in counts.items()) + " participants"


def design_findings(manifest: pd.DataFrame, target: str | None, task: str, cfg: dict,
                    found: Findings) -> pd.DataFrame | None:
    """The study's split, drawn as the split rule draws it (None when it cannot be): the sizes of its
    validation sets, and the classes it starves."""
    folds, test = cfg["folds"], cfg["test"]
    people = manifest["participant_id"].nunique()
    column = target if target in manifest.columns else None
    table = manifest if column else manifest.assign(_none="0")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the split's own notes; said here instead
            design = split.design(table, column or "_none", task if column else "classification", test, folds,
                                  cfg["val"], cfg["seed"], cfg["bins"], cfg["stratify"], cfg["method"])
    except InputError as exc:
        found.errors.append(f"{people} participants are too few for `split.folds: {folds}` and `split.test: {test}` "
                            f"({exc}) Lower `split.folds` (1 makes one train/validation split), or add participants.")
        return None
    per_participant = design.drop_duplicates("participant_id").set_index("participant_id")
    val = [int((per_participant[c] == "val").sum()) for c in per_participant.columns if c.startswith("fold-")]
    found.summary.append(f"validation participants per fold: {named(val, 10)} (split.method: {cfg['method']}, "
                         f"split.test: {test})")
    if task == "classification" and column:
        class_findings(manifest, design, column, cfg, found)
        found.warnings += [f"{sentence}." for sentence in split.small_training_sets(design, manifest, column).values()]
    return design


def class_findings(manifest: pd.DataFrame, design: pd.DataFrame, target: str, cfg: dict, found: Findings) -> None:
    """A warning per class expected to have fewer than one participant in the test set or a validation set."""
    folds, test = cfg["folds"], cfg["test"]
    per_participant = manifest.groupby("participant_id")[target].agg(lambda v: v.astype(str).mode().iloc[0])
    splits = design.drop_duplicates("participant_id").set_index("participant_id")
    val_share = (1 - test) / folds if folds > 1 else cfg["val"]
    for cls, n in per_participant.value_counts().sort_index().items():
        members = per_participant.index[per_participant == cls]
        in_test = int((splits.loc[members, "fold-1"] == "test").sum())
        in_val = [int((splits.loc[members, c] == "val").sum()) for c in splits.columns if c.startswith("fold-")]
        if n * test < 1 or n * val_share < 1 or in_test == 0 or min(in_val) == 0:
            found.warnings.append(
                f"class {cls!r} of `{target}` has {n} participant(s): expected {n * test:.1f} in the test set "
                f"(split.test {test}) and {n * val_share:.1f} per validation set ({folds} fold(s)); this design "
                f"gives {in_test} in the test set and {named(in_val, 10)} per validation set. A split without the "
                "class has undefined metrics: add participants of this class, lower `split.folds`, or use "
                "`split.method: stratified`.")
