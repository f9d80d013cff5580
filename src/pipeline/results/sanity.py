"""Sanity checks of explanation maps (Adebayo et al. 2018) and their consistency between folds.

Model-parameter randomisation: a map that explains the model must change when the model's learned
weights are replaced by random ones. The network's parameterised blocks are re-initialised
cascading from the output (``cascade``: the last block, then down to the middle, then every block,
the full randomisation), each image's maps are computed again with the same settings, and three
similarities between the trained and the randomised model's maps inside the brain are recorded
per method and step: the Spearman rank correlation of |map| (``spearman``), of the signed maps
(``spearman_signed``), and the share of the trained map's top 5 % of |map| that stays in the
randomised map's top 5 % (``top5_overlap``; chance 0.05).

The verdict is decided by the top-5 % overlap after full randomisation (passes below
``PASS_BELOW``): the strongest voxels are what a reader looks at (and what the ground-truth
enrichment scores). Adebayo et al. showed that the rank correlation of |map| stays high for
methods that multiply by the input (integrated gradients, gradient × input, SmoothGrad's
averaging of them): every voxel's rank, the many weak ones included, carries the image's
structure whatever the weights, so ``spearman`` reads as "fails" for maps whose strongest regions
do move with the model. Both correlations stay in the table. Occlusion is checked with
non-overlapping windows (stride = window) on both sides, its cost divided by (window / stride)³;
the randomisation of labels would need a retrained model per fold and is not run.

Consistency: each method's fold group maps (mean |attribution| over the test participants) are
compared between every pair of folds (Pearson correlation inside the brain: the pattern of the
strong regions, which ranks of the many near-zero voxels would drown); a mean below
``PASS_BELOW`` flags a method whose maps depend more on the training data drawn than on the effect.

``reading`` turns a method's verdicts (and its ground-truth enrichment, on a simulated cohort)
into the sentence a reader acts on.
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

SIMILARITIES = ["spearman", "spearman_signed", "top5_overlap"]
COLUMNS = ["image_id", "method", "blocks_randomised", "of_blocks", "from_block", *SIMILARITIES]
PASS_BELOW = 0.5  # top-5 % overlap after full randomisation (sanity) / correlation between folds (consistency)
TOP = 0.05
ENRICHED = 2.0  # a group map's top 5 % at least this many times chance in the true effect: it lands on it


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


def signed_rank_correlation(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Spearman correlation of ``a`` and ``b`` themselves inside ``brain`` (NaN where either is constant)."""
    x, y = a[brain], b[brain]
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y)[0])


def top_overlap(a: np.ndarray, b: np.ndarray, brain: np.ndarray, top: float = TOP) -> float:
    """The share of ``a``'s top ``top`` fraction of |values| in ``brain`` that is in ``b``'s too (NaN
    where either map is constant: no top to speak of)."""
    x, y = np.abs(a[brain]), np.abs(b[brain])
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    k = max(1, int(round(top * x.size)))
    strongest_a, strongest_b = np.argsort(-x, kind="stable")[:k], np.argsort(-y, kind="stable")[:k]
    return float(np.isin(strongest_a, strongest_b).mean())


def similarities(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """Every similarity of ``SIMILARITIES`` between two maps."""
    return {"spearman": rank_correlation(a, b, brain), "spearman_signed": signed_rank_correlation(a, b, brain),
            "top5_overlap": top_overlap(a, b, brain)}


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
    """One row per method and cascade step: the ``similarities`` between the trained model's map of
    ``x`` and the map of the model with its last blocks randomised."""
    settings = sanity_settings(settings)
    trained, _ = attribute(model, x, target, methods, settings, ig_baseline, classification)
    names = list(blocks(views_of(model)[0]))
    rows = []
    for top in cascade(len(names)):
        maps, _ = attribute(randomised(model, top, seed), x, target, methods, settings, ig_baseline, classification)
        for method in methods:
            rows.append({"image_id": image_id, "method": method, "blocks_randomised": top, "of_blocks": len(names),
                         "from_block": names[-top], **similarities(trained[method], maps[method], brain)})
    return rows


def summary(randomisation: pd.DataFrame, fold_means: dict[str, list[np.ndarray]], brain: np.ndarray) -> pd.DataFrame:
    """Per method: each similarity's mean after randomising the top block and the whole model, the
    folds' agreement, and a verdict for each."""
    rows = []
    for method in fold_means:
        own = randomisation[randomisation["method"] == method]
        step = {"top_block": own[own["blocks_randomised"] == 1], "model": own[own["blocks_randomised"] == own["of_blocks"]]}
        means = {f"random_{where}_{name}": pd.to_numeric(rows_of.get(name, pd.Series(dtype=float)), errors="coerce").mean()
                 for where, rows_of in step.items() for name in SIMILARITIES}
        decisive = pd.to_numeric(step["model"].get("top5_overlap", pd.Series(dtype=float)), errors="coerce")
        pairs = [correlation(a, b, brain) for a, b in itertools.combinations(fold_means[method], 2)]
        consistency = float(np.nanmean(pairs)) if pairs and not np.all(np.isnan(pairs)) else float("nan")
        rows.append({"method": method, **means, "random_model_undefined": int(decisive.isna().sum()),
                     "random_verdict": sanity_verdict(decisive.mean()), "fold_consistency_r": consistency,
                     "consistency_verdict": consistency_verdict(consistency, len(fold_means[method]))})
    return pd.DataFrame(rows)


def study_tables(fold_dirs: list[Path], methods: list[str], brain: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(each method's mean rank correlation per cascade step over the folds' checked images, the
    per-method ``summary``) from the folds' ``randomisation.tsv`` and group mean maps. Undefined
    correlations (``n/a``: a constant map) are skipped and counted (``undefined``); a step with
    none defined has no mean, and its verdict says "not checked"."""
    randomisation = pd.concat([read_tsv(d / "randomisation.tsv").assign(fold=d.name) for d in fold_dirs],
                              ignore_index=True)
    keys = ["method", "blocks_randomised", "of_blocks", "from_block"]
    grouped = randomisation.groupby(keys, sort=False)
    steps = grouped["top5_overlap"].agg(["count", "size"]).reset_index().rename(columns={"count": "images"})
    steps["undefined"] = steps.pop("size") - steps["images"]  # a constant map has no top 5 % nor ranks
    for name in SIMILARITIES:
        spread = grouped[name].agg(["mean", "min", "max"]).reset_index(drop=True)
        steps[[name, f"{name}_min", f"{name}_max"]] = spread.to_numpy()
    fold_means = {m: [np.asarray(nib.load(group_map(str(d), m, "mean")).dataobj) for d in fold_dirs] for m in methods}
    return steps, summary(randomisation, fold_means, brain)


def sanity_verdict(overlap: float) -> str:
    """The verdict on the top-5 % overlap after full randomisation."""
    if not np.isfinite(overlap):
        return "not checked"
    if overlap < PASS_BELOW:
        return "passes: its strongest voxels move when the model's weights are randomised"
    return "fails: its strongest voxels stay with random weights (they show the image more than the model)"


def consistency_verdict(mean: float, folds: int) -> str:
    if folds < 2:
        return "one fold: not checked"
    if not np.isfinite(mean):
        return "not checked"
    return ("consistent between folds" if mean >= PASS_BELOW else
            "flagged: the folds' maps disagree (they depend on the training participants drawn)")


def reading(random_verdict: str, consistency: str, enrichment: float | None = None) -> str:
    """What a reader can and cannot conclude from a method's maps, in one sentence: its
    randomisation verdict, its folds' agreement and (on a simulated cohort) whether its group map's
    top 5 % lands on the true effect (``enrichment`` ≥ ``ENRICHED`` times chance)."""
    checked, passes = random_verdict != "not checked", random_verdict.startswith("passes")
    if enrichment is None or not np.isfinite(enrichment):
        sentence = ("randomisation not checked (explain.sanity_images: 0, or constant maps): nothing says its "
                    "location reflects the model" if not checked else
                    "passes randomisation: its location reflects the model (no ground truth here to confirm it)"
                    if passes else "fails randomisation: it follows the image's structure as much as the model; "
                    "do not read locations from it alone")
    elif enrichment >= ENRICHED:
        sentence = ("passes ground truth and randomisation: trust its location" if passes else
                    "lands on the true effect but fails randomisation: its location partly follows the image; "
                    "confirm it with a method that passes" if checked else
                    "lands on the true effect; randomisation not checked")
    else:
        sentence = ("passes randomisation but misses the true effect: it reflects the model, not where the effect is"
                    if passes else "misses the true effect" + (" and fails randomisation: do not use it" if checked
                                                               else "; randomisation not checked"))
    if consistency.startswith("flagged"):
        sentence += "; its folds disagree, so the location depends on the training participants drawn"
    return sentence[0].upper() + sentence[1:] + "."
