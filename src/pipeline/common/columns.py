"""What every column of the pipeline's TSV tables means: one registry, from which the BIDS-style
data dictionary beside each TSV is made (``metrics_images.tsv`` → ``metrics_images.json``, keys
``LongName``, ``Description``, ``Units`` where the column has one, ``Levels`` for a categorical one).

``atomic.to_csv`` writes the dictionary of every ``.tsv`` it writes (``sidecar_of`` names it). A
column is looked up, in order, in the writer's own entries (``meanings=``: what only the writer
knows, such as the classes of a target or the QC threshold of this study), in ``COLUMNS`` (exact
names), then in ``FAMILIES`` (patterns such as ``p_<class>``, ``dice_<label>``, ``<method>_mass``;
a family may wrap another entry: ``corrected_<metric>``, ``<statistic>_ci_low``). A column found
nowhere is written with ``UNDOCUMENTED`` as its description and an ``Undocumented`` warning, which
the test suite turns into an error (pyproject.toml): adding a column to a table means adding its
entry here, or in the writer's module for names only it knows. The test metrics' entries come from
their registry (``pipeline.results.metrics.COLUMNS``), which their writers pass as ``meanings``.

To add a column: one ``Column`` in ``COLUMNS`` (or a ``Family`` for a name built from a value),
with a long name a reader understands without the code and a description that says how it is
computed and, for a number, what range or direction is good.

The one exception to ``<stem>.json``: ``metrics.tsv``'s dictionary is ``metrics_dictionary.json``,
because ``metrics.json`` beside it is the evaluation's summary (read by the report and the package).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

UNDOCUMENTED = "No entry in pipeline.common.columns: this column is not documented yet."
SIDECAR_EXCEPTIONS = {"metrics.tsv": "metrics_dictionary.json"}  # metrics.json is the evaluation summary


class Undocumented(UserWarning):
    """A TSV column without an entry in the registry (an error in the test suite)."""


@dataclass(frozen=True)
class Column:
    """One column's meaning, as BIDS describes a TSV column (``LongName``, ``Description``,
    ``Units``, ``Levels``: {value: meaning})."""

    long_name: str
    description: str
    units: str | None = None
    levels: Mapping[str, str] | None = None

    def entry(self) -> dict:
        out = {"LongName": self.long_name, "Description": self.description}
        if self.units:
            out["Units"] = self.units
        if self.levels:
            out["Levels"] = dict(self.levels)
        return out


@dataclass(frozen=True)
class Family:
    """Columns named after a value (a class, a label, a method, another column): ``pattern`` is a
    regular expression matched against the whole name; ``make(groups, lookup)`` returns the
    ``Column`` (``lookup(name)``: another column's entry, or None; a family that wraps an
    undocumented column is undocumented too)."""

    pattern: str
    make: Callable[[dict, Callable[[str], Column | None]], Column | None]
    example: str = field(default="")  # a name it matches (tests/test_columns.py checks)


SPLITS = {"train": "used to fit the model's weights", "val": "validation: used to choose the epoch, the "
          "penalty or the variant, and for the bias correction", "test": "held out: scored once, by evaluate"}
YES_NO = {"yes": "yes", "no": "no"}
TRUE_FALSE = {"True": "yes", "False": "no"}

COLUMNS: dict[str, Column] = {
    # --- identifiers (every stage) ---
    "participant_id": Column("Participant", "BIDS participant label with its prefix (sub-…)."),
    "session": Column("Session", "BIDS session label with its prefix (ses-…); empty for a dataset without sessions."),
    "image_id": Column("Image", "The image's identifier: its BIDS file name up to the suffix (sub-…[_ses-…][_acq-…]"
                       "[_run-…]); one image is one sample."),
    "subdir": Column("Image folder", "The image's folder below the dataset root (sub-…[/ses-…]): where its "
                     "derivatives are written."),
    "model": Column("Model", "Which model the row scores: a fold's model (fold-K), the mean or the standard "
                    "deviation of the folds' rows (mean, sd), or the ensemble of the folds (mean prediction or mean "
                    "class probabilities), scored once: the only row with 95 % intervals."),
    "fold": Column("Fold", "The cross-validation fold (fold-K)."),
    "split": Column("Split", "The part of the fold the image belongs to.", levels=SPLITS),
    # --- ingest: manifest.tsv, samples.tsv, ingest_report.tsv, excluded.tsv ---
    "path": Column("Image path", "Absolute path of the input image (of the first channel with several)."),
    "label": Column("Label image", "Absolute path of the image's label map (config label_image)."),
    "brain_mask": Column("Brain mask", "Absolute path of the image's brain mask from a derivatives folder "
                         "(config brain_mask)."),
    "reason": Column("Reason", "Why the sample or participant was left out, and what to do about it."),
    "stage": Column("Stage", "The stage that left the sample out.",
                    levels={"ingest": "selection and checks of the input (ingest_report.tsv)",
                            "preprocess": "preprocessing failed, or its registration scored below "
                                          "preprocess.qc_min",
                            "qc": "the cohort quality-control rule (config qc) flagged its registration"}),
    "file": Column("File", "Absolute path of the input file the row is about (the image; in excluded.tsv the "
                   "image or table at fault, empty when there is none)."),
    # --- qc.tsv (pipeline.intake.qc) ---
    "correlation_with_template": Column(
        "Correlation with the template", "Pearson r of the preprocessed image and the template inside the template "
        "brain mask, on the study grid: -1 to 1, higher is better. config preprocess.qc_min applies to this score."),
    "mutual_information_with_template": Column(
        "Normalised mutual information with the template", "2 I(A; B) / (H(A) + H(B)) of a 32 x 32 joint histogram "
        "of the preprocessed image and the template inside the template brain mask: 0 (independent) to 1; higher is "
        "better; it does not assume a linear intensity relation."),
    "local_correlation_with_template": Column(
        "Local correlation with the template", "Mean Pearson r of the preprocessed image and the template over "
        "windows of about 12 mm inside the template brain mask: every region must match, not only the outline "
        "(-1 to 1, higher is better)."),
    "template_brain_in_view": Column(
        "Template brain in view", "Share of the template brain inside the image's field of view carried to the "
        "study grid (0 to 1; below 1 the scan cut part of the brain off)."),
    "brain_offset_mm": Column(
        "Brain offset", "Distance between the centres of the image's own brain mask carried to the grid and of the "
        "template's brain mask; empty without brain extraction.", units="mm"),
    "brain_volume_ml": Column(
        "Brain volume", "Volume of the image's own brain mask on its own grid; empty without brain extraction.",
        units="ml"),
    "flagged_because": Column(
        "Flagged because", "Why the image is excluded (the stage and reason of excluded.tsv: a failed preprocessing, "
        "preprocess.qc_min or the cohort rule, config qc); empty for a kept image."),
    "image_a": Column("First image", "The first image of the pair (image_id)."),
    "image_b": Column("Second image", "The second image of the pair (image_id), of the same participant."),
    "correlation": Column("Test-retest correlation", "Pearson r of the pair's preprocessed reference images inside "
                          "the template brain mask (-1 to 1; a participant's sessions or runs should agree closely)."),
    # --- retest_predictions.tsv (pipeline.results.retest) ---
    "predicted_a": Column("Prediction of the first image", "The ensemble's prediction of image_a (as predicted)."),
    "predicted_b": Column("Prediction of the second image", "The ensemble's prediction of image_b (as predicted)."),
    "prediction_difference": Column(
        "Test-retest prediction difference", "|predicted_a - predicted_b|, in the target's units (regression); for "
        "classification the largest difference, over the classes, of the two images' probabilities (0 to 1). "
        "Two scans of one participant close in time should be predicted alike: lower is better."),
    "class_share_off": Column("Class share off", "Largest difference, over the classes, between a class's share of "
                              "the part's participants and its share of the cohort, in percentage points."),
    "warning": Column("Warning", "What is doubtful about this part of the split (a class share far from the "
                      "cohort's, too few training participants of a class) and what to change; empty when nothing."),
    "brain_mask_dice_with_template": Column(
        "Brain mask Dice with the template", "Dice overlap of the image's own brain mask carried to the study grid "
        "and the template's brain mask: 0 to 1, higher is better; empty without brain extraction (the mask is the "
        "template's)."),
    "excluded": Column("Excluded", "Whether the sample is left out of the study (excluded.tsv says why).",
                       levels=YES_NO),
    "qc_png": Column("QC image", "Absolute path of the QC figure: the preprocessed image with the template's "
                     "brain outline."),
    # --- split_balance.tsv ---
    "participants": Column("Participants", "Number of participants."),
    "images": Column("Images", "Number of images."),
    "mean": Column("Mean target", "Mean of the target over the images, in the target's units."),
    "sd": Column("Target standard deviation", "Standard deviation of the target over the images."),
    "min": Column("Minimum target", "Smallest target value of the images."),
    "max": Column("Maximum target", "Largest target value of the images."),
    # --- training: history.tsv, variants.tsv ---
    "epoch": Column("Epoch", "Training epoch, from 1."),
    "train_loss": Column("Training loss", "Mean loss over the epoch's training batches (the loss of config "
                         "train.loss, on the standardised target for regression)."),
    "val_loss": Column("Validation loss", "Loss on the validation images: in history.tsv after the epoch (the "
                       "lowest picks the saved model; segmentation: the highest validation Dice; classification: the "
                       "mean over the classes of each class's mean cross-entropy); in the linear "
                       "baseline's validation.tsv the mean squared error (regression) or cross-entropy "
                       "(classification) of the penalty (the lowest is chosen)."),
    "train_mae": Column("Training MAE", "Mean absolute error on the epoch's training batches, in the target's units "
                        "(during the epoch, with augmentation)."),
    "val_mae": Column("Validation MAE", "Mean absolute error on the validation images after the epoch, in the "
                      "target's units."),
    "train_accuracy": Column("Training accuracy", "Share of the epoch's training images classified right (0 to 1)."),
    "val_accuracy": Column("Validation accuracy", "Share of the validation images classified right after the epoch "
                           "(0 to 1)."),
    "train_balanced_accuracy": Column("Training balanced accuracy", "Mean over the classes of the share of the "
                                      "epoch's training images of each class classified right (0 to 1; 1 / classes "
                                      "is chance)."),
    "val_balanced_accuracy": Column("Validation balanced accuracy", "Mean over the classes of the share of each "
                                    "class's validation images classified right after the epoch (0 to 1; 1 / "
                                    "classes is chance)."),
    "train_dice": Column("Training Dice", "Mean Dice over the labels on the epoch's training batches (0 to 1)."),
    "val_dice": Column("Validation Dice", "Mean Dice over the labels on the validation images after the epoch (0 to 1)."),
    "lr": Column("Learning rate", "The optimiser's learning rate during the epoch (after warm-up and schedule)."),
    "seconds": Column("Epoch time", "Wall-clock time of the epoch (training and validation).", units="s"),
    "steps": Column("Steps", "Optimiser steps in the epoch."),
    "data_wait": Column("Data wait", "Share of the epoch's training time spent waiting for data (0 to 1); high "
                        "values mean the loader, not the model, limits the speed."),
    "variant": Column("Variant", "Name of the training variant (config train.variants)."),
    "best_val_loss": Column("Best validation loss", "The variant's lowest validation loss."),
    "best_val_dice": Column("Best validation Dice", "The variant's highest validation Dice (segmentation)."),
    "best_epoch": Column("Best epoch", "The epoch whose model was kept (lowest validation loss; segmentation: "
                         "highest validation Dice)."),
    "epochs_run": Column("Epochs run", "Epochs trained (fewer than config train.epochs after early stopping)."),
    "chosen": Column("Chosen", "The variant kept for the fold (lowest validation loss; segmentation: highest "
                     "validation Dice).", levels=TRUE_FALSE),
    # --- linear baseline: linear/fold-K/validation.tsv ---
    "penalty": Column("Penalty", "The L2 penalty tried, relative to the features' scale."),
    "alpha": Column("Alpha", "Ridge regression: the penalty in the features' units (penalty x scale), scikit-learn's "
                    "alpha."),
    "C": Column("C", "L2 logistic regression: scikit-learn's inverse penalty strength, 1 / (penalty x scale)."),
    # --- predictions.tsv (evaluate, linear, apply) ---
    "true": Column("True value", "The target of the image (config target): a number for regression, a class name "
                   "for classification."),
    "predicted": Column("Prediction", "The model's prediction: in the target's units (regression) or the class with "
                        "the highest probability (classification); the ensemble's is the folds' mean."),
    "predicted_corrected": Column("Bias-corrected prediction", "(predicted - intercept) / slope, with slope and "
                                  "intercept of predicted on true fitted on the fold's validation images (brain-age "
                                  "bias correction; correction_slope and correction_intercept in metrics.tsv)."),
    "predicted_calibrated": Column("Calibrated prediction", "(predicted - intercept) / slope, fitted on the "
                                   "calibration participants (calibration.json); empty for those participants."),
    "role": Column("Role", "What the participant's prediction was used for.",
                   levels={"calibration": "fitted the calibration (not scored)",
                           "evaluation": "has a known target and was not used to fit: scored",
                           "applied": "no known target"}),
    # --- metrics.tsv beyond the metrics' own registry ---
    "correction_slope": Column("Bias-correction slope", "Slope of predicted on true age over the fold's validation "
                               "images (the brain-age bias correction); 1 means no bias."),
    "correction_intercept": Column("Bias-correction intercept", "Intercept of predicted on true over the fold's "
                                   "validation images, in the target's units."),
    # --- comparison.tsv (deep model against the linear baseline) ---
    "metric": Column("Metric", "The test metric compared (the headline metric of the task)."),
    "deep": Column("Deep model", "The metric of the deep model on the test participants."),
    "linear": Column("Linear baseline", "The metric of the linear baseline (pipeline.results.linear) on the same participants."),
    "difference": Column("Difference", "deep - linear."),
    "difference_ci_low": Column("Difference, 95 % interval low", "Lower bound of the 95 % paired bootstrap interval "
                                "of deep - linear (participants resampled, both models on the same draw)."),
    "difference_ci_high": Column("Difference, 95 % interval high", "Upper bound of the 95 % paired bootstrap interval "
                                 "of deep - linear."),
    "verdict": Column("Verdict", "Which model is better: the interval of the difference excludes 0 on one side, or "
                      "it holds 0 (no clear difference)."),
    # --- segmentation predictions ---
    "dice_mean": Column("Mean Dice", "Mean Dice over the foreground labels defined for the image (0 to 1, higher is "
                        "better)."),
    "true_labels": Column("True label array", "Path of the image's true label map on the study grid (.npy)."),
    "true_labels_native": Column("True label image", "Path of the image's own label image (native grid)."),
    "predicted_labels": Column("Predicted label map", "Path of the predicted label map on the study grid (NIfTI)."),
    "predicted_labels_native": Column("Predicted label map, native", "Path of the predicted label map carried to the "
                                      "image's native grid (NIfTI); empty when not written."),
    # --- explain: maps.tsv ---
    "method": Column("Attribution method", "The explanation method (config explain.methods)."),
    "target_index": Column("Explained output", "Index of the network output the map explains (the predicted class, "
                           "or config explain.target_class; 0 for regression)."),
    "completeness_error": Column("Completeness error", "Integrated gradients only: |sum of the attributions - "
                                 "(output at the image - output at the baseline)| relative to the latter; small "
                                 "values mean enough integration steps."),
    "template": Column("Template-space map", "Path of the map on the study grid (template space)."),
    "native": Column("Native-space map", "Path of the map carried back to the image's own grid."),
    # --- explain: randomisation.tsv (pipeline.results.sanity) ---
    "blocks_randomised": Column("Blocks randomised", "How many of the network's parameter blocks, counted from the "
                                "output, had their weights replaced by random ones (cascading randomisation)."),
    "of_blocks": Column("Blocks", "Number of parameter blocks of the network (all of them randomised: the full "
                        "model randomisation)."),
    "from_block": Column("Randomised from", "The first (closest to the input) block randomised at this step."),
    "spearman": Column("Rank correlation of |map|", "Spearman correlation of |attribution| of the trained and the "
                       "randomised model inside the brain; stays high for methods that multiply by the input "
                       "(Adebayo et al. 2018), so it is not the verdict."),
    "spearman_signed": Column("Rank correlation of the signed maps", "Spearman correlation of the signed attributions "
                              "of the trained and the randomised model inside the brain."),
    "top5_overlap": Column("Top-5 % overlap", "Share of the trained model's top 5 % of |attribution| that stays in "
                           "the randomised model's top 5 % (chance 0.05); after full randomisation it decides the "
                           "verdict: a map that explains the model must move."),
    "undefined": Column("Undefined", "Checked images whose similarity is undefined (a constant map), left out of "
                        "the mean."),
    # --- explain: validation.tsv ---
    "random_model_undefined": Column("Undefined after full randomisation", "Checked images whose top-5 % overlap "
                                     "after full randomisation is undefined (a constant map)."),
    "random_verdict": Column("Randomisation verdict", "Whether the map changes when the model's weights are "
                             "randomised (top-5 % overlap after full randomisation below 0.5: passes); "
                             "'not checked' without a defined value."),
    "fold_consistency_r": Column("Consistency between folds", "Mean Pearson correlation, inside the brain, of the "
                                 "folds' group mean maps over every pair of folds (-1 to 1, higher is more "
                                 "consistent)."),
    "consistency_verdict": Column("Consistency verdict", "Whether the folds' maps agree (fold_consistency_r of 0.5 "
                                  "or more), or why it was not checked."),
    "reading": Column("Reading", "What a reader can and cannot conclude from the method's maps, from its verdicts "
                      "(and its ground-truth enrichment on a simulated cohort)."),
    # --- explain: regions.tsv, classes/classes.tsv ---
    "region": Column("Region", "Atlas region (the template-derived atlas, or config explain.atlas)."),
    "voxels": Column("Voxels", "Voxels of the region inside the brain mask on the study grid."),
    "index": Column("Atlas label", "The region's label value in the user atlas (config explain.atlas)."),
    "class": Column("Class", "A true class of the test participants, or a pair of classes ('A vs B')."),
    "mean_map_r": Column("Correlation of the class maps", "Pearson correlation, inside the brain, of the two classes' "
                         "group mean maps (low: the classes' maps differ)."),
}


def _wrapping(wrap: Callable[[Column], Column]):
    """A family's ``make`` that wraps the entry of the column named by its ``of`` group."""
    def make(groups: dict, lookup) -> Column | None:
        inner = lookup(groups["of"])
        return wrap(inner) if inner else None
    return make


def _sentence(text: str) -> str:
    return text[:1].lower() + text[1:]


FAMILIES: list[Family] = [
    Family(r"path_(?P<channel>.+)", lambda g, _: Column(
        f"{g['channel']} image path", f"Absolute path of the input {g['channel']} image."), "path_T2w"),
    Family(r"fold-(?P<k>\d+)", lambda g, _: Column(
        f"Split in fold {g['k']}", f"The part of fold {g['k']} the image belongs to.", levels=SPLITS), "fold-1"),
    Family(r"p_(?P<cls>.+)", lambda g, _: Column(
        f"Probability of {g['cls']}", f"The model's probability that the image is of class {g['cls']} (0 to 1; the "
        "ensemble's is the folds' mean)."), "p_AD"),
    Family(r"(?P<native>native_)?dice_(?P<label>.+)", lambda g, _: Column(
        f"Dice of {g['label']}" + (", native grid" if g["native"] else ""),
        f"Dice overlap of the predicted and the true {g['label']} label "
        + ("on the image's own grid (the predicted map carried back) " if g["native"] else "on the study grid ")
        + "(0 to 1, higher is better); in metrics.tsv the mean over the test images."), "dice_wm"),
    Family(r"(?P<native>native_)?hd95_(?P<label>.+)", lambda g, _: Column(
        f"95th percentile Hausdorff distance of {g['label']}" + (", native grid" if g["native"] else ""),
        f"95th percentile of the distances between the predicted and the true {g['label']} label's surfaces "
        + ("on the image's own grid " if g["native"] else "on the study grid ")
        + "(lower is better); empty where either map lacks the label; in metrics.tsv the mean over the test images "
        "where defined.", units="mm"), "hd95_wm"),
    Family(r"corrected_(?P<of>.+)", _wrapping(lambda c: Column(
        f"{c.long_name}, bias-corrected", f"{c.description} Of predicted_corrected (the brain-age bias correction "
        "fitted on the fold's validation images) instead of the raw prediction.", c.units)), "corrected_mae"),
    Family(r"(?P<of>.+)_ci_low", _wrapping(lambda c: Column(
        f"{c.long_name}, 95 % interval low", f"Lower bound of the 95 % bootstrap interval (participants resampled "
        f"with all their images, 1000 draws) of: {_sentence(c.description)} Ensemble row only.", c.units)),
        "mae_ci_low"),
    Family(r"(?P<of>.+)_ci_high", _wrapping(lambda c: Column(
        f"{c.long_name}, 95 % interval high", f"Upper bound of the 95 % bootstrap interval (participants resampled "
        f"with all their images, 1000 draws) of: {_sentence(c.description)} Ensemble row only.", c.units)),
        "mae_ci_high"),
    Family(r"(?P<of>spearman|spearman_signed|top5_overlap)_(?P<end>min|max)", lambda g, lookup: Column(
        f"{lookup(g['of']).long_name}, {'minimum' if g['end'] == 'min' else 'maximum'}",
        f"The {'smallest' if g['end'] == 'min' else 'largest'} over the checked images of the folds (the mean is "
        f"column {g['of']})."), "top5_overlap_max"),
    Family(r"random_(?P<where>top_block|model)_(?P<of>spearman|spearman_signed|top5_overlap)", lambda g, lookup: Column(
        f"{lookup(g['of']).long_name} after randomising the "
        + ("top block" if g["where"] == "top_block" else "whole model"),
        f"Mean over the checked images of the folds, after randomising "
        + ("the block next to the output" if g["where"] == "top_block" else "every block")
        + f": {_sentence(lookup(g['of']).description)}"), "random_model_top5_overlap"),
    Family(r"enrichment_(?P<space>template|native)_(?P<level>group|subject)", lambda g, _: Column(
        f"Ground-truth enrichment, {g['space']} space, {g['level']} maps",
        "How many times more of the map's top 5 % of |attribution| lies in the simulated cohort's true effect than "
        "chance (1: no better than chance; higher is better), "
        + ("on the group mean map" if g["level"] == "group" else "mean over the subjects' maps")
        + (" on the study grid." if g["space"] == "template" else " on each image's own grid (the true effect carried "
                                                                  "there by the simulated pose).")),
        "enrichment_template_group"),
    Family(r"chance_(?P<space>template|native)", lambda g, _: Column(
        f"Chance, {g['space']} space", "The true effect's share of the brain"
        + (" on the study grid" if g["space"] == "template" else ", mean over the images' own grids")
        + ": the top 5 % of a random map lands there this often (enrichment 1)."), "chance_native"),
    Family(r"(?P<method>[a-z0-9_]+)_map_(?P<kind>pearson|spearman)", lambda g, _: Column(
        f"{g['method']}: test-retest map {g['kind'].capitalize()} r",
        f"{g['kind'].capitalize()} correlation of the two images' {g['method']} maps (template space, the folds' "
        "mean, signed values) inside the template brain mask: -1 to 1, higher is more reproducible; empty where "
        "either image has no map or a map is constant."), "occlusion_map_pearson"),
    Family(r"(?P<method>[a-z0-9_]+)_relative", lambda g, _: Column(
        f"{g['method']}: relative attribution", f"Mean |attribution| of {g['method']} in the region divided by its "
        "mean in the brain (above 1: the region matters more than average); empty for a region without voxels."),
        "occlusion_relative"),
    Family(r"(?P<method>[a-z0-9_]+)_rank", lambda g, _: Column(
        f"{g['method']}: rank", f"The region's rank by {g['method']}_relative (1: highest; regions without voxels "
        "last)."), "occlusion_rank"),
    Family(r"(?P<method>[a-z0-9_]+)_mass", lambda g, _: Column(
        f"{g['method']}: share of attribution", f"The region's share of {g['method']}'s total |attribution| in the "
        "brain (0 to 1; the shares of all regions sum to at most 1)."), "occlusion_mass"),
]


def lookup(name: str, meanings: Mapping[str, Column] | None = None) -> Column | None:
    """The entry of column ``name``: the writer's ``meanings``, ``COLUMNS``, then the first matching
    ``FAMILIES`` pattern; None when nothing describes it."""
    meanings = meanings or {}
    if name in meanings:
        return meanings[name]
    if name in COLUMNS:
        return COLUMNS[name]
    for family in FAMILIES:
        match = re.fullmatch(family.pattern, name)
        if match:
            found = family.make(match.groupdict(), lambda other: lookup(other, meanings))
            if found is not None:
                return found
    return None


def undocumented(names: Iterable[str], meanings: Mapping[str, Column] | None = None) -> list[str]:
    """The names among ``names`` without an entry."""
    return [str(n) for n in names if lookup(str(n), meanings) is None]


def dictionary(names: Iterable[str], meanings: Mapping[str, Column] | None = None, where: str = "") -> dict:
    """The BIDS data dictionary of a table with columns ``names`` ({name: {LongName, Description, …}}).
    A column without an entry gets ``UNDOCUMENTED`` and an ``Undocumented`` warning naming it and ``where``."""
    out, missing = {}, []
    for name in map(str, names):
        column = lookup(name, meanings)
        if column is None:
            missing.append(name)
            out[name] = {"LongName": name, "Description": UNDOCUMENTED}
        else:
            out[name] = column.entry()
    if missing:
        warnings.warn(Undocumented(f"{where or 'a table'}: column(s) {', '.join(missing)} have no entry in "
                                   "pipeline.common.columns; add one (COLUMNS or FAMILIES), or pass the writer's own "
                                   "(atomic.to_csv meanings=)."), stacklevel=3)
    return out


def sidecar_of(tsv: str | Path) -> Path:
    """The data dictionary's path beside ``tsv``: ``<stem>.json`` (``SIDECAR_EXCEPTIONS`` aside)."""
    tsv = Path(tsv)
    return tsv.with_name(SIDECAR_EXCEPTIONS.get(tsv.name, tsv.stem + ".json"))


def from_sidecar(entries: Mapping[str, Mapping]) -> dict[str, Column]:
    """A data dictionary (another TSV's sidecar, a dataset's participants.json) as ``Column`` entries,
    for a table that carries those columns on; entries without a description are skipped."""
    out = {}
    for name, entry in entries.items():
        if isinstance(entry, Mapping) and entry.get("Description") and entry["Description"] != UNDOCUMENTED:
            levels = entry.get("Levels")
            out[name] = Column(str(entry.get("LongName", name)), str(entry["Description"]), entry.get("Units"),
                               {str(k): str(v) for k, v in levels.items()} if isinstance(levels, Mapping) else None)
    return out
