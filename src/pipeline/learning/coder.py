"""The target coder: target values to network outputs and back (z-scores or class indices)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.common.errors import InputError


class TargetCoder:
    """Maps target values to training labels and back: z-scores (regression) or class indices.
    Segmentation: ``classes`` are the label names (index = label value), one network output each.
    ``bins`` (regression by soft-label bins, as SFCN: an imported package, or a study fine-tuned
    from one with its head kept): the bin centres in target units, one output each; the prediction
    is the expected value over the bins, trained (``scalar``) as a z-score like a one-output head."""

    def __init__(self, task: str, classes: list[str] | None = None, mean: float = 0.0, std: float = 1.0,
                 bins: list[float] | None = None):
        self.task, self.classes, self.mean, self.std, self.bins = task, classes, mean, std, bins

    @classmethod
    def fit(cls, task: str, train_values: pd.Series, classes: list[str] | None = None,
            bins: list[float] | None = None) -> "TargetCoder":
        """Regression: mean/sd of the training values only (``bins``: the centres of a kept soft-label
        bins head). Classification: the recorded class list (``classes``, from ingestion's
        targets.json), else the sorted training classes."""
        if task == "classification":
            known = sorted(train_values.astype(str).unique()) if classes is None else list(classes)
            unknown = sorted(set(train_values.astype(str)) - set(known))
            if unknown:
                raise InputError(f"Target values {unknown} are not in the recorded class list {known}; rerun ingestion.")
            return cls(task, classes=known)
        values = train_values.astype(float)
        return cls(task, mean=float(values.mean()), std=float(values.std()) or 1.0, bins=bins)

    @property
    def outputs(self) -> int:
        if self.bins:
            return len(self.bins)
        return len(self.classes) if self.task in ("classification", "segmentation") else 1

    def encode(self, values) -> torch.Tensor:
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return torch.tensor([index[str(v)] for v in values], dtype=torch.long)
        return torch.tensor((np.asarray(values, dtype=np.float32) - self.mean) / self.std, dtype=torch.float32)

    def expected_value(self, outputs: torch.Tensor) -> torch.Tensor:
        """(B, bins) logits (or log-probabilities) → (B,) the expected bin centre, in target units."""
        centres = torch.tensor(self.bins, dtype=outputs.dtype, device=outputs.device)
        return (torch.softmax(outputs, dim=1) * centres).sum(1)

    def scalar(self, outputs: torch.Tensor) -> torch.Tensor:
        """A regression network's (B, outputs) → its (B,) prediction as a z-score (``encode``'s
        units): the one output, or the expected value over the bins, standardised (differentiable)."""
        if self.bins:
            return (self.expected_value(outputs) - self.mean) / self.std
        return outputs.squeeze(1)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        """Network outputs (B, outputs) → predictions in target units, or class probabilities (B, K)."""
        if self.task == "classification":
            return torch.softmax(outputs.float(), dim=1).numpy()
        if self.bins:
            return self.expected_value(outputs.float()).numpy()
        return outputs.float().squeeze(1).numpy() * self.std + self.mean

    def state(self) -> dict:
        state = {"task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std}
        return {**state, "bins": self.bins} if self.bins else state
