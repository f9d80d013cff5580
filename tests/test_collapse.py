"""Classification on small, unbalanced cohorts (issue 26): class-balanced loss and checkpoint choice,
and the diagnostics that see a network collapse onto the majority class."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.learning.losses import balanced_weights, loss_fn
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train
from pipeline.learning import curves
from pipeline.results import diagnostics
from test_train import SMALL, study_table, write_study


def test_balanced_weights_give_each_class_the_same_say():
    labels = torch.tensor([0] * 11 + [1] * 4)  # issue 26's fold 2: 11 controls, 4 patients
    weights = balanced_weights(labels, 2)
    assert torch.allclose(weights, torch.tensor([15 / 22, 15 / 8]))
    assert torch.allclose((weights[labels]).sum(), torch.tensor(15.0))  # the weighted count is the count
    assert torch.allclose(balanced_weights(torch.tensor([1, 1, 2]), 3), torch.tensor([1.0, 0.75, 1.5]))  # 0 absent


@pytest.mark.parametrize("confidence", [0.5, 2.0, 5.0])
def test_a_constant_answer_cannot_game_the_balanced_validation_loss(confidence):
    """A validation set of 11 controls and 4 patients: always answering "control" lowers the plain
    cross-entropy below always answering "patient", and the balanced one not at all."""
    targets = torch.tensor([0] * 11 + [1] * 4)
    majority = torch.tensor([[confidence, -confidence]]).repeat(15, 1)
    minority = majority.flip(1)
    plain = loss_fn("classification")
    assert plain(majority, targets) < plain(minority, targets)
    balanced = loss_fn("classification", balanced_weights(targets, 2))
    assert torch.isclose(balanced(majority, targets), balanced(minority, targets))
    uninformed = balanced(torch.zeros(15, 2), targets)  # and no constant answer beats not knowing
    assert balanced(majority, targets) >= uninformed


def unbalanced_study(root):
    """``write_study``'s 8 training and 4 validation images, 6 of the training ones in class b."""
    manifest, splits, preproc = write_study(root)
    table = pd.read_csv(manifest, sep="\t")
    table["group"] = ["a" if k in (0, 1, 8) else "b" for k in range(len(table))]
    table.to_csv(manifest, sep="\t", index=False)
    return study_table(manifest, splits, preproc, "fold-1")


def test_classification_trains_with_balanced_weights_by_default(tmp_path):
    table = unbalanced_study(tmp_path / "study")
    train(table, "group", "classification", TrainSettings.of({**SMALL, "epochs": 2}), tmp_path / "balanced")
    hyper = json.loads((tmp_path / "balanced" / "hyperparameters.json").read_text())
    assert hyper["class_weights"] == "balanced"
    assert hyper["class_weight_values"] == pytest.approx({"a": 8 / (2 * 2), "b": 8 / (2 * 6)})
    history = pd.read_csv(tmp_path / "balanced" / "history.tsv", sep="\t")
    assert {"train_balanced_accuracy", "val_balanced_accuracy"} <= set(history.columns)
    assert history["val_balanced_accuracy"].between(0, 1).all()
    train(table, "group", "classification", TrainSettings.of({**SMALL, "epochs": 2, "class_weights": "none"}),
          tmp_path / "plain")
    plain = json.loads((tmp_path / "plain" / "hyperparameters.json").read_text())
    assert plain["class_weights"] == "none" and "class_weight_values" not in plain
    # same seed, same first step? No: the weighted loss changes the gradients, so the runs differ
    assert not np.allclose(pd.read_csv(tmp_path / "plain" / "history.tsv", sep="\t")["train_loss"],
                           history["train_loss"])


def collapsed_history(epochs=40, best=10, balanced=True):
    """Issue 26's fold 2: 11 controls and 4 patients in training, training accuracy 11/15 at every
    epoch, the validation loss lowest at epoch ``best``, early stopping ``epochs`` - ``best`` later."""
    rng = np.random.default_rng(0)
    val_loss = 0.70 + 0.002 * np.abs(np.arange(1, epochs + 1) - best) + rng.uniform(0, 1e-4, epochs)
    rows = {"epoch": np.arange(1, epochs + 1), "train_loss": 0.69 - 0.0005 * np.arange(epochs), "val_loss": val_loss,
            "train_accuracy": [11 / 15] * epochs, "val_accuracy": [4 / 14] * epochs}
    if balanced:
        rows.update(train_balanced_accuracy=[0.5] * epochs, val_balanced_accuracy=[0.5] * epochs)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("balanced", [True, False])
def test_a_network_stuck_on_the_majority_class_is_a_finding(balanced):
    """With balanced accuracy in the history (0.5 = one class for all), and from an older history's
    accuracy at the majority share."""
    found = {f["finding"]: f for f in curves.training(collapsed_history(balanced=balanced), "classification",
                                                            {"train": 11 / 15, "val": 10 / 14}, epochs=100)}
    collapse = found["majority_class"]
    assert collapse["train_collapsed_epochs"] == 40
    assert "collapsed onto one class" in collapse["message"] and "train.class_weights" in collapse["message"]
    assert "training images in 40 of 40 epochs" in collapse["message"]


def test_a_learning_network_is_not_called_collapsed():
    history = collapsed_history()
    learning = np.linspace(0.5, 0.95, len(history))
    history = history.assign(train_balanced_accuracy=learning, val_balanced_accuracy=learning.clip(0.5, 0.8),
                             train_accuracy=learning, val_accuracy=learning.clip(0.5, 0.8))
    assert "majority_class" not in [f["finding"] for f in curves.training(history, "classification",
                                                                               {"train": 0.5, "val": 0.5}, epochs=40)]
    half = history.assign(val_balanced_accuracy=[0.5] * 20 + [0.75] * 20)  # half the epochs is not most
    assert "majority_class" not in [f["finding"] for f in curves.training(half, "classification", 0.5)]


def test_a_best_epoch_in_the_first_tenth_of_the_planned_training_is_a_finding():
    """Epoch 10 of 100 planned: patience 30 stops the run at 40, where 10 is a quarter of the epochs run."""
    history = collapsed_history(balanced=False).assign(train_accuracy=np.linspace(0.6, 0.9, 40))
    assert "best_at_start" not in [f["finding"] for f in curves.training(history, "classification", 11 / 15)]
    found = {f["finding"]: f for f in curves.training(history, "classification", 11 / 15, epochs=100)}
    assert found["best_at_start"]["best_epoch"] == 10 and "epoch 10 of 40, 100 planned" in \
        found["best_at_start"]["message"]
    later = collapsed_history(best=15, balanced=False).assign(train_accuracy=np.linspace(0.6, 0.9, 40))
    assert "best_at_start" not in [f["finding"] for f in curves.training(later, "classification", 0.5,
                                                                              epochs=100)]


def test_a_constant_test_prediction_is_a_finding():
    rows = pd.DataFrame({"image_id": [f"sub-{i:02d}" for i in range(11)], "true": ["control"] * 4 + ["patient"] * 7,
                         "predicted": ["control"] * 11, "p_patient": np.linspace(0.2, 0.3, 11)})
    found = diagnostics.predicted(rows, "classification")
    assert [f["finding"] for f in found] == ["constant_prediction"]
    assert "Every one of the 11 test images was predicted 'control' (4 of them are)" in found[0]["message"]
    assert diagnostics.predicted(rows.assign(predicted=["control"] * 10 + ["patient"]), "classification") == []
    assert diagnostics.predicted(rows.assign(true=1.0, predicted=2.0), "regression") == []


def test_the_warmed_up_weight_average_forgets_the_random_start():
    """Issue 26's thalamus folds: 16 training images are 4 steps an epoch, and a fixed decay of
    0.98 still weighs the random start 0.98^12 = 78 % after 3 epochs; warmed up, under 1 %."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from pipeline.learning.trainer import warm_decay, warm_ema

    def average_after(update, steps):
        network = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.zeros_(network.weight)
        averaged = AveragedModel(network, multi_avg_fn=update, use_buffers=True)
        averaged.update_parameters(network)  # the copy of the start
        with torch.no_grad():
            network.weight.fill_(1.0)  # the trained weights
        for _ in range(steps):
            averaged.update_parameters(network)
        return float(averaged.module.weight)

    assert average_after(get_ema_multi_avg_fn(0.98), 12) == pytest.approx(1 - 0.98 ** 12, rel=1e-5)
    assert average_after(warm_ema(0.98), 12) > 0.99
    assert [warm_decay(0.98, t) for t in (1, 10, 1000)] == pytest.approx([2 / 11, 11 / 20, 0.98])
