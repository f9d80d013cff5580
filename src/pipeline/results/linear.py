"""The linear baseline: ridge regression or L2 logistic regression on the study's own cached arrays.

A deep model is only worth its cost where it beats a linear model fitted to the same inputs
(Wen et al. 2020, ClinicaDL's CNNs against a linear SVM). Every regression and classification
study therefore fits, per fold, on the same preprocessed arrays and the same splits:

* features: the brain-mask voxels of every channel, block-averaged by an integer ``factor``
  (1 keeps the study grid). The factor is the smallest one whose working memory (the feature
  matrix, the eigendecomposition and the projections) fits ``memory_mb``, so memory stays
  bounded at any cohort size: a larger cohort gets coarser features, never more memory;
* the fit: the training features are centred and decomposed exactly (eigendecomposition of the
  smaller of X Xᵀ and XᵀX), every image projected on the components. An L2 penalty is rotation
  invariant, so ridge (closed form, every penalty at once) and L2 logistic regression
  (scikit-learn, lbfgs) fitted on the projections are the models fitted on the voxels;
* the penalty: chosen on the fold's validation images only, by the deep model's own selection
  criterion (validation mean squared error, or cross-entropy); the test images play no part.

Writes ``predictions.tsv`` (validation and test images, the columns of ``pipeline.results.evaluate``),
``metrics.json`` (test metrics with bootstrap intervals over participants, the penalty, the
feature grid) and ``validation.tsv`` (the validation loss of every penalty). A fold whose
validation choice is impossible (too few images of a class) writes ``metrics.json`` with
``skipped`` naming the fold and the counts, and an empty ``predictions.tsv``: the study goes on
with the deep model's results.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config, add_fold, channel_names
from pipeline.intake.study import study_table
from pipeline.learning.coder import TargetCoder
from pipeline.learning.loader import open_array
from pipeline.common.errors import InputError
from pipeline.intake.classes import ordered
from pipeline.results.participants import participant_metrics

PENALTIES = np.logspace(-6, 2, 17)  # relative to the mean squared singular value of the training features
MIN_TRAIN_PER_CLASS, MIN_VAL_PER_CLASS = 2, 1
BLOCK = 256  # features (or images) per float64 block of a product: bounded temporaries
COLUMNS = ["participant_id", "session", "image_id", "split"]


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """(..., X, Y, Z) averaged over ``factor``³ blocks (the edge blocks over the voxels they hold)."""
    if factor == 1:
        return volume
    *lead, x, y, z = volume.shape
    padded = [(0, 0)] * len(lead) + [(0, -n % factor) for n in (x, y, z)]
    total = np.pad(volume.astype(np.float64), padded)
    count = np.pad(np.ones((x, y, z)), padded[len(lead):])
    shape = [*lead, *(s for n in total.shape[len(lead):] for s in (n // factor, factor))]
    axes = tuple(len(lead) + 2 * i + 1 for i in range(3))
    summed = total.reshape(shape).sum(axes)
    counts = count.reshape(shape[len(lead):]).sum((1, 3, 5))
    return summed / counts


def feature_mask(mask: np.ndarray, factor: int) -> np.ndarray:
    """The block-averaged brain mask: blocks at least half inside the brain."""
    return block_mean(mask.astype(np.float64), factor) >= 0.5


def working_bytes(n_images: int, n_train: int, n_features: int) -> int:
    """Peak memory of the fit: the float32 features and a centred copy of the training rows, and
    in float64 the eigendecomposition (twice its size while it runs), every image's projection and
    the blocks of the products."""
    rank = min(n_train, n_features)
    if n_train <= n_features:  # dual: column blocks of (block or training) rows, and a block of centred rows
        blocks = 16 * BLOCK * (n_train + BLOCK) + 4 * BLOCK * n_features
    else:  # primal: column blocks of the (features, block) transposed training rows and the axes
        blocks = 20 * BLOCK * n_features + 16 * BLOCK * rank
    return 4 * (n_images + n_train) * n_features + 16 * rank * rank + 8 * n_images * rank + blocks


def choose_factor(mask: np.ndarray, channels: int, n_images: int, n_train: int, memory_mb: float) -> int:
    """The smallest block size whose features fit ``memory_mb`` (working_bytes)."""
    for factor in range(1, max(mask.shape) + 1):
        features = channels * int(feature_mask(mask, factor).sum())
        if working_bytes(n_images, n_train, features) <= memory_mb * 2**20:
            return factor
    raise InputError(f"config `linear.memory_mb` ({memory_mb}) cannot hold even one feature per image for "
                     f"{n_images} images; raise it.")


def read_features(paths: list[str], mask: np.ndarray, factor: int) -> np.ndarray:
    """(images, features) float32: each array's block-averaged brain voxels, channel after channel."""
    keep = feature_mask(mask, factor)
    rows = []
    for path in paths:
        array = open_array(path)
        if array.shape[1:] != mask.shape:
            raise InputError(f"{path} has the grid {array.shape[1:]}, not the brain mask's {mask.shape}; "
                             "rerun preprocessing.")
        rows.append(block_mean(np.asarray(array, dtype=np.float32), factor)[:, keep].ravel().astype(np.float32))
    return np.stack(rows)


def gram(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ bᵀ in float64, accumulated over blocks of columns (float32 inputs are never copied whole)."""
    out = np.zeros((a.shape[0], b.shape[0]))
    for j in range(0, a.shape[1], BLOCK):
        out += a[:, j:j + BLOCK].astype(np.float64) @ b[:, j:j + BLOCK].astype(np.float64).T
    return out


@dataclass
class Components:
    """The centred training features' principal axes. ``project`` maps features onto them; the
    training images' projections are U·diag(s): orthogonal columns of norms ``singular``.

    With fewer training images than features (the usual case) the eigendecomposition is of the
    images' Gram matrix X Xᵀ and the axes stay implicit (Xᵀ U / s, through the centred training
    features); otherwise it is of XᵀX and the axes are explicit."""

    mean: np.ndarray  # float32 mean training features
    singular: np.ndarray
    axes: np.ndarray | None = None  # (features, rank): primal
    centred: np.ndarray | None = None  # (train, features) float32: dual
    weights: np.ndarray | None = None  # (train, rank) U / s: dual

    @classmethod
    def fit(cls, train: np.ndarray) -> "Components":
        """``train`` (float32 training features) is centred in place."""
        mean = train.mean(0, dtype=np.float64).astype(np.float32)
        train -= mean
        dual = train.shape[0] <= train.shape[1]
        values, vectors = np.linalg.eigh(gram(train, train) if dual else gram(train.T, train.T))
        keep = values > values.max() * 1e-10
        singular = np.sqrt(values[keep])[::-1]
        vectors = vectors[:, keep][:, ::-1]
        if dual:
            return cls(mean, singular, centred=train, weights=vectors / singular)
        return cls(mean, singular, axes=vectors)

    def project(self, features: np.ndarray) -> np.ndarray:
        """(images, rank) float64 projections of float32 ``features``, a block of images at a time."""
        out = []
        for i in range(0, len(features), BLOCK):
            centred = features[i:i + BLOCK] - self.mean
            if self.axes is not None:
                out.append(gram(centred, self.axes.T))
            else:
                out.append(gram(centred, self.centred) @ self.weights)
        return np.concatenate(out)


def ridge_path(train: np.ndarray, y: np.ndarray, others: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Ridge predictions for ``others`` (rows × alphas) from projections with orthogonal training
    columns: the coefficients are Zᵀ(y - ȳ) / (s² + α)."""
    squared = (train ** 2).sum(0)
    coefficients = (train.T @ (y - y.mean()))[:, None] / (squared[:, None] + alphas[None, :])
    return y.mean() + others @ coefficients


def fit_ridge(z_train, y_train, z_val, y_val, scale: float) -> tuple[int, np.ndarray, pd.DataFrame]:
    """(chosen index, coefficients path, validation table): the penalty with the lowest validation
    MSE (the strongest on ties)."""
    alphas = PENALTIES * scale
    losses = ((ridge_path(z_train, y_train, z_val, alphas) - y_val[:, None]) ** 2).mean(0)
    chosen = int(np.flatnonzero(losses <= losses.min() * (1 + 1e-9)).max())
    return chosen, alphas, pd.DataFrame({"penalty": PENALTIES, "alpha": alphas, "val_loss": losses})


def logistic_models(z_train, y_train, z_val, y_val, scale: float, n_classes: int):
    """(chosen model, validation table): L2 logistic regression (C = 1 / alpha) for every penalty,
    the one with the lowest validation cross-entropy (the strongest on ties)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    rows, models = [], []
    for penalty in PENALTIES:
        model = LogisticRegression(C=1.0 / (penalty * scale), max_iter=5000, tol=1e-6)
        with warnings.catch_warnings():  # separable data at weak penalties: lbfgs reaches max_iter
            warnings.simplefilter("ignore")
            model.fit(z_train, y_train)
        loss = log_loss(y_val, model.predict_proba(z_val), labels=list(range(n_classes)))
        rows.append({"penalty": penalty, "C": model.C, "val_loss": loss})
        models.append(model)
    table = pd.DataFrame(rows)
    chosen = int(np.flatnonzero(table["val_loss"] <= table["val_loss"].min() * (1 + 1e-9)).max())
    return models[chosen], chosen, table


def unusable(fold: str, task: str, coder: TargetCoder, train: pd.DataFrame, val: pd.DataFrame, target: str) -> str:
    """Why the validation choice is impossible in this fold ('' when it is possible)."""
    if task == "classification":
        counts = {split: rows[target].astype(str).value_counts().reindex(coder.classes, fill_value=0)
                  for split, rows in (("training", train), ("validation", val))}
        short = (counts["training"] < MIN_TRAIN_PER_CLASS).any() or (counts["validation"] < MIN_VAL_PER_CLASS).any()
        if short:
            listed = "; ".join(f"{split}: " + ", ".join(f"{c} {n}" for c, n in count.items())
                               for split, count in counts.items())
            return (f"{fold}: the linear baseline chooses its penalty on validation images and needs at least "
                    f"{MIN_TRAIN_PER_CLASS} training and {MIN_VAL_PER_CLASS} validation image(s) of every class "
                    f"({listed}). Give the split more participants (config `split.folds`, `split.val`).")
        return ""
    if len(train) < 3 or val[target].astype(float).nunique() < 2:
        return (f"{fold}: the linear baseline needs at least 3 training images and 2 different validation "
                f"targets (training {len(train)}, validation {len(val)} image(s) with "
                f"{val[target].astype(float).nunique()} value(s)).")
    return ""


def fit_fold(table: pd.DataFrame, fold: str, target: str, task: str, mask: np.ndarray,
             classes: list[str] | None = None, memory_mb: float = 2000) -> tuple[pd.DataFrame, dict, pd.DataFrame]:
    """(predictions of the validation and test images, fit record, validation table) of one fold."""
    train, val = (table[table["split"] == s] for s in ("train", "val"))
    coder = TargetCoder.fit(task, train[target], classes)
    reason = unusable(fold, task, coder, train, val, target)
    if reason:
        raise Skipped(reason)
    used = table[table["split"].isin(["train", "val", "test"])].reset_index(drop=True)
    channels = open_array(used["array"].iloc[0]).shape[0]
    factor = choose_factor(mask, channels, len(used), len(train), memory_mb)
    features = read_features(used["array"].tolist(), mask, factor)
    is_train = (used["split"] == "train").to_numpy()
    components = Components.fit(features[is_train])  # a copy: centred in place
    projected = components.project(features)
    del features
    scale = float(np.mean(components.singular ** 2))
    z_train, z_val = projected[is_train], projected[(used["split"] == "val").to_numpy()]
    out = used[COLUMNS].copy()
    out["true"] = used[target].to_numpy()
    record = {"fold": fold, "task": task, "target": target, "downsample": factor,
              "features": int(channels * feature_mask(mask, factor).sum()), "rank": int(len(components.singular)),
              "memory_mb": memory_mb, "images": {s: int((used["split"] == s).sum()) for s in ("train", "val", "test")}}
    if task == "classification":
        y_train, y_val = coder.encode(train[target]).numpy(), coder.encode(val[target]).numpy()
        model, chosen, validation = logistic_models(z_train, y_train, z_val, y_val, scale, len(coder.classes))
        probabilities = np.zeros((len(used), len(coder.classes)))
        probabilities[:, model.classes_] = model.predict_proba(projected)
        out["true"] = out["true"].astype(str)
        out["predicted"] = np.asarray(coder.classes)[probabilities.argmax(1)]
        for k, name in enumerate(coder.classes):
            out[f"p_{name}"] = probabilities[:, k]
        record.update(model="logistic", C=float(model.C))
    else:
        y_train, y_val = train[target].astype(float).to_numpy(), val[target].astype(float).to_numpy()
        chosen, alphas, validation = fit_ridge(z_train, y_train, z_val, y_val, scale)
        out["true"] = out["true"].astype(float)
        out["predicted"] = ridge_path(z_train, y_train, projected, alphas[chosen:chosen + 1])[:, 0]
        record.update(model="ridge", alpha=float(alphas[chosen]), train_mean=float(y_train.mean()))
    record.update(penalty=float(PENALTIES[chosen]), classes=coder.classes)
    return out[out["split"] != "train"].reset_index(drop=True), record, validation


class Skipped(InputError):
    """The baseline cannot be fitted in this fold; the study goes on without it."""


def run(table: pd.DataFrame, fold: str, target: str, task: str, mask: np.ndarray, out_dir: Path,
        classes: list[str] | None = None, memory_mb: float = 2000, positive_class: str | None = None) -> dict:
    """Fit one fold and write its files; a fold that cannot be fitted records why (``skipped``).
    Test metrics as the deep model's (``pipeline.results.participants.participant_metrics``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        predictions, record, validation = fit_fold(table, fold, target, task, mask, classes, memory_mb)
    except Skipped as exc:
        print(f"warning: {exc}", file=sys.stderr)
        metrics = {"task": task, "target": target, "classes": classes, "skipped": str(exc)}
        atomic.to_csv(pd.DataFrame(columns=COLUMNS + ["true", "predicted"]), out_dir / "predictions.tsv",
                      sep="\t", index=False)
        atomic.to_csv(pd.DataFrame(columns=["penalty", "val_loss"]), out_dir / "validation.tsv", sep="\t", index=False)
        atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
        return metrics
    test = predictions[predictions["split"] == "test"].reset_index(drop=True)
    metrics = {**record, **participant_metrics(test, ordered(record["classes"], positive_class), record.get("train_mean"))}
    atomic.to_csv(predictions, out_dir / "predictions.tsv", sep="\t", index=False)
    atomic.to_csv(validation, out_dir / "validation.tsv", sep="\t", index=False)
    atomic.write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
    return metrics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold(parser)
    add_config(parser)  # target, task, channels, linear
    parser.add_argument("--mask", type=Path, required=True, help="the study grid's brain mask (NIfTI)")
    parser.add_argument("--targets", type=Path, help="ingestion's targets.json (the recorded class list)")
    parser.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = args.config
    with InputError.exit_cleanly():
        table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, channel_names(cfg))
        classes = json.loads(args.targets.read_text()).get("classes") if args.targets else None
        mask = np.asarray(nib.load(args.mask).dataobj) > 0
        metrics = run(table, args.fold, cfg["target"], cfg["task"], mask, args.out_dir, classes,
                      cfg["linear"]["memory_mb"], cfg["positive_class"])
    print(json.dumps(metrics, indent=2, default=float), file=sys.stderr)


if __name__ == "__main__":
    main()
