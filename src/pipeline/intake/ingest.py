"""Ingestion: select the images of each sample, join its target, check every header, report exclusions.

Writes ``manifest.tsv`` (one row per usable sample), ``ingest_report.tsv`` (one row per excluded
sample or participant, with the reason) and ``targets.json`` (target, task, source table, class
list). With ``--derivatives``, also the preprocessed images' folder's ``dataset_description.json``
and ``.bidsignore`` (``pipeline.intake.derivatives``). Input is a BIDS dataset, read through pybids'
entity rules (``pipeline.intake.bidsindex``), or a non-BIDS folder described by a glob pattern and a
table. The input is only ever read (its BIDS validation is a job of its own: ``pipeline.intake.bidsvalidation``).

Steps, each reported when it loses a sample: entity filters per channel → one sample per
reference-channel image, other channels and the label image matched by entities → sessions/runs
policy → participant include/exclude → target joined by id → header (and data) checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from pipeline.common import atomic, columns, config
from pipeline.common.cli import add_config
from pipeline.common.errors import InputError
from pipeline.intake import derivatives
from pipeline.intake.imagecheck import image_problems
from pipeline.common.outputs import check_writable
from pipeline.intake.ids import with_sub_prefix
from pipeline.intake.nonbids import non_bids_input
from pipeline.intake.reportrows import REPORT_COLUMNS, report_rows
from pipeline.intake.selection import DERIVED_COLUMNS, MANIFEST_COLUMNS, bids_input, chosen
from pipeline.intake.targets import join_targets
from pipeline.intake.classes import ordered


@dataclass(frozen=True)
class IngestSettings:
    """The config keys ingest reads, by their names (config/README.md), built once by ``of``.
    ``target`` None selects images without joining a target table (apply mode); ``task`` is
    regression or classification (a segmentation study selects as classification: the workflow's
    ``SPLIT_TASK``)."""

    bids_dir: str
    target: str | None
    task: str
    bids_filters: dict
    channels: dict
    sessions: str
    runs: str
    participants: dict  # include, exclude: participant ids, with or without sub-
    target_source: str
    target_fallback: str
    positive_class: str | None
    label_image: dict | None
    brain_mask: dict | None
    non_bids: dict | None
    check_data: bool
    image_limits: dict
    on_error: str

    @classmethod
    def of(cls, config_keys: dict) -> "IngestSettings":
        """The settings of a config (or of a stage's ``--config``): its keys of these names, the
        schema's defaults for those it leaves out."""
        return config.build(cls, [], config_keys)


class Ingested(NamedTuple):
    """What ingest hands on: the three outputs' contents."""

    manifest: pd.DataFrame  # MANIFEST_COLUMNS, path_<channel>…, [label], [brain_mask], table columns
    report: pd.DataFrame  # REPORT_COLUMNS
    targets: dict  # target, task, source, classes


def ingest(settings: IngestSettings, cache_dir: Path | None = None) -> Ingested:
    """Select, match, join and check (see the module docstring): manifest, report and target info.

    ``settings``: the config keys (``IngestSettings.of``); ``cache_dir`` keeps the parsed index and
    header checks between runs. ``target`` None selects images without joining a target table
    (applying a trained model: ``pipeline.sharing.apply``). ``on_error: stop`` raises InputError at
    the first exclusion instead of reporting it.
    """
    s = settings
    bids_dir, target, task = Path(s.bids_dir), s.target, s.task
    sessions, runs = str(s.sessions), str(s.runs)
    if s.non_bids:
        samples, report = non_bids_input(bids_dir, s.non_bids, s.channels, sessions, runs, s.target_source,
                                         s.label_image)
        matched = samples
    else:
        samples, report, matched = bids_input(bids_dir, s.bids_filters, s.channels, sessions, runs, s.label_image,
                                              cache_dir, s.brain_mask)
    include = {with_sub_prefix(p) for p in s.participants["include"]}
    exclude = {with_sub_prefix(p) for p in s.participants["exclude"]}
    reported = set().union(*(r["participant_id"] for r in report))
    seen = set(matched["participant_id"]) | reported  # participants with at least one selected image
    dropped = set(matched["participant_id"]) - set(samples["participant_id"]) - reported  # by sessions/runs only
    samples = samples[chosen(samples["participant_id"], include, exclude)]
    images = [c for c in samples.columns if c == "path" or c.startswith("path_") or c in DERIVED_COLUMNS]

    participants, source = None, {"source": None, "fallback": frozenset()}
    if target is not None:
        samples, table_report, participants, source = join_targets(samples, bids_dir, target, task, s.target_source,
                                                                   s.non_bids, s.target_fallback)
        report += table_report
    if participants is not None:
        report.append(unimaged(participants[chosen(participants, include, exclude)], seen, dropped, f"sessions: {sessions}, runs: {runs}"))

    problems = image_problems([p for c in images for p in samples[c]], s.check_data, cache_dir, s.image_limits)
    for column in images:
        reasons = samples[column].map(problems).astype(str)  # text also when no sample is left
        bad = reasons != ""
        what = "" if column == "path" else f"{column.removeprefix('path_')} image: "
        report.append(report_rows(samples[bad], what + reasons[bad], path_column=column))
        samples = samples[~bad]

    report = pd.concat([r for r in report if len(r)] or [pd.DataFrame(columns=REPORT_COLUMNS)], ignore_index=True)
    if s.on_error == "stop" and len(report):
        raise stop_error(report)
    if samples.empty:
        more = f"\n(and {len(report) - 20} more)" if len(report) > 20 else ""
        wanted = f" for target {target!r}" if target else ""
        text = task == "regression" and len(report) and report["reason"].str.contains("is not a number").all()
        hint = (f"\nEvery value of {target!r} is text: if it names classes, set `task: classification`."
                if text else "")
        raise InputError(f"No usable image in {bids_dir}{wanted}; the exclusions:\n"
                         f"{report.head(20).to_string()}{more}{hint}")
    manifest = samples.sort_values("image_id", ignore_index=True)
    classes = sorted(set(manifest[target])) if task == "classification" and target else None  # as pipeline.data encodes them
    targets = {"target": target, "task": task, "source": source["source"], "classes": classes}
    if classes and s.positive_class is not None:
        ordered(classes, s.positive_class)  # an InputError unless it is a class
        targets["positive_class"] = s.positive_class
    if source["fallback"]:
        fell_back = manifest["participant_id"].isin(source["fallback"])
        targets["rows_from"] = {source["source"]: int((~fell_back).sum()), "participants.tsv": int(fell_back.sum())}
    return Ingested(manifest, report, targets)


def stop_error(report: pd.DataFrame) -> InputError:
    """The error ``on_error: stop`` ends ingestion with: the first exclusion, its file and reason."""
    first = report.iloc[0]
    what = first["path"] or first["image_id"] or first["participant_id"]
    who = f" ({first['image_id'] or first['participant_id']})" if first["path"] else ""
    more = f" ({len(report) - 1} more exclusions follow it)" if len(report) > 1 else ""
    return InputError(f"{what}{who}: {first['reason']}.{more} With `on_error: stop` the first excluded sample ends "
                      "the run: fix it, or set `on_error: continue` to leave such samples out and list them "
                      "in excluded.tsv.")


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


def table_meanings(manifest: pd.DataFrame, targets: dict, bids_dir: Path | None = None) -> dict[str, columns.Column]:
    """Data dictionary entries of the manifest's columns carried over from the target table (every
    column but the image columns): the dataset's own entry where it has one (its top-level
    ``participants.json``, and ``sessions.json`` for sessions.tsv columns), else where the column
    comes from; the target's says that it is the target."""
    own = set(MANIFEST_COLUMNS) | set(DERIVED_COLUMNS)
    carried = [c for c in manifest.columns if c not in own and not c.startswith("path_")]
    described = {}
    for name in ("participants.json", "sessions.json") if bids_dir is not None else ():
        sidecar = Path(bids_dir) / name
        if sidecar.is_file():
            try:
                described.update(columns.from_sidecar(json.loads(sidecar.read_text())))
            except (ValueError, AttributeError):  # not a data dictionary: the provenance describes them
                pass
    source = targets["source"] or "target table"
    meanings = {}
    for name in carried:
        entry = described.get(name, columns.Column(name, f"Column {name!r} of the input's {source}, carried unchanged "
                                                          "(see the input dataset's own description of it)."))
        if name == targets["target"]:
            entry = columns.Column(entry.long_name, f"The study's target (config target), from the input's {source}. "
                                   + entry.description, entry.units, entry.levels)
        meanings[name] = entry
    return meanings


def write_outputs(result: Ingested, manifest: Path, report: Path, targets: Path, bids_dir: Path | None = None) -> None:
    """The three outputs: manifest and report TSVs, target JSON; each replaced whole (never half-written).
    Then the TSVs' data dictionaries (``pipeline.common.columns``; the target table's columns from
    ``bids_dir``'s participants.json where it describes them)."""
    manifest.parent.mkdir(parents=True, exist_ok=True)
    # Nested: nothing is renamed into place unless all three were written.
    with atomic.path(targets) as t:
        t.write_text(json.dumps(result.targets, indent=2) + "\n")
        with atomic.path(report) as r:
            result.report.to_csv(r, sep="\t", index=False)
            with atomic.path(manifest) as m:
                result.manifest.to_csv(m, sep="\t", index=False)
    atomic.write_dictionary(report, result.report.columns)
    atomic.write_dictionary(manifest, result.manifest.columns, table_meanings(result.manifest, result.targets, bids_dir))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # bids_dir, target (null: select images only, join no target table), task (regression or
    # classification), bids_filters, channels, sessions, runs, participants (include, exclude),
    # target_source, target_fallback, positive_class, label_image, brain_mask, non_bids, check_data, image_limits,
    # on_error
    add_config(parser)
    parser.add_argument("--cache-dir", "--database-dir", type=Path, help="keeps the file index and checks between runs")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--targets", type=Path, help="target JSON (default: targets.json next to the manifest)")
    parser.add_argument("--derivatives", type=Path, help="the preprocessed images' folder: its dataset_description.json "
                        "and .bidsignore are written (pipeline.intake.derivatives)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        settings = IngestSettings.of(args.config)
        for folder in dict.fromkeys(p.parent for p in (args.manifest, args.report, args.targets or args.manifest)):
            check_writable(folder)  # before the work, not after it
        result = ingest(settings, cache_dir=args.cache_dir)
    write_outputs(result, args.manifest, args.report, args.targets or args.manifest.parent / "targets.json",
                  None if settings.non_bids else Path(settings.bids_dir))
    if args.derivatives:
        derivatives.write_dataset_files(args.derivatives, settings.bids_dir)
    manifest, report = result.manifest, result.report
    print(f"{len(manifest)} samples of {manifest['participant_id'].nunique()} participants; "
          f"{len(report)} exclusions (see {args.report})", file=sys.stderr)
    for row in report.itertuples(index=False):
        print(f"excluded {row.image_id or row.participant_id}: {row.reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
