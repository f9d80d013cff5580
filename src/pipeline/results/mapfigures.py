"""Figures of explanation maps: the group maps over the template, the best and worst predicted subjects."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.common.paths import derivative_paths, group_figure, group_map


def plot_group(out_dir: Path, template: Path, methods: list[str], n_folds: int, images: str = "test set") -> None:
    """Glass-brain and orthogonal-slice PNGs of each method's group mean map over the study template."""
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    for method in methods:
        img = group_map(str(out_dir), method)
        vmax = float(np.quantile(nib.load(img).get_fdata(), 0.999)) or 1.0
        title = f"mean |{method}|, {images}, {n_folds} fold(s)"
        display = plotting.plot_stat_map(img, bg_img=str(template), title=title, threshold=vmax * 0.3,
                                         vmax=vmax, cmap="inferno", cut_coords=(0, -17, 15), draw_cross=False)
        atomic.savefig(display, group_figure(str(out_dir), method, "slices"), dpi=90)
        display.close()
        display = plotting.plot_glass_brain(img, title=title, threshold=vmax * 0.3, vmax=vmax, cmap="inferno")
        atomic.savefig(display, group_figure(str(out_dir), method, "glass"), dpi=90)
        display.close()


def prediction_error(predictions: pd.DataFrame) -> np.ndarray:
    """Per row: |predicted - true| (regression), or 1 - p(true class) (classification: p_<class> columns)."""
    if any(c.startswith("p_") for c in predictions.columns):
        return 1 - np.array([float(row[f"p_{row['true']}"]) for _, row in predictions.iterrows()])
    return (predictions["predicted"].astype(float) - predictions["true"].astype(float)).abs().to_numpy()


def plot_extremes(predictions: pd.DataFrame, maps: Mapping[str, nib.Nifti1Image], preproc_dir: Path,
                  channels: list[str], method: str, png: Path, n: int = 3) -> None:
    """The ``n`` best and ``n`` worst predicted test images (``predictions`` with their ``subdir``):
    each one's fold-mean ``method`` map (``maps``, by image id) over its preprocessed reference image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    error = prediction_error(predictions)
    order = np.argsort(error, kind="stable")
    chosen = [(i, "best") for i in order[:n]] + [(i, "worst") for i in order[::-1][:n]]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 2.6 * len(chosen)))
    for ax, (i, kind) in zip(np.atleast_1d(axes), chosen):
        row = predictions.iloc[i]
        background = derivative_paths(preproc_dir, row["subdir"], row["image_id"], channels)[f"image_{channels[0]}"]
        img = maps[row["image_id"]]
        vmax = float(np.quantile(np.abs(img.get_fdata()), 0.999)) or 1.0
        title = f"{kind}: {row['image_id']}  true {row['true']}  predicted {row['predicted']}  error {error[i]:.2f}"
        plotting.plot_stat_map(img, bg_img=str(background), axes=ax, title=title, threshold=0.3 * vmax, vmax=vmax,
                               cmap="cold_hot", draw_cross=False, display_mode="ortho", cut_coords=(0, -17, 15),
                               annotate=False)
    atomic.savefig(fig, png, dpi=80)
    plt.close(fig)
