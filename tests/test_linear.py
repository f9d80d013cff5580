"""The linear baseline (pipeline.results.linear), the paired comparison (pipeline.results.compare) and the
learning diagnostics (pipeline.learning.curves, pipeline.results.diagnostics), on real arrays written to disk."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression, Ridge

from pipeline.results import compare
from pipeline.learning import curves
from pipeline.results import diagnostics
from pipeline.results import linear
from pipeline.results.evaluate import summarise

GRID = (8, 10, 8)


def brain_mask() -> np.ndarray:
    mask = np.zeros(GRID, dtype=bool)
    mask[1:7, 1:9, 1:7] = True
    return mask


def write_study(root, n=40, task="regression", seed=0, splits=None):
    """``n`` participants' (1, 8, 10, 8) arrays with a planted effect in one corner of the brain:
    its intensity grows with age (regression) or drops in patients (classification)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        age = float(rng.uniform(20, 80))
        group = "patient" if i % 2 else "control"
        array = rng.normal(0, 1, (1, *GRID)).astype(np.float32)
        effect = (age - 50) / 15 if task == "regression" else (-1.5 if group == "patient" else 0.0)
        array[0, 2:5, 2:6, 2:5] += effect
        path = root / f"sub-{i:02d}.npy"
        np.save(path, array)
        split = splits[i] if splits else ("test" if i < 8 else "val" if i < 16 else "train")
        rows.append({"participant_id": f"sub-{i:02d}", "session": "", "image_id": f"sub-{i:02d}", "age": age,
                     "group": group, "split": split, "array": str(path)})
    return pd.DataFrame(rows)


def test_block_mean_averages_blocks_and_the_partial_edge_blocks():
    volume = np.arange(5 * 4 * 2, dtype=float).reshape(1, 5, 4, 2)
    out = linear.block_mean(volume, 2)
    assert out.shape == (1, 3, 2, 1)
    assert out[0, 0, 0, 0] == pytest.approx(volume[0, :2, :2, :2].mean())
    assert out[0, 2, 1, 0] == pytest.approx(volume[0, 4:, 2:, :].mean())  # the edge block: its 4 voxels
    assert linear.block_mean(volume, 1) is volume


@pytest.mark.parametrize("n_train, n_features", [(12, 60), (60, 12)])  # dual (the usual) and primal
def test_projected_ridge_equals_ridge_on_the_features(n_train, n_features):
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (n_train + 5, n_features)).astype(np.float32)
    y = x[:n_train, :3].sum(1) + rng.normal(0, 0.1, n_train)
    components = linear.Components.fit(x[:n_train].copy())
    z = components.project(x)
    gram = z[:n_train].T @ z[:n_train]
    np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-6 * gram.max())  # orthogonal columns
    for alpha in (0.1, 10.0):
        ours = linear.ridge_path(z[:n_train], y, z[n_train:], np.array([alpha]))[:, 0]
        theirs = Ridge(alpha=alpha).fit(x[:n_train].astype(np.float64), y).predict(x[n_train:].astype(np.float64))
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_logistic_on_projections_equals_logistic_on_the_features():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (30, 80)).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=30) > 0).astype(int)
    components = linear.Components.fit(x[:24].copy())
    z = components.project(x)
    ours = LogisticRegression(C=0.05, tol=1e-10, max_iter=10000).fit(z[:24], y[:24]).predict_proba(z[24:])
    centred = x.astype(np.float64) - x[:24].mean(0)
    theirs = LogisticRegression(C=0.05, tol=1e-10, max_iter=10000).fit(centred[:24], y[:24]).predict_proba(centred[24:])
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_block_size_grows_with_the_cohort_so_memory_stays_within_the_budget():
    mask = np.ones((40, 48, 40), dtype=bool)
    small = linear.choose_factor(mask, 1, 100, 60, memory_mb=200)
    large = linear.choose_factor(mask, 1, 10_000, 6_000, memory_mb=200)
    assert small == 1 and large > 1
    features = int(linear.feature_mask(mask, large).sum())
    assert linear.working_bytes(10_000, 6_000, features) <= 200 * 2**20


def test_regression_baseline_finds_the_planted_effect_and_never_looks_at_the_test_targets(tmp_path):
    table = write_study(tmp_path)
    metrics = linear.run(table, "fold-1", "age", "regression", brain_mask(), tmp_path / "out")
    assert metrics["model"] == "ridge" and metrics["downsample"] == 1 and metrics["images"]["test"] == 8
    assert metrics["mae"] < 0.5 * metrics["baseline_mae"]
    predictions = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    assert set(predictions["split"]) == {"val", "test"}
    validation = pd.read_csv(tmp_path / "out" / "validation.tsv", sep="\t")
    assert metrics["penalty"] == validation.loc[validation["val_loss"].idxmin(), "penalty"]
    shuffled = table.copy()
    test = shuffled["split"] == "test"
    shuffled.loc[test, "age"] = shuffled.loc[test, "age"].to_numpy()[::-1] + 100
    again = linear.run(shuffled, "fold-1", "age", "regression", brain_mask(), tmp_path / "again")
    assert again["penalty"] == metrics["penalty"]
    repeat = pd.read_csv(tmp_path / "again" / "predictions.tsv", sep="\t")
    np.testing.assert_allclose(repeat["predicted"], predictions["predicted"])


def test_classification_baseline_separates_patients(tmp_path):
    table = write_study(tmp_path, task="classification")
    metrics = linear.run(table, "fold-1", "group", "classification", brain_mask(), tmp_path / "out",
                         classes=["control", "patient"])
    assert metrics["model"] == "logistic" and metrics["roc_auc"] >= 0.9
    predictions = pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t")
    np.testing.assert_allclose(predictions[["p_control", "p_patient"]].sum(1), 1.0)


def test_too_few_validation_images_of_a_class_skip_the_baseline_with_the_counts(tmp_path):
    splits = ["test"] * 8 + ["val" if i % 2 == 0 else "train" for i in range(8)] + ["train"] * 24
    table = write_study(tmp_path, task="classification", splits=splits)  # odd rows (patients) never in val
    metrics = linear.run(table, "fold-2", "group", "classification", brain_mask(), tmp_path / "out",
                         classes=["control", "patient"])
    assert metrics["skipped"].startswith("fold-2: the linear baseline chooses its penalty on validation images")
    assert "validation: control 4, patient 0" in metrics["skipped"]
    assert pd.read_csv(tmp_path / "out" / "predictions.tsv", sep="\t").empty


def paired_predictions(n=30, deep_noise=1.0, linear_noise=3.0, seed=0):
    rng = np.random.default_rng(seed)
    true = rng.uniform(20, 80, n)
    ids = {"participant_id": [f"sub-{i}" for i in range(n)], "session": "", "image_id": [f"sub-{i}" for i in range(n)]}
    deep = pd.DataFrame({**ids, "true": true, "predicted": true + rng.normal(0, deep_noise, n)})
    other = pd.DataFrame({**ids, "true": true, "predicted": true + rng.normal(0, linear_noise, n)})
    return deep, other


def test_paired_comparison_names_the_better_model_only_when_the_interval_excludes_zero():
    deep, other = paired_predictions()
    table = compare.compare(deep, other, "regression", None, 50.0).set_index("metric")
    assert table.at["mae", "difference"] == pytest.approx(table.at["mae", "deep"] - table.at["mae", "linear"])
    assert table.at["mae", "difference_ci_high"] < 0 and table.at["mae", "verdict"] == "deep better"
    same, also = paired_predictions(linear_noise=1.0)
    assert compare.compare(same, also, "regression", None, 50.0).set_index("metric").at["mae", "verdict"] \
        == "no clear difference"
    worse = compare.compare(other, deep, "regression", None, 50.0)
    assert compare.headline(worse.assign(model="ensemble"), "regression")["verdict"] == "linear better"


def history(train_loss, val_loss, **columns):
    n = len(train_loss)
    return pd.DataFrame({"epoch": range(1, n + 1), "train_loss": train_loss, "val_loss": val_loss, **columns})


def test_diagnostics_say_when_training_did_not_fit_diverged_or_was_cut_short():
    flat = history([1.1, 1.0, 0.98, 1.02, 0.99, 1.0], [1.0, 1.0, 0.97, 1.0, 1.01, 1.0])
    assert [f["finding"] for f in curves.training(flat, "regression")] == ["did_not_fit"]
    chance = history([0.7] * 6, [0.69] * 5 + [0.7], train_accuracy=[0.5, 0.55, 0.5, 0.52, 0.5, 0.55])
    found = curves.training(chance, "classification", majority=0.5)
    assert found[0]["finding"] == "did_not_fit" and "most frequent class scores 0.50" in found[0]["message"]
    diverged = history([0.9, 0.5, 0.3, 0.1, 0.05, 0.02], [0.8, 0.4, 0.5, 0.7, 0.9, 1.2])
    found = curves.training(diverged, "regression")
    assert [f["finding"] for f in found] == ["validation_diverged"] and found[0]["best_epoch"] == 2
    improving = history([0.9, 0.5, 0.3, 0.2], [0.8, 0.5, 0.4, 0.3])
    assert [f["finding"] for f in curves.training(improving, "regression")] == ["still_improving"]
    healthy = history([0.9, 0.5, 0.3, 0.2, 0.2], [0.8, 0.5, 0.3, 0.32, 0.33])
    assert curves.training(healthy, "regression") == []
    # A fold of a CI run: the best validation loss at epoch 1 of 12, rising then wandering back.
    stuck = history([0.76, 0.69, 0.6, 0.55, 0.5, 0.4, 0.3, 0.28, 0.2, 0.15, 0.1, 0.09],
                    [0.69, 0.75, 0.86, 0.99, 1.03, 1.14, 1.27, 1.1, 0.96, 0.9, 0.85, 0.8])
    found = curves.training(stuck, "regression")
    assert [f["finding"] for f in found] == ["best_at_start"] and found[0]["best_epoch"] == 1
    assert "epoch 1 of 12" in found[0]["message"]


def test_summary_writes_the_comparison_and_the_diagnostics(tmp_path):
    deep, other = paired_predictions()
    for kind, frame in (("evaluate", other), ("linear", deep)):  # the deep model is the worse one here
        d = tmp_path / kind / "fold-1"
        d.mkdir(parents=True)
        frame.assign(split="test").to_csv(d / "predictions.tsv", sep="\t", index=False)
        record = {"task": "regression", "target": "age", "classes": None, "train_mean": 50.0, "mae": 1.0}
        (d / "metrics.json").write_text(json.dumps(record))
    train = tmp_path / "train" / "fold-1"
    train.mkdir(parents=True)
    (train / "diagnostics.json").write_text(json.dumps({"findings": [diagnostics.finding("still_improving", "more")]}))
    result = summarise([tmp_path / "evaluate" / "fold-1"], tmp_path / "summary", linear_dirs=[tmp_path / "linear" / "fold-1"],
                       train_dirs=[train])
    table = pd.read_csv(tmp_path / "summary" / "comparison.tsv", sep="\t")
    assert set(table["model"]) == {"fold-1", "ensemble"} and result["linear"]["mae"] < result["ensemble"]["mae"]
    found = json.loads((tmp_path / "summary" / "diagnostics.json").read_text())
    assert found["folds"]["fold-1"][0]["finding"] == "still_improving"
    assert found["study"][0]["finding"] == "worse_than_linear"
    assert "worse than a linear model fitted to the same preprocessed images" in found["study"][0]["message"]
