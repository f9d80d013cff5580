"""The vectorised bootstrap (pipeline.results.metrics): each draw's weighted metrics equal scikit-learn's
on the rows repeated as many times as their participant was drawn."""

import numpy as np
import pandas as pd
import pytest

from pipeline.results import metrics


def table(task: str, n: int = 24, classes=("a", "b"), seed: int = 0) -> pd.DataFrame:
    """``n`` images of n // 2 participants (two each), with ties among the scores."""
    rng = np.random.default_rng(seed)
    ids = [f"sub-{i // 2}" for i in range(n)]
    if task == "regression":
        true = rng.uniform(20, 80, n)
        return pd.DataFrame({"participant_id": ids, "true": true, "predicted": true + rng.normal(0, 5, n),
                             "predicted_corrected": true + rng.normal(0, 4, n)})
    true = rng.choice(list(classes), n)
    raw = np.round(rng.uniform(0.05, 1, (n, len(classes))), 1)  # rounded: tied scores
    probabilities = raw / raw.sum(1, keepdims=True)
    return pd.DataFrame({"participant_id": ids, "true": true,
                         **{f"p_{c}": probabilities[:, k] for k, c in enumerate(classes)}})


def repeated(predictions: pd.DataFrame, weights: np.ndarray) -> pd.DataFrame:
    return predictions.loc[np.repeat(np.arange(len(predictions)), weights.astype(int))].reset_index(drop=True)


@pytest.mark.parametrize("task, classes", [("regression", None), ("classification", ["a", "b"]),
                                           ("classification", ["a", "b", "c"])])
def test_weighted_draws_equal_scikit_learn_on_the_repeated_rows(task, classes):
    predictions = table(task, classes=tuple(classes or ()))
    weights = metrics.participant_weights(predictions["participant_id"], samples=25, seed=3)
    values = metrics.draws(predictions, classes, 50.0, weights)
    checked = 0
    for k, w in enumerate(weights):
        resampled = repeated(predictions, w)
        if classes and resampled["true"].nunique() < len(classes):
            assert np.isnan(values["roc_auc"][k])  # undefined in this draw
            continue
        expected = metrics.scores(resampled, classes, 50.0)
        for name, draw in values.items():
            assert draw[k] == pytest.approx(expected[name], rel=1e-9, abs=1e-12), (name, k)
        checked += 1
    assert checked >= 20


def test_a_draw_repeats_every_image_of_a_drawn_participant():
    participants = ["s1", "s1", "s2", "s3", "s3", "s3"]
    weights = metrics.participant_weights(participants, samples=50)
    assert weights.shape == (50, 6) and (weights.sum(1) > 0).all()
    assert (weights[:, 0] == weights[:, 1]).all() and (weights[:, 3] == weights[:, 5]).all()
    assert (weights[:, [0, 2, 3]].sum(1) == 3).all()  # three participants drawn per draw


def test_intervals_bracket_the_estimate_and_ignore_undefined_draws():
    predictions = table("regression", n=60)
    result = metrics.with_intervals(predictions, None, 50.0)
    low, high = result["mae_ci"]
    assert low < result["mae"] < high and "n_ci" not in result and "train_mean_ci" not in result
    assert metrics.intervals({"x": np.array([np.nan, 1.0, 2.0, 3.0])})["x"][0] >= 1.0
    assert np.isnan(metrics.intervals({"x": np.full(5, np.nan)})["x"]).all()


def test_auc_counts_tied_pairs_half():
    w = np.ones((1, 4))
    assert metrics.binary_auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([True, False, False, True]), w)[0] \
        == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert np.isnan(metrics.binary_auc(np.array([0.1, 0.2]), np.array([True, True]), np.ones((1, 2))))[0]
