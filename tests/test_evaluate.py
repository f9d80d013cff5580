import numpy as np
import pytest

from pipeline.evaluate import classification_metrics, regression_metrics


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
    assert m["positive_class"] == "patient"
