"""Everything left out of a study, and why: ``excluded.tsv`` gathers ingest's report and the
records of samples that preprocessing could not process; ``samples.tsv`` is the manifest without
them, the table every later stage (split, train, evaluate, explain, package) reads.

One row per excluded sample or participant: ``image_id`` (empty for a participant without an
image), ``participant_id``, ``stage`` (``ingest`` or ``preprocess``), ``file`` (the image or
table at fault, when there is one) and ``reason`` (what is wrong and what to do).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.errors import InputError

COLUMNS = ["image_id", "participant_id", "stage", "file", "reason"]


def read_table(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def from_report(report: pd.DataFrame, stage: str = "ingest") -> pd.DataFrame:
    """Rows of ``excluded.tsv`` from an ingest report (participant_id, image_id, path, reason)."""
    return pd.DataFrame({"image_id": report["image_id"], "participant_id": report["participant_id"], "stage": stage,
                         "file": report["path"], "reason": report["reason"]}, columns=COLUMNS)


def record(image_id: str, participant_id: str, stage: str, file: str, reason: str) -> pd.DataFrame:
    """One exclusion as a one-row table (what a failed preprocessing job writes)."""
    return pd.DataFrame([[image_id, participant_id, stage, str(file), reason]], columns=COLUMNS)


def empty() -> pd.DataFrame:
    """No exclusion: the record of a sample preprocessing finished."""
    return pd.DataFrame(columns=COLUMNS)


def write(table: pd.DataFrame, path: Path) -> None:
    """Write ``table`` (COLUMNS) as TSV, replacing ``path`` whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.path(path) as tmp:
        table.reindex(columns=COLUMNS).to_csv(tmp, sep="\t", index=False)


def gather(ingest_report: Path, records: list[Path] = ()) -> pd.DataFrame:
    """Ingest's exclusions and every non-empty preprocessing record, in that order."""
    parts = [from_report(read_table(ingest_report))]
    parts += [read_table(r) for r in records if Path(r).stat().st_size > 0]
    return pd.concat([p.reindex(columns=COLUMNS) for p in parts], ignore_index=True).fillna("")


def usable(table: pd.DataFrame, excluded: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` (with ``image_id``) that ``excluded`` does not list."""
    return table[~table["image_id"].isin(set(excluded["image_id"]) - {""})].reset_index(drop=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest-report", type=Path, required=True, help="ingest_report.tsv")
    parser.add_argument("--records", type=Path, nargs="*", default=[], help="preprocessing exclusion records")
    parser.add_argument("--out", type=Path, required=True, help="excluded.tsv")
    parser.add_argument("--manifest", type=Path, help="manifest.tsv: with --samples, write its usable rows")
    parser.add_argument("--samples", type=Path, help="samples.tsv: the manifest without the excluded samples")
    args = parser.parse_args(argv)
    table = gather(args.ingest_report, args.records)
    write(table, args.out)
    for row in table.itertuples(index=False):
        print(f"excluded at {row.stage}: {row.image_id or row.participant_id}: {row.reason}")
    if args.manifest and args.samples:
        samples = usable(read_table(args.manifest), table)
        with InputError.exit_cleanly():
            if samples.empty:
                raise InputError(f"Every sample of {args.manifest} was excluded (see {args.out}); fix the images "
                                 "listed there.")
        with atomic.path(args.samples) as tmp:
            samples.to_csv(tmp, sep="\t", index=False)


if __name__ == "__main__":
    main()
