"""Findings about a study's results that a researcher can act on, each with a plain sentence
(``finding``; those about a fold's training, from its history, are ``pipeline.learning.curves``).

From a fold's test predictions (``predicted``): ``constant_prediction`` (classification) where
every test image got the same class.

From the comparison with the linear baseline (``compared``): ``worse_than_linear`` where the
deep model's headline metric is worse and the paired bootstrap interval excludes 0, and
``linear_skipped`` where the baseline could not be fitted.
"""

from __future__ import annotations

import pandas as pd

from pipeline.learning.curves import finding


def predicted(predictions: pd.DataFrame, task: str) -> list[dict]:
    """Findings from one fold's test predictions (``predictions.tsv`` rows of the test split:
    ``true`` and ``predicted``): ``constant_prediction`` where a classifier gave every image one class."""
    if task != "classification" or len(predictions) < 2:
        return []
    answers = predictions["predicted"].astype(str)
    if answers.nunique() > 1:
        return []
    answer, truth = answers.iloc[0], predictions["true"].astype(str)
    return [finding(
        "constant_prediction", f"Every one of the {len(predictions)} test images was predicted {answer!r} "
        f"({int((truth == answer).sum())} of them are): the model does not tell the classes apart, and its accuracy is "
        "that class's share of the test set. Its ROC AUC rests only on differences in probability too small to "
        "change an answer. See the training findings and the learning curves; keep train.class_weights: balanced, "
        "and check the split's class balance (results/split_balance.tsv).",
        predicted_class=answer, images=len(predictions))]


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
