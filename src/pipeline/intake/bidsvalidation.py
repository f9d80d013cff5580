"""The input dataset through the official BIDS validator (``bids-validator-deno``), once per study.

``python -m pipeline.intake.bidsvalidation --config '{"bids_dir": …}' --out results/bids_validation.json``
runs ``bids-validator-deno DATASET --format json`` and writes its summary: the number of errors and
warnings and, per issue code, its severity, count and first files. Its log lists every error code
with its files. A dataset with errors is **not** stopped: ingest's own checks decide which images
a study can use (file names by pybids' rules, every header), and many usable datasets have an
error the study never reads (a missing ``README`` field, a sidecar typo); the log and the summary
say what to fix. The validator only reads the dataset (it runs in a temporary folder and writes
its report to a pipe).

Skipped, with a one-line note in the summary and the log: with config ``bids_validation: false``
(``bids-deepstudy run|apply --skip-bids-validation``), for a ``non_bids`` input, and when the
validator is not installed (``pip install bids-validator-deno``; it is in requirements.lock).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from pipeline.common import atomic
from pipeline.common.cli import add_config

VALIDATOR = "bids-validator-deno"
FILES_SHOWN = 5  # files named per issue code
TIMEOUT_S = 3600


def find_validator() -> str | None:
    """The validator's executable: on ``PATH``, else beside this interpreter (a venv not activated)."""
    beside = Path(sys.executable).parent / VALIDATOR
    return shutil.which(VALIDATOR) or (str(beside) if beside.exists() else None)


def run_validator(dataset: Path, executable: str) -> dict:
    """The validator's JSON report of ``dataset`` (``issues``, ``summary``). Raises RuntimeError
    when it fails to produce one (exit status 16 means "errors found" and is a report like 0)."""
    with tempfile.TemporaryDirectory() as cwd:  # nothing it might write lands in the dataset
        done = subprocess.run([executable, str(Path(dataset).resolve()), "--format", "json", "--no-color"],
                              cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{VALIDATOR} exited with status {done.returncode} without a report: "
                           f"{' / '.join(tail) or 'no output'}") from None


def summarise(report: dict) -> dict:
    """Counts by severity and, per issue code, ``{severity, count, file_count, files}`` (the first
    ``FILES_SHOWN`` files; paths relative to the dataset, as the validator gives them)."""
    issues = report.get("issues", {}).get("issues", [])
    severities = Counter(issue.get("severity", "error") for issue in issues)
    codes: dict[str, dict] = {}
    seen: dict[str, set] = {}
    for issue in issues:
        entry = codes.setdefault(issue["code"], {"severity": issue.get("severity", "error"), "count": 0,
                                                 "file_count": 0, "files": []})
        entry["count"] += 1
        where = issue.get("location") or next(iter(issue.get("affects") or []), "")
        if where and where not in seen.setdefault(issue["code"], set()):
            seen[issue["code"]].add(where)
            entry["file_count"] += 1
            if len(entry["files"]) < FILES_SHOWN:
                entry["files"].append(where)
    return {"errors": severities.get("error", 0), "warnings": severities.get("warning", 0),
            "codes": dict(sorted(codes.items(), key=lambda item: (item[1]["severity"] != "error", item[0])))}


def validate(dataset: Path, enabled: bool = True, non_bids: bool = False, executable: str | None = None) -> dict:
    """The summary of ``dataset``'s validation, or ``{"skipped": why}``."""
    if not enabled:
        return {"skipped": "bids_validation is false (--skip-bids-validation)"}
    if non_bids:
        return {"skipped": "the input is not BIDS (non_bids)"}
    executable = executable or find_validator()
    if executable is None:
        return {"skipped": f"{VALIDATOR} is not installed (pip install {VALIDATOR})"}
    return {"dataset": str(dataset), "validator": VALIDATOR, **summarise(run_validator(dataset, executable))}


def lines(summary: dict) -> list[str]:
    """The log's words for ``summary``: one line, then one per error code with its files."""
    if "skipped" in summary:
        return [f"BIDS validation skipped: {summary['skipped']}."]
    out = [f"BIDS validation of {summary['dataset']}: {summary['errors']} errors, {summary['warnings']} warnings"
           + (" (the study goes on; ingest checks every image it uses)" if summary["errors"] else "")]
    for code, entry in summary["codes"].items():
        more = f" and {entry['file_count'] - len(entry['files'])} more files" if entry["file_count"] > len(entry["files"]) else ""
        out.append(f"  {entry['severity']} {code} ×{entry['count']}: {', '.join(entry['files']) or 'the dataset'}{more}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)  # bids_dir, non_bids, bids_validation
    parser.add_argument("--out", type=Path, required=True, help="the summary (JSON)")
    args = parser.parse_args(argv)
    cfg = args.config
    try:
        summary = validate(Path(cfg["bids_dir"]), cfg.get("bids_validation", True), bool(cfg.get("non_bids")))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # a broken validator never stops a study
        summary = {"skipped": f"{VALIDATOR} failed: {exc}"}
    for line in lines(summary):
        print(line, file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(args.out, json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
