"""Findings about a fold's training that a researcher can act on, each with a plain sentence,
from its history (``history.tsv`` rows), written by the train job as ``diagnostics.json``:

* ``did_not_fit``: the network did not fit its own training data. Regression: the training loss
  (mean squared error of the z-scored target, where predicting the training mean scores about
  1) stayed above ``NOT_FITTED_LOSS`` in the last epochs; classification: training accuracy
  stayed within ``CHANCE_MARGIN`` of always answering the most frequent class.
* ``validation_diverged``: the validation loss rose to more than ``DIVERGED_RATIO`` times its
  best while the training loss fell (overfitting; the best epoch's weights are used).
* ``majority_class`` (classification): the network collapsed onto one class — in more than half
  of the epochs its training or validation balanced accuracy was within ``COLLAPSE_MARGIN`` of
  chance (1 / K: every image given the same class), or, in a history without balanced accuracy,
  its accuracy was the most frequent class's share.
* ``best_at_start``: the best validation loss came in the first ``EARLY_FRACTION`` of at least
  ``MIN_EPOCHS`` epochs run, or in the first ``EARLY_PLANNED`` of the planned ``train.epochs``
  (early stopping ends such a run at best epoch + patience, so the epochs run alone would hide it):
  the saved weights are barely trained (validation never improved after).
* ``still_improving``: the best validation loss came in the last epoch, so more epochs may help.

The findings about test predictions and the linear baseline are ``pipeline.results.diagnostics``.
"""

from __future__ import annotations

import pandas as pd

NOT_FITTED_LOSS = 0.5
CHANCE_MARGIN = 0.1
DIVERGED_RATIO = 2.0
LAST_EPOCHS = 5
EARLY_FRACTION = 0.2
EARLY_PLANNED = 0.1
MIN_EPOCHS = 10
COLLAPSE_MARGIN = 0.02  # balanced accuracy this close to 1 / K counts as one class for every image
MAJORITY_TOLERANCE = 0.005  # accuracy this close to the majority share (histories without balanced accuracy)
MOST = 0.5  # "most epochs": more than this fraction


def finding(kind: str, message: str, **figures) -> dict:
    return {"finding": kind, "message": message, **figures}


def collapsed_epochs(history: pd.DataFrame, split: str, majority: float | None, classes: int) -> pd.Series | None:
    """Per epoch, whether ``split``'s (train or val) predictions were one class for every image:
    balanced accuracy at 1 / ``classes``, or (older histories) accuracy at the ``majority`` share.
    None where the history cannot tell."""
    balanced, accuracy = f"{split}_balanced_accuracy", f"{split}_accuracy"
    if balanced in history:
        return (history[balanced].astype(float) - 1 / classes).abs() <= COLLAPSE_MARGIN
    if accuracy in history and majority is not None:
        return (history[accuracy].astype(float) - majority).abs() <= MAJORITY_TOLERANCE
    return None


def majority_class(history: pd.DataFrame, majority: dict, classes: int) -> dict | None:
    """The ``majority_class`` finding, or None."""
    counts = {}
    for split in ("train", "val"):
        collapsed = collapsed_epochs(history, split, majority.get(split), classes)
        if collapsed is not None:
            counts[split] = int(collapsed.sum())
    if not any(n > MOST * len(history) for n in counts.values()):
        return None
    words = {"train": "training", "val": "validation"}
    where = " and ".join(f"{words[s]} images in {n} of {len(history)} epochs" for s, n in counts.items())
    shares = ", ".join(f"{words[s]} {majority[s]:.2f}" for s in counts if majority.get(s) is not None)
    return finding(
        "majority_class", f"The network collapsed onto one class: it gave (nearly) every image the same class on the "
        f"{where} (balanced accuracy within {COLLAPSE_MARGIN} of chance, 1/{classes}"
        + (f"; the most frequent class's share: {shares}" if shares else "") + "). Its predictions carry no "
        "information, whatever the test metrics say. Keep train.class_weights: balanced (the default), try a "
        "lower train.learning_rate and a longer train.patience, check that the classes differ visibly on the "
        "preprocessed grid (a finer preprocess.resolution for small effects), and with few participants per class "
        "use fewer split.folds or more data; compare with the linear baseline.",
        epochs=len(history), **{f"{s}_collapsed_epochs": n for s, n in counts.items()})


def training(history: pd.DataFrame, task: str, majority: float | dict | None = None, epochs: int | None = None,
             classes: int = 2) -> list[dict]:
    """Findings from one fold's ``history`` (history.tsv rows). ``majority``: the share of the most
    frequent class (classification) in the training images, or by split ({"train": …, "val": …});
    ``epochs``: the planned epochs (config ``train.epochs``); ``classes``: how many classes."""
    if history.empty or task == "segmentation":
        return []
    if not isinstance(majority, dict):
        majority = {"train": majority}
    last = history.tail(LAST_EPOCHS)
    findings = []
    if task == "classification":
        collapse = majority_class(history, majority, classes)
        if collapse is not None:
            findings.append(collapse)
    majority = majority.get("train")
    if task == "classification" and majority is not None and "train_accuracy" in history:
        accuracy = float(last["train_accuracy"].max())
        if accuracy <= majority + CHANCE_MARGIN:
            findings.append(finding(
                "did_not_fit", f"The network did not fit its training data: training accuracy reached at most "
                f"{accuracy:.2f} in the last {len(last)} epochs, where always answering the most frequent class "
                f"scores {majority:.2f}. Try a lower learning rate (train.learning_rate), more epochs, weaker "
                "augmentation (train.augmentation) or another architecture; check that the effect is visible "
                "on the preprocessed grid (a finer preprocess.resolution for small effects).",
                train_accuracy=accuracy, chance=majority))
    elif task == "regression":
        loss = float(last["train_loss"].min())
        if loss >= NOT_FITTED_LOSS:
            findings.append(finding(
                "did_not_fit", f"The network did not fit its training data: the training loss stayed at {loss:.2f} "
                f"or above in the last {len(last)} epochs, where predicting the training mean scores about 1. "
                "Try a lower learning rate (train.learning_rate), more epochs, weaker augmentation "
                "(train.augmentation) or another architecture.", train_loss=loss))
    best = int(history["val_loss"].astype(float).idxmin())
    best_loss, final = float(history.at[best, "val_loss"]), history.iloc[-1]
    falling = float(final["train_loss"]) < float(history.at[best, "train_loss"])
    if float(final["val_loss"]) > DIVERGED_RATIO * best_loss and falling and best < len(history) - 1:
        findings.append(finding(
            "validation_diverged", f"Validation loss rose from {best_loss:.3f} (epoch {int(history.at[best, 'epoch'])}) "
            f"to {float(final['val_loss']):.3f} (epoch {int(final['epoch'])}) while the training loss fell: the "
            "network overfits its training images. The best epoch's weights are used; stronger regularisation "
            "(train.weight_decay, model_args dropout) or more training data would help.",
            best_epoch=int(history.at[best, "epoch"]), best_val_loss=best_loss, final_val_loss=float(final["val_loss"])))
    best_epoch = int(history.at[best, "epoch"])
    early_planned = epochs is not None and best_epoch <= EARLY_PLANNED * epochs
    if len(history) >= MIN_EPOCHS and (best + 1 <= EARLY_FRACTION * len(history) or early_planned):
        planned = f", {epochs} planned" if epochs is not None and epochs != int(final["epoch"]) else ""
        findings.append(finding(
            "best_at_start", f"The best validation loss came at epoch {best_epoch} of "
            f"{int(final['epoch'])}{planned}: the saved weights are from early in training, and nothing the network "
            "learned afterwards improved on the validation images. Look at the learning curves and at the linear "
            "baseline; a lower learning rate (train.learning_rate), a longer train.patience or more validation "
            "participants (split.folds) may help.",
            best_epoch=int(history.at[best, "epoch"]), last_epoch=int(final["epoch"])))
    if best == len(history) - 1 and len(history) > 1:
        findings.append(finding(
            "still_improving", f"The validation loss was still falling at the last epoch ({int(final['epoch'])}): "
            "more epochs (train.epochs) may give a better model.", last_epoch=int(final["epoch"])))
    return findings
