"""Participant-level evaluation and the positive class (pipeline.results.participants)."""

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from pipeline.common.errors import InputError
from pipeline.intake.classes import ordered
from pipeline.results.participants import by_participant, participant_metrics


def two_session_predictions() -> pd.DataFrame:
    """sub-1 has two sessions, both badly predicted; sub-2 … sub-4 one good session each."""
    return pd.DataFrame({"participant_id": ["sub-1", "sub-1", "sub-2", "sub-3", "sub-4"],
                         "session": ["ses-1", "ses-2", "", "", ""],
                         "image_id": ["sub-1_ses-1", "sub-1_ses-2", "sub-2", "sub-3", "sub-4"],
                         "true": [60.0, 62.0, 30.0, 40.0, 50.0], "predicted": [70.0, 72.0, 31.0, 41.0, 51.0]})


def test_a_participant_with_two_sessions_weighs_once():
    predictions = two_session_predictions()
    people = by_participant(predictions, None)
    assert people["participant_id"].tolist() == ["sub-1", "sub-2", "sub-3", "sub-4"]
    assert people["images"].tolist() == [2, 1, 1, 1]
    assert people.loc[0, ["true", "predicted"]].tolist() == [61.0, 71.0]  # the mean over its sessions
    scored = participant_metrics(predictions, None, 45.0)
    assert scored["unit"] == "participant" and scored["n"] == 4
    assert scored["mae"] == pytest.approx((10 + 1 + 1 + 1) / 4)
    assert scored["image_level"]["n"] == 5 and scored["image_level"]["mae"] == pytest.approx((10 + 10 + 1 + 1 + 1) / 5)


def test_classification_averages_probabilities_and_keeps_a_changed_diagnosis_apart():
    predictions = pd.DataFrame({"participant_id": ["sub-1", "sub-1", "sub-1", "sub-2"],
                                "true": ["CN", "CN", "AD", "AD"],
                                "p_AD": [0.2, 0.6, 0.9, 0.7], "p_CN": [0.8, 0.4, 0.1, 0.3]})
    people = by_participant(predictions, ["AD", "CN"])
    assert list(zip(people["participant_id"], people["true"], people["images"])) == [
        ("sub-1", "AD", 1), ("sub-1", "CN", 2), ("sub-2", "AD", 1)]
    assert people["p_AD"].tolist() == pytest.approx([0.9, 0.4, 0.7])
    assert people["predicted"].tolist() == ["AD", "CN", "AD"]


def test_the_positive_class_decides_roc_auc_and_f1():
    rng = np.random.default_rng(0)
    true = np.array(["AD"] * 6 + ["CN"] * 14)
    p_ad = np.clip(np.where(true == "AD", 0.6, 0.3) + rng.normal(0, 0.2, 20), 0, 1)
    predictions = pd.DataFrame({"participant_id": [f"sub-{i}" for i in range(20)], "true": true,
                                "p_AD": p_ad, "p_CN": 1 - p_ad})
    default = participant_metrics(predictions, ordered(["AD", "CN"], None), None)
    ad = participant_metrics(predictions, ordered(["AD", "CN"], "AD"), None)
    assert default["positive_class"] == "CN" and ad["positive_class"] == "AD"
    predicted = np.where(p_ad > 0.5, "AD", "CN")
    assert ad["f1"] == pytest.approx(skm.f1_score(true, predicted, pos_label="AD"))
    assert default["f1"] == pytest.approx(skm.f1_score(true, predicted, pos_label="CN"))
    assert ad["f1"] != pytest.approx(default["f1"])
    assert ad["roc_auc"] == pytest.approx(skm.roc_auc_score(true == "AD", p_ad))


def test_a_positive_class_that_is_not_a_class_names_the_key_and_the_classes():
    assert ordered(["a", "b", "c"], "b") == ["a", "b", "c"]  # several classes: metrics are macro averages
    with pytest.raises(InputError, match=r"`positive_class` is 'patient'.*choose one of: AD, CN"):
        ordered(["AD", "CN"], "patient")
