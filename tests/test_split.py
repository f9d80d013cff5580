import numpy as np
import pandas as pd
import pytest

from pipeline.errors import InputError
from pipeline.split import check_no_leak, split_subjects


def manifest(n=50, sessions_every=5, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = rng.uniform(20, 80)
        for s in (["ses-01", "ses-02"] if i % sessions_every == 0 else [""]):
            rows.append({"image_id": f"sub-{i:03d}" + (f"_{s}" if s else ""), "participant_id": f"sub-{i:03d}",
                         "age": age, "group": "patient" if i % 2 else "control"})
    return pd.DataFrame(rows)


def test_all_sessions_of_a_participant_share_one_split():
    splits = split_subjects(manifest(), "age", "regression", 0.2, 0.2, seed=1)
    assert (splits.groupby("participant_id")["split"].nunique() == 1).all()
    counts = splits.drop_duplicates("participant_id")["split"].value_counts()
    assert counts.to_dict() == {"train": 30, "val": 10, "test": 10}


def test_split_is_deterministic_and_seed_dependent():
    a = split_subjects(manifest(), "age", "regression", 0.2, 0.2, seed=1)
    b = split_subjects(manifest(), "age", "regression", 0.2, 0.2, seed=1)
    c = split_subjects(manifest(), "age", "regression", 0.2, 0.2, seed=2)
    assert a.equals(b) and not a.equals(c)


def test_classification_split_is_stratified():
    splits = split_subjects(manifest(n=60), "group", "classification", 0.2, 0.2, seed=0)
    table = splits.drop_duplicates("participant_id").merge(manifest(n=60).drop_duplicates("participant_id"))
    per_split = table.groupby("split")["group"].value_counts().unstack()
    assert (per_split["patient"] == per_split["control"]).all()


def test_regression_split_spans_the_target_range():
    m = manifest(n=100)
    splits = split_subjects(m, "age", "regression", 0.2, 0.2, seed=0).merge(m[["image_id", "age"]])
    test_ages = splits[splits["split"] == "test"].drop_duplicates("participant_id")["age"]
    assert test_ages.min() < 32 and test_ages.max() > 68


def test_leak_check_names_the_participant():
    splits = pd.DataFrame({"image_id": ["sub-1_ses-1", "sub-1_ses-2", "sub-2", "sub-3"],
                           "participant_id": ["sub-1", "sub-1", "sub-2", "sub-3"],
                           "split": ["train", "test", "val", "test"]})
    with pytest.raises(InputError, match="sub-1"):
        check_no_leak(splits)
