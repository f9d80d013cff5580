"""Everything left out of a study, and why: ``excluded.tsv`` gathers ingest's report and the
records of samples that preprocessing could not process; ``samples.tsv`` is the manifest without
them, the table every later stage (split, train, evaluate, explain, package) reads.

With the preprocessed images' folder it also applies the cohort registration QC (config ``qc``,
``pipeline.intake.qc.flags``) to every image preprocessing finished: stage ``qc``.

One row per excluded sample or participant: ``image_id`` (empty for a participant without an
image), ``participant_id``, ``stage`` (``ingest``, ``preprocess`` or ``qc``), ``file`` (the image or
table at fault, when there is one) and ``reason`` (what is wrong and what to do).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from pipeline.common import atomic, columns
from pipeline.common.config import resolved
from pipeline.common.errors import InputError
from pipeline.intake import qc

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


def write(table: pd.DataFrame, path: Path, dictionary: bool = False) -> None:
    """Write ``table`` (COLUMNS) as TSV, replacing ``path`` whole; with ``dictionary`` (``excluded.tsv``)
    also its data dictionary (a failed preprocessing job's one-row record has none: ``excluded.tsv``
    gathers them). Every exclusion table is written here."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.path(path) as tmp:
        table.reindex(columns=COLUMNS).to_csv(tmp, sep="\t", index=False)
    if dictionary:
        atomic.write_dictionary(path, COLUMNS)


def gather(ingest_report: Path, records: list[Path] = ()) -> pd.DataFrame:
    """Ingest's exclusions and every non-empty preprocessing record, in that order."""
    parts = [from_report(read_table(ingest_report))]
    parts += [read_table(r) for r in records if Path(r).stat().st_size > 0]
    return pd.concat([p.reindex(columns=COLUMNS) for p in parts], ignore_index=True).fillna("")


def cohort_qc(manifest: pd.DataFrame, preproc_dir: Path, excluded: pd.DataFrame, rule: dict,
              channels=("T1w",)) -> pd.DataFrame:
    """Exclusion rows (stage ``qc``) for the images that preprocessing finished and the cohort rule
    (``pipeline.intake.qc.flags``, config ``qc`` as ``rule``) flags, each reason naming the scores
    at fault, the QC image to look at and what to do."""
    table = qc.gather(manifest, preproc_dir, excluded, channels)
    scored = table[table["excluded"] == "no"]
    rows = []
    for image_id, why in qc.flags(scored, rule).items():
        row = scored[scored["image_id"] == image_id].iloc[0]
        rows.append([image_id, row["participant_id"], "qc", row["file"],
                     f"registration quality control (config qc): {why}. Look at its QC image "
                     f"{Path(row['qc_png']).name}, then leave the participant out (participants.exclude) or, "
                     "if the registration is good, relax config qc"])
    return pd.DataFrame(rows, columns=COLUMNS)


def usable(table: pd.DataFrame, excluded: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` (with ``image_id``) that ``excluded`` does not list."""
    return table[~table["image_id"].isin(set(excluded["image_id"]) - {""})].reset_index(drop=True)


def study_exclusions(ingest_report: Path, records: list[Path] = (), manifest: Path | None = None,
                     preproc_dir: Path | None = None, cfg: dict | None = None) -> pd.DataFrame:
    """``excluded.tsv``'s rows: ingest's exclusions, the preprocessing ``records`` and, with the
    ``manifest`` and ``preproc_dir``, the cohort QC rule (``cfg``: config ``qc`` and ``channels``)."""
    table = gather(ingest_report, records)
    if preproc_dir and manifest:
        cfg = cfg or {}
        rule = resolved(["qc"], cfg.get("qc") or {})
        flagged = cohort_qc(read_table(manifest), preproc_dir, table, rule, list(cfg.get("channels") or ["T1w"]))
        table = pd.concat([table, flagged], ignore_index=True)
    return table


def write_samples(manifest: Path, excluded: pd.DataFrame, out: Path, excluded_file: Path) -> pd.DataFrame:
    """``samples.tsv``: the ``manifest`` without the ``excluded`` samples, with the manifest's data
    dictionary; InputError where none is left (``excluded_file`` lists why)."""
    samples = usable(read_table(manifest), excluded)
    if samples.empty:
        raise InputError(f"Every sample of {manifest} was excluded (see {excluded_file}); fix the images listed there.")
    with atomic.path(out) as tmp:
        samples.to_csv(tmp, sep="\t", index=False)
    atomic.write_dictionary(out, samples.columns, carried(manifest))
    return samples


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ingest-report", type=Path, required=True, help="ingest_report.tsv")
    parser.add_argument("--records", type=Path, nargs="*", default=[], help="preprocessing exclusion records")
    parser.add_argument("--out", type=Path, required=True, help="excluded.tsv")
    parser.add_argument("--manifest", type=Path, help="manifest.tsv: with --samples, write its usable rows")
    parser.add_argument("--samples", type=Path, help="samples.tsv: the manifest without the excluded samples")
    parser.add_argument("--preproc-dir", type=Path, help="derivatives root of preprocessing: with --manifest, apply "
                        "the cohort QC rule (config qc) to every image it finished")
    parser.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                        help="config keys qc and channels (with --preproc-dir)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        table = study_exclusions(args.ingest_report, args.records, args.manifest, args.preproc_dir, args.config)
    write(table, args.out, dictionary=True)
    for row in table.itertuples(index=False):
        print(f"excluded at {row.stage}: {row.image_id or row.participant_id}: {row.reason}")
    if args.manifest and args.samples:
        with InputError.exit_cleanly():
            write_samples(args.manifest, table, args.samples, args.out)


def carried(table: Path) -> dict:
    """The entries of ``table``'s data dictionary (``manifest.json`` from ingest: the target table's
    columns as the input dataset describes them), for a table that carries its columns on."""
    sidecar = columns.sidecar_of(table)
    return columns.from_sidecar(json.loads(sidecar.read_text())) if sidecar.is_file() else {}


if __name__ == "__main__":
    main()
