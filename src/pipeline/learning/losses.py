"""Losses and per-epoch metrics of training: MSE or cross-entropy, DiceCE and Dice for segmentation."""

from __future__ import annotations

import torch

from pipeline.learning.coder import TargetCoder


SEGMENTATION = "segmentation"


def loss_fn(task: str, class_weights: torch.Tensor | None = None):
    """The task's loss; ``class_weights`` (K,) weight a classification cross-entropy per true class
    (its mean is then the weighted mean, so balanced weights give every class the same say)."""
    if task == SEGMENTATION:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    if task == "classification":
        return torch.nn.CrossEntropyLoss(weight=class_weights)
    return torch.nn.MSELoss()


def balanced_weights(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) class weights n / (K_present · n_c) of the class indices ``labels`` (scikit-learn's
    "balanced"): each class present contributes equally to a weighted mean loss, whatever its
    share. A class absent from ``labels`` gets weight 1 (it adds nothing to this loss)."""
    counts = torch.bincount(labels.long().cpu(), minlength=k).double()
    present = counts > 0
    weights = torch.ones(k, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def balanced_accuracy(correct: torch.Tensor, counts: torch.Tensor) -> float:
    """Mean recall over the classes present: ``correct`` and ``counts`` are (K,) per-class sums."""
    present = counts > 0
    return float((correct[present] / counts[present]).mean()) if present.any() else float("nan")


def class_sums(outputs: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(2K,) per-class correct predictions, then per-class counts, of (B, K) logits and (B,) labels."""
    labels = labels.long().cpu()
    hit = outputs.detach().argmax(1).cpu() == labels
    return torch.cat([torch.bincount(labels[hit], minlength=k), torch.bincount(labels, minlength=k)]).double()


def task_loss(criterion, coder: TargetCoder, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if coder.task == SEGMENTATION:  # (B, K, *spatial) logits, (B, 1, *spatial) labels
        return criterion(outputs.float(), targets.long())
    return criterion(outputs.float() if coder.task == "classification" else coder.scalar(outputs.float()), targets)


def label_dice(predicted: torch.Tensor, true: torch.Tensor, k: int) -> torch.Tensor:
    """(B, K - 1) Dice of labels 1..K-1 between two (B, 1, *spatial) integer label maps (MONAI's
    compute_dice); NaN where a label is absent from both. Training's and evaluation's Dice."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    predicted, true = one_hot(predicted.long(), k), one_hot(true.long(), k)
    dice = compute_dice(predicted, true, include_background=False, ignore_empty=False)
    absent = ~(predicted.flatten(2).any(2) | true.flatten(2).any(2))[:, 1:]
    return dice.masked_fill(absent, float("nan"))


def dice_per_label(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K - 1) ``label_dice`` of the argmax of (B, K, *spatial) logits and (B, 1, *spatial) labels."""
    return label_dice(outputs.argmax(1, keepdim=True), labels, outputs.shape[1])


def mean_dice(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean over labels 1..K-1 of ``dice_per_label`` (labels absent from both left out; 1 if all are,
    e.g. a slice outside the brain)."""
    dice = dice_per_label(outputs, labels)
    return torch.nan_to_num(dice.nanmean(1), nan=1.0)


def metric(coder: TargetCoder, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """MAE in target units (regression), accuracy (classification) or mean Dice (segmentation)."""
    if coder.task == SEGMENTATION:
        return float(mean_dice(outputs, labels).mean())
    if coder.task == "classification":
        return float((outputs.argmax(1) == labels).float().mean())
    return float(((coder.scalar(outputs) - labels).abs() * coder.std).mean())


def metric_sum(coder: TargetCoder, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over views of the metric (absolute errors in target units, or correct predictions)."""
    return metric(coder, outputs.detach().float(), labels) * len(labels)
