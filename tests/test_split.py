import numpy as np
import pandas as pd
import pytest

from pipeline.common.errors import InputError
from pipeline.intake.split import balance, check_design, design, fold_columns, missing_classes, share_warnings


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
def test_hash_design_moves_no_one_when_the_cohort_changes(folds):
    """Removing a training participant, or adding three new ones, leaves everyone else's split as it was."""
    m = manifest(n=60)
    before = per_participant(design(m, "age", "regression", 0.2, folds, 0.2, seed=3, method="hash"))
    trained = before.index[(before == "train").any(axis=1) & (before != "test").all(axis=1)][0]
    after = per_participant(design(m[m["participant_id"] != trained], "age", "regression", 0.2, folds, 0.2, seed=3,
                                   method="hash"))
    assert after.equals(before.drop(index=trained))
    grown = pd.concat([m, manifest(n=63).iloc[-3:]], ignore_index=True)
    assert len(grown) > len(m) and grown["participant_id"].nunique() == 63
    after = per_participant(design(grown, "age", "regression", 0.2, folds, 0.2, seed=3, method="hash"))
    assert after.loc[before.index].equals(before)
    # a regression without split.stratify has no stratum: the stable design is this one
    assert per_participant(design(m, "age", "regression", 0.2, folds, 0.2, seed=3)).equals(before)


def lesion_cohort(patients: int, controls: int) -> pd.DataFrame:
    """One image per participant, ids as BIDS gives them, the class in ``group``, a site column."""
    rows = [{"image_id": f"sub-{i:02d}_ses-01", "participant_id": f"sub-{i:02d}",
             "group": "patient" if i <= patients else "control", "site": f"site{i % 2}"}
            for i in range(1, patients + controls + 1)]
    return pd.DataFrame(rows)


def class_counts(people: pd.DataFrame, classes: pd.Series, part: str, column: str) -> pd.Series:
    return classes[people[column] == part].value_counts().reindex(sorted(set(classes)), fill_value=0)


@pytest.mark.parametrize("patients,controls,folds,seed", [(20, 20, 2, 0), (20, 20, 2, 1), (4, 11, 2, 0),
                                                           (13, 27, 3, 2), (20, 20, 1, 0), (30, 9, 5, 4)])
def test_stable_design_gives_every_split_its_share_of_each_class(patients, controls, folds, seed):
    """The 40-participant cohort of issue 26 (hash design: 5/9 and 11/4 in its folds) and unbalanced
    ones: each test and validation set holds its share of each class to within one participant."""
    m = lesion_cohort(patients, controls)
    people = per_participant(design(m, "group", "classification", 0.2, folds, 0.2, seed=seed))
    classes = m.set_index("participant_id")["group"]
    share = {"test": 0.2, "val": 0.2 if folds == 1 else 0.8 / folds}
    for column in fold_columns(folds):
        for part in ("test", "val"):
            counts = class_counts(people, classes, part, column)
            expected = classes.value_counts().reindex(counts.index) * share[part]
            assert ((counts - expected).abs() < 1).all(), (column, part, counts.to_dict(), expected.to_dict())


def test_stable_design_balances_a_further_stratification_column():
    m = lesion_cohort(24, 24)
    people = per_participant(design(m, "group", "classification", 0.25, 2, 0.2, seed=0, stratify=("site",)))
    strata = m.set_index("participant_id")[["group", "site"]].agg("|".join, axis=1)
    for column in fold_columns(2):  # 4 strata of 12: test 3 of each, each validation set 4.5 ± 0.5
        for part, share in (("test", 0.25), ("val", 0.375)):
            counts = strata[people[column] == part].value_counts().reindex(sorted(set(strata)), fill_value=0)
            assert ((counts - 12 * share).abs() < 1).all(), (column, part, counts.to_dict())


@pytest.mark.parametrize("folds", [1, 2, 5])
def test_stable_design_moves_only_the_changed_participants_stratum(folds):
    """Remove each participant in turn, and add new ones: only participants of the changed one's
    class move, at most one per cut between the parts (two with one or two folds: three parts), and
    in most changes none or one."""
    m = lesion_cohort(20, 20)
    before = per_participant(design(m, "group", "classification", 0.2, folds, 0.2, seed=0))
    classes = m.set_index("participant_id")["group"]
    cuts = 2 if folds == 1 else folds
    moves = []
    for pid in classes.index:
        after = per_participant(design(m[m["participant_id"] != pid], "group", "classification", 0.2, folds, 0.2,
                                       seed=0))
        moved = after.index[(after != before.drop(index=pid)).any(axis=1)]
        assert (classes[moved] == classes[pid]).all(), (pid, list(moved))
        moves.append(len(moved))
    for new in range(41, 47):
        grown = pd.concat([m, lesion_cohort(new, 0).iloc[[-1]]], ignore_index=True)
        after = per_participant(design(grown, "group", "classification", 0.2, folds, 0.2, seed=0))
        moved = before.index[(after.loc[before.index] != before).any(axis=1)]
        assert (classes[moved] == "patient").all(), (new, list(moved))
        moves.append(len(moved))
    assert max(moves) <= cuts, moves
    if folds <= 2:
        assert np.mean(np.array(moves) <= 1) >= 0.55, moves


def test_balance_table_warns_when_a_class_share_is_off_by_more_than_ten_points():
    """The hash design of issue 26's cohort: 5 controls / 9 patients against a 50 % cohort."""
    m = lesion_cohort(20, 20)
    hashed = design(m, "group", "classification", 0.2, 2, 0.2, seed=0, method="hash")
    table = balance(hashed, m, "group", "classification")
    flagged = table[table["class_share_off"] > 10]
    assert len(flagged) and (flagged["warning"].str.contains("points off")).all()
    assert (table.loc[table["class_share_off"] <= 10, "warning"] == "").all()
    assert share_warnings(table) and all("fold-" in s for s in share_warnings(table))
    stable_table = balance(design(m, "group", "classification", 0.2, 2, 0.2, seed=0), m, "group", "classification")
    assert stable_table["class_share_off"].max() == 0 and not share_warnings(stable_table)


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


@pytest.mark.parametrize("method", ["stable", "hash"])
def test_stable_design_fills_an_empty_part_of_a_tiny_cohort_and_says_so(capsys, method):
    """Four participants, four parts (test and three folds' validation sets): one each. Stable: two
    strata of two, each cut into the two largest shares, leave the test set empty."""
    m = manifest(n=4, sessions_every=10)
    people = per_participant(design(m, "group", "classification", 0.2, 3, 0.2, seed=0, method=method))
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


def test_a_training_set_too_small_for_its_task_is_named_with_the_numbers_and_the_fix():
    """Issue 26's cohort with 2 folds trains each fold on 8 patients and 8 controls; 3 folds give 10."""
    from pipeline.intake.split import small_training_sets, with_training_warnings
    from pipeline.results.report import design_warnings

    m = lesion_cohort(20, 20)
    splits = design(m, "group", "classification", 0.2, 2, 0.2, seed=0)
    found = small_training_sets(splits, m, "group")
    assert sorted(found) == ["fold-1", "fold-2"]
    assert "fold-1 trains on 8 control, 8 patient participants: fewer than 10 of a class" in found["fold-1"]
    assert "`split.folds: 3` would train each fold on about 10 of the smallest class" in found["fold-1"]
    assert "train.init_from" in found["fold-1"]
    assert small_training_sets(design(m, "group", "classification", 0.2, 4, 0.2, seed=0), m, "group") == {}
    single = small_training_sets(design(m, "group", "classification", 0.2, 1, 0.5, seed=0), m, "group")
    assert "smaller `split.val`" in single["fold-1"]
    table = with_training_warnings(balance(splits, m, "group", "classification"), found)
    warned = table[table["warning"] != ""]
    assert set(zip(warned["fold"], warned["split"])) == {("fold-1", "train"), ("fold-2", "train")}
    items = design_warnings(table)
    assert len(items) == 2 and "design, fold-2 train" in items[1] and "8 control, 8 patient" in items[1]
