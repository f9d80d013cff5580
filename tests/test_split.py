import numpy as np
import pandas as pd
import pytest

from pipeline.common.errors import InputError
from pipeline.intake.split import balance, check_design, design, fold_columns, missing_classes


def manifest(n=50, sessions_every=5, seed=0):
    """Participants with ages out of id order, every ``sessions_every``-th with two sessions."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = rng.uniform(20, 80)
        for s in (["ses-01", "ses-02"] if i % sessions_every == 0 else [""]):
            rows.append({"image_id": f"sub-{i:03d}" + (f"_{s}" if s else ""), "participant_id": f"sub-{i:03d}",
                         "age": str(round(age, 1)), "group": "patient" if i % 2 else "control",
                         "sex": "F" if rng.random() < 0.5 else "M", "site": f"site{i % 3}"})
    return pd.DataFrame(rows)


def per_participant(splits: pd.DataFrame) -> pd.DataFrame:
    """The fold columns, one row per participant."""
    return splits.drop_duplicates("participant_id").set_index("participant_id").drop(columns="image_id")


def test_kfold_design_by_participant():
    m = manifest()
    splits = design(m, "age", "regression", test=0.2, folds=5, val=0.2, seed=1, method="stratified")
    assert list(splits.columns) == ["image_id", "participant_id", *fold_columns(5)]
    assert splits["image_id"].tolist() == m["image_id"].tolist()
    for column in fold_columns(5):  # all sessions of a participant share a split, in every fold
        assert (splits.groupby("participant_id")[column].nunique() == 1).all()
    people = per_participant(splits)
    test = people["fold-1"] == "test"
    assert test.sum() == 10 and (people.loc[test] == "test").all().all()  # same test set in every fold
    assert (people.loc[~test] == "val").sum(axis=1).eq(1).all()  # validated exactly once
    assert sorted((people.loc[~test] == "val").sum()) == [8, 8, 8, 8, 8]


def test_single_fold_uses_the_val_fraction():
    splits = design(manifest(), "age", "regression", test=0.2, folds=1, val=0.2, seed=1, method="stratified")
    counts = per_participant(splits)["fold-1"].value_counts().to_dict()
    assert counts == {"train": 30, "val": 10, "test": 10}


def test_design_is_deterministic_and_seed_dependent():
    a = design(manifest(), "age", "regression", 0.2, 3, 0.2, seed=1)
    b = design(manifest(), "age", "regression", 0.2, 3, 0.2, seed=1)
    c = design(manifest(), "age", "regression", 0.2, 3, 0.2, seed=2)
    assert a.equals(b) and not a.equals(c)


def test_classification_is_stratified_in_test_and_every_fold():
    m = manifest(n=60)
    splits = design(m, "group", "classification", 0.2, 4, 0.2, seed=0, method="stratified")
    groups = m.drop_duplicates("participant_id").set_index("participant_id")["group"]
    people = per_participant(splits)
    for column in fold_columns(4):
        counts = pd.crosstab(people[column], groups)
        assert (abs(counts["patient"] - counts["control"]) <= 1).all(), counts


def test_further_stratification_columns_balance_the_test_set():
    m = manifest(n=90)
    splits = design(m, "age", "regression", 0.2, 3, 0.2, seed=0, bins=3, stratify=("site",), method="stratified")
    people = per_participant(splits).join(m.drop_duplicates("participant_id").set_index("participant_id")["site"])
    test_sites = people.loc[people["fold-1"] == "test", "site"].value_counts()
    assert test_sites.max() - test_sites.min() <= 1, test_sites


def test_regression_test_set_spans_the_target_range():
    m = manifest(n=100)
    splits = design(m, "age", "regression", 0.2, 5, 0.2, seed=0, method="stratified").merge(m[["image_id", "age"]])
    test_ages = splits[splits["fold-1"] == "test"].drop_duplicates("participant_id")["age"].astype(float)
    assert test_ages.min() < 32 and test_ages.max() > 68


def test_unknown_stratification_column_names_it():
    with pytest.raises(InputError, match="scanner"):
        design(manifest(), "age", "regression", 0.2, 5, 0.2, seed=0, stratify=("scanner",))


@pytest.mark.parametrize("method", ["stable", "stratified"])
def test_too_few_participants_for_the_folds(method):
    with pytest.raises(InputError, match="split.folds"):
        design(manifest(n=7), "age", "regression", 0.25, 7, 0.2, seed=0, method=method)


@pytest.mark.parametrize("folds", [1, 3])
def test_stable_design_moves_no_one_when_the_cohort_changes(folds):
    """Removing a training participant, or adding three new ones, leaves everyone else's split as it was."""
    m = manifest(n=60)
    before = per_participant(design(m, "age", "regression", 0.2, folds, 0.2, seed=3))
    trained = before.index[(before == "train").any(axis=1) & (before != "test").all(axis=1)][0]
    after = per_participant(design(m[m["participant_id"] != trained], "age", "regression", 0.2, folds, 0.2, seed=3))
    assert after.equals(before.drop(index=trained))
    grown = pd.concat([m, manifest(n=63).iloc[-3:]], ignore_index=True)
    assert len(grown) > len(m) and grown["participant_id"].nunique() == 63
    after = per_participant(design(grown, "age", "regression", 0.2, folds, 0.2, seed=3))
    assert after.loc[before.index].equals(before)


def test_stable_design_keeps_the_shares_in_a_large_cohort_and_depends_on_the_seed():
    m = manifest(n=3000, sessions_every=7)
    people = per_participant(design(m, "group", "classification", 0.2, 4, 0.2, seed=0))
    test = people["fold-1"] == "test"
    assert abs(test.mean() - 0.2) < 0.03
    assert (people.loc[test] == "test").all().all() and (people.loc[~test] == "val").sum(axis=1).eq(1).all()
    validated = (people.loc[~test] == "val").mean()
    assert (abs(validated - 0.25) < 0.04).all(), validated
    other = per_participant(design(m, "group", "classification", 0.2, 4, 0.2, seed=1))
    assert (other["fold-1"] == "test").ne(test).mean() > 0.2


def test_stable_design_fills_an_empty_part_of_a_tiny_cohort_and_says_so(capsys):
    """Four participants, four parts (test and three folds' validation sets): one each."""
    m = manifest(n=4, sessions_every=10)
    people = per_participant(design(m, "age", "regression", 0.2, 3, 0.2, seed=0))
    assert people.eq("test").all(axis=1).sum() == 1 and (people == "val").sum().tolist() == [1, 1, 1]
    assert "moved" in capsys.readouterr().err


def test_a_validation_or_test_set_without_a_class_is_named():
    m = manifest(n=12).assign(group=lambda t: np.where(t["participant_id"] == "sub-003", "rare", t["group"]))
    splits = design(m, "group", "classification", 0.25, 2, 0.2, seed=0)
    holder = splits.loc[splits["participant_id"] == "sub-003"].iloc[0]
    sentences = missing_classes(splits, m, "group")
    assert any("rare" in s for s in sentences)
    if holder["fold-1"] == "test":
        assert all("validation set" in s for s in sentences if "rare" in s)
    else:
        assert any("the test set lacks class(es) rare" in s for s in sentences)


def test_leak_within_a_fold_names_the_participant_and_fold():
    splits = pd.DataFrame({"image_id": ["sub-1_ses-1", "sub-1_ses-2", "sub-2", "sub-3"],
                           "participant_id": ["sub-1", "sub-1", "sub-2", "sub-3"],
                           "fold-1": ["train", "val", "val", "test"]})
    with pytest.raises(InputError, match=r"fold-1.*sub-1"):
        check_design(splits)


def test_leak_across_folds_is_caught():
    """sub-2 is tested in fold-1 but trained on in fold-2: a leak no single fold shows."""
    splits = pd.DataFrame({"image_id": ["sub-1", "sub-2", "sub-3", "sub-4"],
                           "participant_id": ["sub-1", "sub-2", "sub-3", "sub-4"],
                           "fold-1": ["train", "test", "val", "test"],
                           "fold-2": ["val", "train", "train", "test"]})
    with pytest.raises(InputError, match="sub-2"):
        check_design(splits)


def test_balance_table_counts_participants_and_images():
    m = manifest(n=30)
    splits = design(m, "age", "regression", 0.2, 3, 0.2, seed=0)
    table = balance(splits, m, "age", "regression")
    assert len(table) == 9 and set(table["split"]) == {"train", "val", "test"}
    fold1 = table[table["fold"] == "fold-1"].set_index("split")
    assert fold1["participants"].sum() == 30 and fold1["images"].sum() == len(m)
    assert {"mean", "sd", "min", "max"} <= set(table.columns)
