"""Findings about a study's learning that a researcher can act on, each with a plain sentence.

From a fold's training history (``training``, written by the train job as ``diagnostics.json``):

* ``did_not_fit``: the network did not fit its own training data. Regression: the training loss
  (mean squared error of the z-scored target, where predicting the training mean scores about
  1) stayed above ``NOT_FITTED_LOSS`` in the last epochs; classification: training accuracy
  stayed within ``CHANCE_MARGIN`` of always answering the most frequent class.
* ``validation_diverged``: the validation loss rose to more than ``DIVERGED_RATIO`` times its
  best while the training loss fell (overfitting; the best epoch's weights are used).
* ``best_at_start``: the best validation loss came in the first ``EARLY_FRACTION`` of at least
  ``MIN_EPOCHS`` epochs: the saved weights are barely trained (validation never improved after).
* ``still_improving``: the best validation loss came in the last epoch, so more epochs may help.

From the comparison with the linear baseline (``compared``): ``worse_than_linear`` where the
deep model's headline metric is worse and the paired bootstrap interval excludes 0, and
``linear_skipped`` where the baseline could not be fitted.
"""

from __future__ import annotations

import pandas as pd

NOT_FITTED_LOSS = 0.5
CHANCE_MARGIN = 0.1
DIVERGED_RATIO = 2.0
LAST_EPOCHS = 5
EARLY_FRACTION = 0.2
MIN_EPOCHS = 10


def finding(kind: str, message: str, **figures) -> dict:
    return {"finding": kind, "message": message, **figures}


def training(history: pd.DataFrame, task: str, majority: float | None = None) -> list[dict]:
    """Findings from one fold's ``history`` (history.tsv rows). ``majority``: the training share
    of the most frequent class (classification)."""
    if history.empty or task == "segmentation":
        return []
    last = history.tail(LAST_EPOCHS)
    findings = []
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
    if len(history) >= MIN_EPOCHS and best + 1 <= EARLY_FRACTION * len(history):
        findings.append(finding(
            "best_at_start", f"The best validation loss came at epoch {int(history.at[best, 'epoch'])} of "
            f"{int(final['epoch'])}: the saved weights are from early in training, and nothing the network learned "
            "afterwards improved on the validation images. Look at the learning curves and at the linear "
            "baseline; a lower learning rate (train.learning_rate), a longer train.patience or more validation "
            "participants (split.folds) may help.",
            best_epoch=int(history.at[best, "epoch"]), last_epoch=int(final["epoch"])))
    if best == len(history) - 1 and len(history) > 1:
        findings.append(finding(
            "still_improving", f"The validation loss was still falling at the last epoch ({int(final['epoch'])}): "
            "more epochs (train.epochs) may give a better model.", last_epoch=int(final["epoch"])))
    return findings


def compared(headline: dict | None, task: str, skipped: list[str]) -> list[dict]:
    """Findings from the ensemble's headline comparison row (``compare.headline``) and the folds
    whose linear baseline was skipped (their reasons)."""
    findings = [finding("linear_skipped", f"The linear baseline was not fitted: {reason}") for reason in skipped]
    if headline is None:
        return findings
    name, low, high = headline["metric"], headline["difference_ci_low"], headline["difference_ci_high"]
    if headline["verdict"] == "linear better":
        findings.append(finding(
            "worse_than_linear", f"The deep ensemble is worse than a linear model fitted to the same preprocessed "
            f"images and splits: test {name} {headline['deep']:.3f} against {headline['linear']:.3f} "
            f"(difference {headline['difference']:+.3f}, 95 % interval {low:+.3f} to {high:+.3f}). "
            "Report the linear model too; the deep model's extra capacity is not paying off on this cohort.",
            metric=name, deep=headline["deep"], linear=headline["linear"], difference=headline["difference"]))
    return findings
