import json

import numpy as np
import pandas as pd
import pytest

from pipeline.common.errors import InputError
from pipeline.results.evaluate import bias_correction, ensemble, summarise
from pipeline.results.metrics import classification_metrics, regression_metrics
from pipeline.results.participants import participant_metrics


def test_regression_metrics_on_a_hand_computed_case():
    m = regression_metrics([20, 40, 60, 80], [22, 38, 63, 77], train_mean=50)
    assert m["mae"] == pytest.approx(2.5)
    assert m["rmse"] == pytest.approx(np.sqrt((4 + 4 + 9 + 9) / 4))
    assert m["r2"] == pytest.approx(1 - 26 / 2000)
    assert m["baseline_mae"] == pytest.approx(20)
    assert m["mae_ratio_to_baseline"] == pytest.approx(0.125)
    assert m["pearson_r"] > 0.99


def test_binary_classification_metrics_on_a_hand_computed_case():
    classes = ["control", "patient"]
    true = ["control", "control", "patient", "patient", "patient"]
    p_patient = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = classification_metrics(true, np.stack([1 - p_patient, p_patient], 1), classes)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 5 of 6 patient-control pairs ranked right
    assert m["f1"] == pytest.approx(2 / 3)  # precision 2/3, recall 2/3


def test_bias_correction_inverts_a_regression_to_the_mean():
    true = np.array([20.0, 35, 50, 65, 80])
    validation = pd.DataFrame({"true": true, "predicted": 0.5 * true + 25})  # shrunk towards 50
    slope, intercept = bias_correction(validation)
    assert (slope, intercept) == pytest.approx((0.5, 25))
    np.testing.assert_allclose((validation["predicted"] - intercept) / slope, true)
    with pytest.raises(InputError, match="bias correction"):
        bias_correction(pd.DataFrame({"true": true, "predicted": np.full(5, 50.0)}))


def fold_dir(root, name, predicted, task="regression"):
    d = root / name
    d.mkdir()
    rows = pd.DataFrame({"participant_id": ["sub-1", "sub-2", "sub-3", "sub-4", "sub-5"], "session": "",
                         "image_id": ["sub-1", "sub-2", "sub-3", "sub-4", "sub-5"],
                         "split": ["val", "test", "test", "test", "test"], "true": [30.0, 20.0, 40.0, 60.0, 80.0],
                         "predicted": predicted})
    rows["predicted_corrected"] = rows["predicted"]
    rows.to_csv(d / "predictions.tsv", sep="\t", index=False)
    test = rows[rows["split"] == "test"]
    metrics = {"task": task, "target": "age", "classes": None, "best_epoch": 3, **participant_metrics(test, None, 50.0)}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_summary_ensembles_the_folds_test_predictions_by_image(tmp_path):
    a = fold_dir(tmp_path, "fold-1", [0.0, 22.0, 38.0, 64.0, 76.0])
    b = fold_dir(tmp_path, "fold-2", [0.0, 18.0, 42.0, 60.0, 84.0])
    result = summarise([a, b], tmp_path / "summary")
    combined = pd.read_csv(tmp_path / "summary" / "predictions.tsv", sep="\t")
    assert combined["image_id"].tolist() == ["sub-2", "sub-3", "sub-4", "sub-5"]  # test images only
    np.testing.assert_allclose(combined["predicted"], [20.0, 40.0, 62.0, 80.0])
    assert result["ensemble"]["mae"] == pytest.approx(0.5)
    table = pd.read_csv(tmp_path / "summary" / "metrics.tsv", sep="\t", index_col="model")
    assert list(table.index) == ["fold-1", "fold-2", "mean", "sd", "ensemble"]
    assert table.at["mean", "mae"] == pytest.approx((table.at["fold-1", "mae"] + table.at["fold-2", "mae"]) / 2)
    assert table.at["ensemble", "mae_ci_low"] <= 0.5 <= table.at["ensemble", "mae_ci_high"]
    assert (tmp_path / "summary" / "performance.png").stat().st_size > 10_000


def test_folds_that_tested_different_images_are_an_error(tmp_path):
    a = fold_dir(tmp_path, "fold-1", [0.0, 22.0, 38.0, 64.0, 76.0])
    b = fold_dir(tmp_path, "fold-2", [0.0, 18.0, 42.0, 60.0, 84.0])
    table = pd.read_csv(b / "predictions.tsv", sep="\t")
    table.loc[4, "image_id"] = "sub-9"
    table.to_csv(b / "predictions.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="different test images"):
        summarise([a, b], tmp_path / "summary")


def test_classification_ensemble_averages_probabilities():
    folds = [pd.DataFrame({"participant_id": ["sub-1"], "session": [""], "image_id": ["sub-1"], "true": ["patient"],
                           "predicted": [p], "p_control": [1 - q], "p_patient": [q]})
             for p, q in (("patient", 0.9), ("control", 0.4))]
    combined = ensemble(folds, ["control", "patient"])
    assert combined.loc[0, "p_patient"] == pytest.approx(0.65) and combined.loc[0, "predicted"] == "patient"


def test_metrics_undefined_for_a_single_test_image_or_class_are_nan_with_the_reason():
    one = regression_metrics([40.0], [43.0], train_mean=50)
    assert one["mae"] == pytest.approx(3) and one["n"] == 1
    assert np.isnan(one["pearson_r"]) and np.isnan(one["r2"])
    assert one["undefined"] == ["r2, pearson_r: 1 test prediction(s); they need at least 2"]
    constant = regression_metrics([40.0, 60.0], [50.0, 50.0], train_mean=50)
    assert np.isnan(constant["pearson_r"]) and "all equal" in constant["undefined"][0]
    assert "undefined" not in regression_metrics([20, 40, 60], [22, 38, 63], train_mean=50)
    classes = ["control", "patient"]
    only_patients = classification_metrics(["patient", "patient"], np.array([[0.2, 0.8], [0.6, 0.4]]), classes)
    assert only_patients["accuracy"] == pytest.approx(0.5) and np.isnan(only_patients["roc_auc"])
    assert only_patients["undefined"] == ["roc_auc: the test set holds only class(es) ['patient'] of "
                                          "['control', 'patient']"]


def test_summary_of_a_single_test_participant(tmp_path):
    folds = []
    for name, predicted in [("fold-1", 43.0), ("fold-2", 45.0)]:
        d = tmp_path / name
        d.mkdir()
        rows = pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "session": "", "image_id": ["sub-1", "sub-2"],
                             "split": ["val", "test"], "true": [30.0, 40.0], "predicted": [31.0, predicted]})
        rows.to_csv(d / "predictions.tsv", sep="\t", index=False)
        metrics = {"task": "regression", "target": "age", "classes": None, "best_epoch": 1,
                   **participant_metrics(rows[rows["split"] == "test"], None, 50.0)}
        (d / "metrics.json").write_text(json.dumps(metrics))
        folds.append(d)
    result = summarise(folds, tmp_path / "summary")
    assert result["ensemble"]["mae"] == pytest.approx(4.0)
    assert result["ensemble"]["mae_ci"] == pytest.approx([4.0, 4.0])
    assert np.isnan(result["ensemble"]["pearson_r"]) and "1 test prediction" in result["ensemble"]["undefined"][0]
    table = pd.read_csv(tmp_path / "summary" / "metrics.tsv", sep="\t", index_col="model")
    assert table.at["ensemble", "mae"] == pytest.approx(4.0) and np.isnan(table.at["ensemble", "pearson_r"])


def test_bias_correction_of_a_single_validation_image_names_the_fix():
    with pytest.raises(InputError, match=r"1 image\(s\) with 1 value\(s\).*split.folds"):
        bias_correction(pd.DataFrame({"true": [30.0], "predicted": [33.0]}))


@pytest.mark.parametrize("classes", [None, ["control", "patient"]])
def test_one_test_participant_is_scored_with_the_undefined_metrics_named(tmp_path, classes):
    """A tiny cohort's test set of one participant: the summary, its plot and the comparison with
    the linear baseline finish; what cannot be computed is NaN with the reason."""
    for kind in ("evaluate", "linear"):
        d = tmp_path / kind / "fold-1"
        d.mkdir(parents=True)
        rows = pd.DataFrame({"participant_id": ["sub-1", "sub-2"], "session": "", "image_id": ["sub-1", "sub-2"],
                             "split": ["val", "test"]})
        if classes:
            rows = rows.assign(true=["control", "patient"], predicted=["control", "patient"], p_control=[0.7, 0.3],
                               p_patient=[0.3, 0.7])
        else:
            rows = rows.assign(true=[30.0, 40.0], predicted=[31.0, 44.0])
        rows.to_csv(d / "predictions.tsv", sep="\t", index=False)
        test = rows[rows["split"] == "test"].drop(columns="split")
        record = {"task": "classification" if classes else "regression", "target": "t", "classes": classes,
                  "best_epoch": 1, "train_mean": None if classes else 35.0,
                  **participant_metrics(test, classes, None if classes else 35.0)}
        (d / "metrics.json").write_text(json.dumps(record, default=float))
    result = summarise([tmp_path / "evaluate" / "fold-1"], tmp_path / "summary",
                       linear_dirs=[tmp_path / "linear" / "fold-1"], train_dirs=[])
    assert result["ensemble"]["n"] == 1 and result["ensemble"]["undefined"]
    assert "roc_auc" in result["ensemble"]["undefined"][0] if classes else "1 test prediction" in result["ensemble"]["undefined"][0]
    assert {row["verdict"] for row in result["comparison"]} == {"no clear difference"}
    assert (tmp_path / "summary" / "metrics_images.tsv").exists()
