"""Sanity checks of explanation maps (Adebayo et al. 2018) and their consistency between folds.

Model-parameter randomisation: a map that explains the model must change when the model's learned
weights are replaced by random ones. The network's parameterised blocks are re-initialised
cascading from the output (``cascade``: the last block, then down to the middle, then every block,
the full randomisation), each image's maps are computed again with the same settings, and the
Spearman rank correlation of |map| inside the brain between the trained and the randomised model
is recorded per method and step. A method whose maps stay correlated (≥ ``PASS_BELOW``) after
full randomisation shows the image more than the model: its verdict says so. Occlusion is
checked with non-overlapping windows (stride = window) on both sides, its cost divided by
(window / stride)³; the randomisation of labels would need a retrained model per fold and is
not run.

Consistency: each method's fold group maps (mean |attribution| over the test participants) are
compared between every pair of folds (Pearson correlation inside the brain: the pattern of the
strong regions, which ranks of the many near-zero voxels would drown); a mean below
``PASS_BELOW`` flags a method whose maps depend more on the training data drawn than on the effect.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from pipeline.common.paths import group_map
from pipeline.common.tables import read_tsv
from pipeline.learning.device import model_device
from pipeline.learning.sampler import views_of
from pipeline.results.attribution import Settings, attribute

COLUMNS = ["image_id", "method", "blocks_randomised", "of_blocks", "from_block", "spearman"]
PASS_BELOW = 0.5  # rank correlation after full randomisation (sanity) / between folds (consistency)


def blocks(network: torch.nn.Module) -> dict[str, list[torch.nn.Module]]:
    """The network's parameterised modules grouped into blocks by the first two parts of their
    names (``features.2.0`` and ``features.2.1`` → ``features.2``), input to output."""
    grouped: dict[str, list[torch.nn.Module]] = {}
    for name, module in network.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
            grouped.setdefault(".".join(name.split(".")[:2]), []).append(module)
    return grouped


def cascade(n_blocks: int) -> list[int]:
    """How many blocks (from the output) each step randomises: the top block, half of them, all."""
    return sorted({1, (n_blocks + 1) // 2, n_blocks})


def randomised(model: torch.nn.Module, top: int, seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose last ``top`` blocks are re-initialised (torch's default
    initialisation, seeded; normalisation layers back to identity with fresh running statistics),
    on ``model``'s device. The new weights are drawn on the CPU: the same on every device."""
    device = model_device(model)
    copied = copy.deepcopy(model).cpu()
    network, _, _ = views_of(copied)
    torch.manual_seed(seed)
    for block in list(blocks(network).values())[-top:]:
        for module in block:
            module.reset_parameters()
    return copied.to(device).eval()


def rank_correlation(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Spearman correlation of |a| and |b| inside ``brain`` (NaN where either is constant)."""
    x, y = np.abs(a[brain]), np.abs(b[brain])
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y)[0])


def correlation(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Pearson correlation of ``a`` and ``b`` inside ``brain`` (NaN where either is constant)."""
    x, y = a[brain].astype(np.float64), b[brain].astype(np.float64)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def sanity_settings(settings: Settings) -> Settings:
    """The settings both sides of the check use: occlusion's windows without overlap."""
    return replace(settings, stride=settings.window)


def randomisation_rows(model, x: torch.Tensor, target: int, methods: list[str], settings: Settings,
                       ig_baseline, classification: bool, brain: np.ndarray, image_id: str,
                       seed: int = 0) -> list[dict]:
    """One row per method and cascade step: the rank correlation between the trained model's map
    of ``x`` and the map of the model with its last blocks randomised."""
    settings = sanity_settings(settings)
    trained, _ = attribute(model, x, target, methods, settings, ig_baseline, classification)
    names = list(blocks(views_of(model)[0]))
    rows = []
    for top in cascade(len(names)):
        maps, _ = attribute(randomised(model, top, seed), x, target, methods, settings, ig_baseline, classification)
        for method in methods:
            rows.append({"image_id": image_id, "method": method, "blocks_randomised": top, "of_blocks": len(names),
                         "from_block": names[-top], "spearman": rank_correlation(trained[method], maps[method], brain)})
    return rows


def summary(randomisation: pd.DataFrame, fold_means: dict[str, list[np.ndarray]], brain: np.ndarray) -> pd.DataFrame:
    """Per method: the mean rank correlation after randomising the top block and the whole model,
    the folds' agreement, and a verdict for each."""
    rows = []
    for method in fold_means:
        own = randomisation[randomisation["method"] == method]
        values = pd.to_numeric(own.loc[own["blocks_randomised"] == own["of_blocks"], "spearman"], errors="coerce")
        full = values.mean()
        top = pd.to_numeric(own.loc[own["blocks_randomised"] == 1, "spearman"], errors="coerce").mean()
        pairs = [correlation(a, b, brain) for a, b in itertools.combinations(fold_means[method], 2)]
        consistency = float(np.nanmean(pairs)) if pairs and not np.all(np.isnan(pairs)) else float("nan")
        rows.append({"method": method, "random_top_block_spearman": top, "random_model_spearman": full,
                     "random_model_undefined": int(values.isna().sum()),
                     "random_verdict": sanity_verdict(full), "fold_consistency_r": consistency,
                     "consistency_verdict": consistency_verdict(consistency, len(fold_means[method]))})
    return pd.DataFrame(rows)


def study_tables(fold_dirs: list[Path], methods: list[str], brain: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each method's mean rank correlation per cascade step over the folds' checked images, the
    per-method ``summary``) from the folds' ``randomisation.tsv`` and group mean maps. Undefined
    correlations (``n/a``: a constant map) are skipped and counted (``undefined``); a step with
    none defined has no mean, and its verdict says "not checked"."""
    randomisation = pd.concat([read_tsv(d / "randomisation.tsv").assign(fold=d.name) for d in fold_dirs],
                              ignore_index=True)
    steps = (randomisation.groupby(["method", "blocks_randomised", "of_blocks", "from_block"], sort=False)["spearman"]
             .agg(["mean", "min", "max", "count", "size"]).reset_index()
             .rename(columns={"mean": "spearman", "min": "spearman_min", "max": "spearman_max", "count": "images"}))
    steps["undefined"] = steps.pop("size") - steps["images"]  # a constant map has no rank correlation
    fold_means = {m: [np.asarray(nib.load(group_map(str(d), m, "mean")).dataobj) for d in fold_dirs] for m in methods}
    return steps, summary(randomisation, fold_means, brain)


def sanity_verdict(full: float) -> str:
    if not np.isfinite(full):
        return "not checked"
    if abs(full) < PASS_BELOW:
        return "passes: the map changes when the model's weights are randomised"
    return "fails: the map barely changes with random weights (it shows the image more than the model)"


def consistency_verdict(mean: float, folds: int) -> str:
    if folds < 2:
        return "one fold: not checked"
    if not np.isfinite(mean):
        return "not checked"
    return ("consistent between folds" if mean >= PASS_BELOW else
            "flagged: the folds' maps disagree (they depend on the training participants drawn)")
