"""``bids-deepstudy init BIDS_DIR [--target COL] [--task …] [--out my.yaml]``: a study config for
one dataset, written from config/study.yaml with the dataset's facts filled in and every comment kept.

Reads the dataset as the pre-flight does (the file names of ``sub-*/…/anat`` NIfTI files parsed
into entities, and participants.tsv; never an image) and fills in:

- ``bids_dir`` (absolute), ``results_dir`` (``results/<dataset folder name>``, not the demo's);
- ``target``: ``--target``, else ``age`` when participants.tsv has it, else its first column after
  ``participant_id``; a target it lacks is an error naming the closest column;
- ``task``: ``--task``, else ``regression`` for a column of numbers with more than 2 values, else
  ``classification``;
- ``channels``: the reference image (``T1w`` when present, else the most frequent anatomical
  suffix), with the other suffixes found listed in a comment (stack one as a second channel);
- ``sessions`` and ``runs``: kept as ``all``, with the sessions and repeated runs found in a comment;
- ``split.folds``: 5, or the most (down to 1) that the participants with a target allow with
  study.yaml's ``split`` settings, without a class too small for them (the pre-flight's check of the
  split, drawn as the workflow draws it).

Each filled-in line gets a comment saying what was found. The file is written through
``pipeline.common.atomic``; an existing ``--out`` is kept unless ``--force``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.locations import STUDY_CONFIG
from pipeline.intake import preflight
from pipeline.intake.bidsindex import NIFTI_EXTENSIONS, load_index
from pipeline.intake.selection import check_bids_root
from pipeline.intake.targets import missing_column_error, read_participants

MAX_FOLDS = 5
MISSING = {"", "n/a", "na", "nan"}


def anatomy(bids_dir: Path) -> pd.DataFrame:
    """The anatomical NIfTI files of the dataset: one row per file with its entities (``""`` absent)."""
    files = load_index(bids_dir)
    for column in ("session", "run", "datatype", "suffix"):
        if column not in files.columns:
            files[column] = ""
    files = files[(files["datatype"] == "anat") & files["extension"].isin(NIFTI_EXTENSIONS)]
    if files.empty:
        raise InputError(f"{bids_dir} has no anatomical NIfTI images (sub-*/[ses-*/]anat/*.nii[.gz]); init fills "
                         "in a study of anatomical images. Point it at the dataset that has them.")
    return files


def number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def guess_task(values: pd.Series) -> str:
    """``regression`` for numbers with more than 2 distinct values, else ``classification``."""
    numbers = [number(v) for v in values]
    return "regression" if values.size and None not in numbers and len(set(numbers)) > 2 else "classification"


def describe_target(values: pd.Series, task: str) -> str:
    """What the target's values are, for the comment."""
    if task == "regression":
        numbers = pd.to_numeric(values, errors="coerce").dropna()
        text = f"{len(numbers)} participants with a value, {numbers.min():g} to {numbers.max():g}"
        dropped = len(values) - len(numbers)
        return text + (f"; {dropped} not numbers (excluded)" if dropped else "")
    counts = values.value_counts()
    return f"{len(values)} participants with a value; classes " + ", ".join(f"{k} ({v})" for k, v in counts.items())


def choose_folds(people: pd.DataFrame, target: str, task: str, spec: dict) -> int:
    """The number of folds, at most ``MAX_FOLDS``, whose split (drawn as the workflow draws it and
    checked as the pre-flight checks it, ``pipeline.intake.preflight.design_findings``) has no error
    and the fewest warnings (classes too small for the test set or the folds), the most folds among
    equals; these participants count one image each. 1 when every count is an error."""
    manifest = people.reset_index()[["participant_id", target]].assign(image_id=lambda t: t["participant_id"])
    best, fewest = 1, None
    for folds in range(min(MAX_FOLDS, spec["folds"]), 0, -1):
        found = preflight.Findings()
        if preflight.design_findings(manifest, target, task, {**spec, "folds": folds}, found) is None or found.errors:
            continue
        if fewest is None or len(found.warnings) < fewest:
            best, fewest = folds, len(found.warnings)
    return best


def set_line(text: str, pattern: str, line: str) -> str:
    """``text`` with the one line matching ``pattern`` (a regex anchored at a line start) replaced by
    ``line``, in which ``\\1`` stands for the pattern's first group (the template's own comment)."""
    new, count = re.subn(pattern, lambda m: line.replace("\\1", m.group(1) if m.groups() else ""), text,
                         count=1, flags=re.M)
    if count != 1:
        raise InputError(f"{STUDY_CONFIG} has no line matching {pattern!r}; init cannot fill it in.")
    return new


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def study_text(template: str, bids_dir: Path, target: str | None, task: str | None) -> tuple[str, list[str]]:
    """The study config for ``bids_dir`` made from the text of config/study.yaml, and the facts found."""
    check_bids_root(bids_dir)
    files = anatomy(bids_dir)
    table = read_participants(bids_dir)
    columns = [c for c in table.columns]
    if target is None:
        target = "age" if "age" in columns else (columns[0] if columns else None)
        if target is None:
            raise InputError(f"{bids_dir / 'participants.tsv'} has no column besides participant_id: add the column "
                             "to predict, or give --target.")
    elif target not in columns:
        raise missing_column_error(target, bids_dir / "participants.tsv", ["participant_id", *columns])
    with_images = sorted({f"sub-{s}" for s in files["subject"]})
    values = table[target].reindex(with_images).dropna()
    values = values[~values.str.strip().str.lower().isin(MISSING)]
    task = task or guess_task(values)

    suffixes = files.groupby("suffix")["subject"].nunique().sort_values(ascending=False)
    reference = "T1w" if "T1w" in suffixes.index else str(suffixes.index[0])
    others = [f"{s} ({n})" for s, n in suffixes.items() if s != reference]
    sessions = files.loc[files["session"] != ""].groupby("session")["subject"].nunique()
    repeats = files.loc[files["run"] != ""].groupby(["subject", "session", "suffix"]).size()
    spec = {"folds": MAX_FOLDS, **yaml.safe_load(template)["split"]}
    people = table.loc[values.index, [target]]
    if task == "regression":
        people = people[pd.to_numeric(people[target], errors="coerce").notna()]
    folds = choose_folds(people, target, task, spec) if len(people) >= 3 else 1

    facts = [
        f"{plural(len(with_images), 'participant')} with anatomical images, "
        f"{plural(int(suffixes[reference]), 'participant')} with {reference}",
        f"target `{target}` ({task}): {describe_target(values, task)}",
        f"split.folds: {folds}" + ("" if folds == MAX_FOLDS else f" (the split with the fewest problems for "
                                                                  f"{len(people)} participants and split.test: "
                                                                  f"{spec['test']}; bids-deepstudy check lists them)"),
    ]
    text = set_line(template, r"^bids_dir: .*$", f"bids_dir: {bids_dir}  # by bids-deepstudy init")
    text = set_line(text, r"^results_dir: .*$", f"results_dir: results/{bids_dir.name}")
    text = set_line(text, r"^target: .*$", f"target: {target}  # {describe_target(values, task)}")
    text = set_line(text, r"^task: .*$", f"task: {task}")
    other_channels = f"; also found: {', '.join(others)}" if others else ""
    text = set_line(text, r"^  T1w: \{suffix: T1w\}.*$",
                    f"  {reference}: {{suffix: {reference}}}  # {int(suffixes[reference])} participants{other_channels}")
    found_sessions = ", ".join(f"ses-{s} ({n})" for s, n in sessions.items()) or "none (one visit each)"
    text = set_line(text, r"^sessions: all(.*)$", f"sessions: all\\1\n# sessions found (participants): {found_sessions}")
    if len(repeats) and (repeats > 1).any():
        text = set_line(text, r"^runs: all(.*)$",
                        f"runs: all\\1\n# repeated runs found in {int((repeats > 1).sum())} participant-session(s)")
    text = set_line(text, r"^  folds: \d+(.*)$", f"  folds: {folds}\\1")
    if folds != MAX_FOLDS:
        text = set_line(text, rf"^  folds: {folds}(.*)$", f"  folds: {folds}  # {facts[-1]}")
    return text, facts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="bids-deepstudy init", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (only read)")
    parser.add_argument("--target", help="the column of participants.tsv to predict (default: age, else the first)")
    parser.add_argument("--task", choices=["regression", "classification"],
                        help="default: regression for numbers with more than 2 values, else classification")
    parser.add_argument("--out", type=Path, default=Path("my.yaml"), help="the config to write (default: my.yaml)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if args.out.exists() and not args.force:
            raise InputError(f"{args.out} exists; give another --out, or --force to replace it.")
        text, facts = study_text(STUDY_CONFIG.read_text(), args.bids_dir.resolve(), args.target, args.task)
        atomic.write_text(args.out, text)
    for fact in facts:
        print(fact)
    print(f"wrote {args.out} (from {STUDY_CONFIG}; its comments say what each key does). Next:\n"
          f"  bids-deepstudy check {args.out}\n"
          f"  bids-deepstudy run {args.bids_dir} OUTPUT_DIR group --config-file {args.out} --dry-run")


if __name__ == "__main__":
    main()
