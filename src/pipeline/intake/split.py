"""Study design: a held-out test set plus k-fold cross-validation on the rest, by participant.

Writes ``splits.tsv``: one row per image (image_id, participant_id) and one column per fold
(``fold-1`` … ``fold-k``) holding ``train``, ``val`` or ``test``. Test participants are the
same in every fold; each other participant is in ``val`` in exactly one fold (with one fold,
a ``val`` fraction is split off instead). Assignment is by participant (all sessions of a
person share a split) and deterministic for a seed, by one of two methods (``split.method``):

- ``stable`` (default): within each stratum (the class for classification, and ``split.stratify``
  columns; a regression or segmentation without ``split.stratify`` has none and is split as
  ``hash``), participants are ordered by a hash of their id and the seed and cut into the shares
  (``pipeline.intake.stable``): every split holds its share of every stratum to within one
  participant, and adding or removing a participant moves only participants of its own stratum
  (none or one in most changes, at most one per cut between the parts), so results before and
  after a cohort grows stay comparable.
- ``hash``: the unstratified stable design used until December 2026: a participant's place depends
  only on its own id and the seed, so nothing else ever moves, but part sizes and classes follow
  the binomial spread (the balance table warns where a class share is off by more than 10 points).
- ``stratified``: drawn with scikit-learn from the whole cohort, stratified by the target
  (quantile bins for regression) and further columns; exact balance, but one participant more
  or less re-draws everyone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.columns import Column
from pipeline.common.cli import add_config
from pipeline.common.errors import InputError
from pipeline.intake import stable

SPLITS = ("train", "val", "test")
MIN_STRATUM = 2  # a stratum smaller than this is merged into others (train_test_split needs 2)


def fold_columns(folds: int) -> list[str]:
    """``['fold-1', …, 'fold-k']``."""
    return [f"fold-{k}" for k in range(1, folds + 1)]


def participant_table(manifest: pd.DataFrame, target: str, task: str, stratify: list[str]) -> pd.DataFrame:
    """One row per participant: the target (mean over sessions for regression, the most frequent
    class for classification) and the further stratification columns (first value)."""
    missing = [c for c in [target, *stratify] if c not in manifest.columns]
    if missing:
        raise InputError(f"The manifest has no column(s) {missing} to stratify by; available: "
                         f"{', '.join(manifest.columns)}. Check `target` and `split.stratify` in config.")
    grouped = manifest.groupby("participant_id", sort=True)
    if task == "regression":
        values = grouped[target].agg(lambda v: v.astype(float).mean())
    else:
        values = grouped[target].agg(lambda v: v.astype(str).mode().iloc[0])
    table = pd.DataFrame({target: values})
    for column in stratify:
        table[column] = grouped[column].first().astype(str)
    return table


def strata(participants: pd.DataFrame, target: str, task: str, bins: int, stratify: list[str],
           smallest: int) -> pd.Series:
    """A stratum label per participant: target class or quantile bin, joined with the further
    columns. Strata with fewer than ``smallest`` members are pooled, so every stratum can be split."""
    if task == "classification":
        labels = participants[target].astype(str)
    else:
        labels = pd.qcut(participants[target].astype(float), q=bins, labels=False, duplicates="drop").astype(str)
    for column in stratify:
        labels = labels + "|" + participants[column]
    counts = labels.value_counts()
    rare = labels.isin(counts[counts < smallest].index)
    if rare.any():
        labels = labels.where(~rare, "pooled")
        if (labels == "pooled").sum() < smallest:  # still too small: join the largest stratum
            labels = labels.replace("pooled", labels[~rare].value_counts().idxmax() if (~rare).any() else "pooled")
    return labels


def stable_strata(participants: pd.DataFrame, target: str, task: str, stratify: list[str]) -> pd.Series | None:
    """The stable design's stratum per participant: the class (classification) joined with the
    ``split.stratify`` columns; None (the unstratified hash design) for regression and segmentation
    without ``split.stratify``. No pooling and no quantile bins, so a participant's stratum depends
    only on its own values, never on the rest of the cohort."""
    if task != "classification" and not stratify:
        return None
    labels = (participants[target].astype(str) if task == "classification"
              else pd.Series("", index=participants.index))
    for column in stratify:
        labels = labels + "|" + participants[column].astype(str)
    return labels


def hold_out(ids: pd.Index, labels: pd.Series, fraction: float, seed: int) -> tuple[list, list]:
    """Split ``ids`` into (rest, held-out ``fraction``), stratified where the strata allow it."""
    n_out = round(fraction * len(ids))
    if not 0 < n_out < len(ids):
        raise InputError(f"A {fraction:.0%} split of {len(ids)} participants leaves an empty part; "
                         "use more participants or change the fractions in config `split`.")
    enough = labels.nunique() <= min(n_out, len(ids) - n_out)
    if not enough:
        print(f"warning: {labels.nunique()} strata cannot all be represented in a split of {n_out}; "
              "splitting without stratification", file=sys.stderr)
    from sklearn.model_selection import train_test_split  # the random design only (scikit-learn imports slowly)

    rest, out = train_test_split(list(ids), test_size=n_out, random_state=seed,
                                 stratify=labels.loc[ids] if enough else None)
    return sorted(rest), sorted(out)


def design(manifest: pd.DataFrame, target: str, task: str, test: float, folds: int, val: float, seed: int,
           bins: int = 5, stratify: tuple[str, ...] = (), method: str = "stable") -> pd.DataFrame:
    """The study design of ``manifest``: one row per image with one split column per fold."""
    stratify = list(stratify)
    participants = participant_table(manifest, target, task, stratify)
    if len(participants) < 3:
        raise InputError(f"Only {len(participants)} participants in the manifest; a train/val/test design "
                         "needs at least 3.")
    if method == "stable":
        assignment = stable.assign(participants.index, test, folds, val, seed,
                                   stable_strata(participants, target, task, stratify))
    elif method == "hash":
        assignment = stable.assign(participants.index, test, folds, val, seed)
    else:
        assignment = stratified(participants, target, task, test, folds, val, seed, bins, stratify)
    splits = manifest[["image_id", "participant_id"]].join(assignment, on="participant_id")
    check_design(splits)
    return splits


def stratified(participants: pd.DataFrame, target: str, task: str, test: float, folds: int, val: float, seed: int,
               bins: int, stratify: list[str]) -> pd.DataFrame:
    """One row per participant, one split column per fold: drawn from the whole cohort, stratified."""
    labels = strata(participants, target, task, bins, stratify, MIN_STRATUM)
    rest, test_ids = hold_out(participants.index, labels, test, seed)
    assignment = pd.DataFrame(index=participants.index, columns=fold_columns(folds), dtype=object)
    assignment.loc[test_ids] = "test"
    if folds == 1:
        rest_labels = strata(participants.loc[rest], target, task, bins, stratify, MIN_STRATUM)
        train_ids, val_ids = hold_out(pd.Index(rest), rest_labels, val / (1 - test), seed)
        assignment.loc[train_ids, "fold-1"] = "train"
        assignment.loc[val_ids, "fold-1"] = "val"
    else:
        if len(rest) < folds:
            raise InputError(f"{len(rest)} participants outside the test set cannot make {folds} folds; "
                             "lower `split.folds` or `split.test`.")
        rest_labels = strata(participants.loc[rest], target, task, bins, stratify, folds)
        from sklearn.model_selection import StratifiedKFold

        kfold = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        for column, (_, val_index) in zip(fold_columns(folds), kfold.split(rest, rest_labels.loc[rest])):
            assignment.loc[rest, column] = "train"
            assignment.loc[[rest[i] for i in val_index], column] = "val"
    return assignment


def check_design(splits: pd.DataFrame) -> None:
    """Fail on a leak or a broken design, naming the participants and folds involved.

    Every image has a split in every fold; a participant's images share one split per fold; test
    participants are the same in all folds; no fold has an empty train, val or test part; with
    several folds every non-test participant is validated exactly once.
    """
    columns = [c for c in splits.columns if c.startswith("fold-")]
    if not columns:
        raise InputError("The splits table has no fold column (fold-1, …); rerun the split rule.")
    for column in columns:
        unassigned = splits.loc[~splits[column].isin(SPLITS), "image_id"].tolist()
        if unassigned:
            raise InputError(f"Images without a split in {column}: {', '.join(unassigned)}.")
        per_participant = splits.groupby("participant_id")[column].nunique()
        leaked = per_participant[per_participant > 1].index.tolist()
        if leaked:
            raise InputError(f"Participants in more than one split of {column} (data leak): {', '.join(leaked)}.")
        empty = [s for s in SPLITS if not (splits[column] == s).any()]
        if empty:
            raise InputError(f"{column} has an empty {' and '.join(empty)} part; use more participants or "
                             "change `split` in config.")
    is_test = splits[columns].eq("test")
    mixed = splits.loc[is_test.any(axis=1) & ~is_test.all(axis=1), "participant_id"].unique().tolist()
    if mixed:
        raise InputError(f"Participants tested in some folds and trained on in others (data leak): {', '.join(mixed)}.")
    if len(columns) > 1:
        times = splits.loc[~is_test.all(axis=1)].drop_duplicates("participant_id").set_index("participant_id")
        validated = times[columns].eq("val").sum(axis=1)
        wrong = validated[validated != 1]
        if len(wrong):
            raise InputError(f"Participants validated {sorted(set(wrong))} times instead of once across folds: "
                             f"{', '.join(wrong.index)}.")


SHARE_TOLERANCE = 10  # percentage points a split's class share may differ from the cohort's


def balance(splits: pd.DataFrame, manifest: pd.DataFrame, target: str, task: str) -> pd.DataFrame:
    """Target distribution per fold and split: participants, images, and class counts or mean/sd/range.
    Classification adds ``class_share_off`` (the largest difference, in percentage points, between a
    class's share of the split's participants and its share of the cohort's) and ``warning``, a
    sentence where that exceeds ``SHARE_TOLERANCE``."""
    table = manifest.merge(splits.drop(columns="participant_id"), on="image_id")
    if task == "classification":
        return class_balance(splits, table, target)
    rows = []
    for column in [c for c in splits.columns if c.startswith("fold-")]:
        for name in SPLITS:
            part = table[table[column] == name]
            row = {"fold": column, "split": name, "participants": part["participant_id"].nunique(), "images": len(part)}
            if task == "classification":
                row.update(part[target].astype(str).value_counts().sort_index().to_dict())
            else:
                values = part[target].astype(float)
                row.update({"mean": round(values.mean(), 2), "sd": round(values.std(), 2),
                            "min": values.min(), "max": values.max()})
            rows.append(row)
    return pd.DataFrame(rows).fillna(0)


def class_counts(table: pd.DataFrame, target: str, task: str) -> dict[str, Column]:
    """Classification: the data dictionary entries of ``balance``'s class columns (one per class)."""
    if task != "classification":
        return {}
    fixed = {"fold", "split", "participants", "images", "class_share_off", "warning"}
    return {c: Column(f"Images of class {c}", f"Number of the part's images whose {target} is {c}.")
            for c in map(str, table.columns) if c not in fixed}


def class_balance(splits: pd.DataFrame, table: pd.DataFrame, target: str) -> pd.DataFrame:
    """``balance`` of a classification target: image counts per class, and the class shares of
    participants set against the cohort's."""
    people = table.drop_duplicates("participant_id")
    classes = sorted(set(table[target].astype(str)))
    cohort = people[target].astype(str).value_counts(normalize=True).reindex(classes, fill_value=0)
    rows = []
    for column in [c for c in splits.columns if c.startswith("fold-")]:
        for name in SPLITS:
            part = table[table[column] == name]
            row = {"fold": column, "split": name, "participants": part["participant_id"].nunique(), "images": len(part)}
            row.update(part[target].astype(str).value_counts().reindex(classes, fill_value=0).to_dict())
            members = part.drop_duplicates("participant_id")[target].astype(str)
            share = members.value_counts(normalize=True).reindex(classes, fill_value=0)
            off = 100 * (share - cohort).abs() if len(members) else pd.Series(dtype=float)
            row["class_share_off"] = round(float(off.max()), 1) if len(off) else float("nan")
            worst = off.idxmax() if len(off) else None
            row["warning"] = (f"{worst}: {100 * share[worst]:.0f} % of this split against {100 * cohort[worst]:.0f} % "
                              f"of the cohort (more than {SHARE_TOLERANCE} points off)"
                              if worst is not None and off[worst] > SHARE_TOLERANCE else "")
            rows.append(row)
    return pd.DataFrame(rows)


def share_warnings(table: pd.DataFrame) -> list[str]:
    """A sentence per row of a ``balance`` table whose class share is off by more than the tolerance."""
    if "warning" not in table.columns:
        return []
    flagged = table[table["warning"].astype(str) != ""]
    return [f"{row.fold} {row.split}: {row.warning}" for row in flagged.itertuples()]


MIN_TRAIN_PER_CLASS = 10  # training participants per class below which a network from scratch rarely learns


def small_training_sets(splits: pd.DataFrame, manifest: pd.DataFrame, target: str,
                        minimum: int = MIN_TRAIN_PER_CLASS) -> dict[str, str]:
    """A sentence per fold whose training set has fewer than ``minimum`` participants of some class,
    with the numbers and what to change: the ``split.folds`` that would reach ``minimum`` (each
    class's participants outside the test set times (k − 1) / k), else more data or a pre-trained start."""
    people = manifest[["participant_id", target]].drop_duplicates("participant_id").set_index("participant_id")[target]
    people = people.astype(str)
    columns = [c for c in splits.columns if c.startswith("fold-")]
    per_person = splits.drop_duplicates("participant_id").set_index("participant_id")
    outside = people[per_person[columns[0]] != "test"].value_counts()
    found = {}
    for column in columns:
        counts = people[per_person[column] == "train"].value_counts().reindex(sorted(set(people)), fill_value=0)
        if counts.min() >= minimum:
            continue
        reach = [k for k in range(len(columns) + 1, 21) if (outside.min() * (k - 1)) // k >= minimum]
        if len(columns) == 1:
            change = "a smaller `split.val` or `split.test` leaves more participants for training"
        elif reach:
            change = (f"`split.folds: {reach[0]}` would train each fold on about "
                      f"{(outside.min() * (reach[0] - 1)) // reach[0]} of the smallest class")
        else:
            change = "no number of folds reaches that with this cohort"
        found[column] = (f"{column} trains on {', '.join(f'{n} {c}' for c, n in counts.items())} participants: fewer than "
                         f"{minimum} of a class, too few for a network trained from scratch to learn a subtle or "
                         f"focal effect reliably. {change[0].upper() + change[1:]}; otherwise add participants, or "
                         "start from a pre-trained model (`train.init_from`), and compare with the linear baseline")
    return found


def with_training_warnings(table: pd.DataFrame, sentences: dict[str, str]) -> pd.DataFrame:
    """The balance ``table`` with each fold's small-training sentence in its ``train`` row's ``warning``."""
    table = table.copy()
    if "warning" not in table:
        table["warning"] = ""
    for fold, sentence in sentences.items():
        row = (table["fold"] == fold) & (table["split"] == "train")
        table.loc[row, "warning"] = table.loc[row, "warning"].map(lambda w: f"{w}; {sentence}" if w else sentence)
    return table


def missing_classes(splits: pd.DataFrame, manifest: pd.DataFrame, target: str) -> list[str]:
    """A sentence for each validation or test part that lacks one of the target's classes."""
    table = manifest[["image_id", target]].merge(splits.drop(columns="participant_id"), on="image_id")
    classes = set(table[target].astype(str))
    found = []
    for column in [c for c in splits.columns if c.startswith("fold-")]:
        for name in ("val", "test"):
            absent = classes - set(table.loc[table[column] == name, target].astype(str))
            if absent and not (name == "test" and column != "fold-1"):  # one test set, said once
                where = f"the validation set of {column}" if name == "val" else "the test set"
                found.append(f"{where} lacks class(es) {', '.join(sorted(absent))}")
    return found


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("manifest", type=Path)
    add_config(parser)  # target, task (regression or classification), split
    parser.add_argument("--out", type=Path, required=True, help="splits.tsv")
    parser.add_argument("--balance", type=Path, required=True, help="balance table (TSV)")
    args = parser.parse_args(argv)
    target, task, split = args.config["target"], args.config["task"], args.config["split"]
    manifest = pd.read_csv(args.manifest, sep="\t", dtype=str, keep_default_na=False)
    with InputError.exit_cleanly():
        splits = design(manifest, target, task, split["test"], split["folds"], split["val"], split["seed"],
                        split["bins"], split["stratify"], split["method"])
        table = balance(splits, manifest, target, task)
    if task == "classification":
        for sentence in missing_classes(splits, manifest, target):
            print(f"warning: {sentence}; its metrics (e.g. ROC AUC) will be undefined. Use more participants, "
                  "another `split.seed`, or `split.method: stratified`.", file=sys.stderr)
    advice = ("the stable design already holds each class to within one participant of its share, so the "
              "split is too small for finer balance: use more participants or fewer `split.folds`"
              if split["method"] == "stable" else
              "`split.method: stable` holds each class to within one participant of its share")
    for sentence in share_warnings(table):
        print(f"warning: class balance of {sentence}; {advice}.", file=sys.stderr)
    if task == "classification":
        small = small_training_sets(splits, manifest, target)
        for sentence in small.values():
            print(f"warning: {sentence}.", file=sys.stderr)
        table = with_training_warnings(table, small)
    atomic.to_csv(splits, args.out, sep="\t", index=False)
    atomic.to_csv(table, args.balance, sep="\t", index=False, meanings=class_counts(table, target, task))
    print(table.to_string(index=False), file=sys.stderr)


if __name__ == "__main__":
    main()
