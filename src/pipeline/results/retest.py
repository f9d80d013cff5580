"""Test-retest of the model: for every participant with two or more images predicted (two scans
of one session, or of sessions close in time), how far apart the model's predictions of the two
images are and how alike their explanation maps are (``retest_predictions.tsv``). The
preprocessed images' own agreement is ``retest.tsv`` (``pipeline.intake.qc.retest``); the pairs are
the same (``pipeline.intake.qc.pairs``).

In a study only the test images have predictions and maps (the explain stage's group step writes
the table); in apply mode every image has both (``python -m pipeline.sharing.predict retest``).

Per pair (``COLUMNS``): the two predictions (the ensemble's ``predicted``), ``prediction_difference``
(|a - b| in the target's units; classification: the largest difference of a class's probability),
and per explanation method the Pearson (``<method>_map_pearson``) and Spearman
(``<method>_map_spearman``) correlation of the two images' maps in template space (each averaged
over the folds) inside the template brain mask, signed values as written (a method's sign, where
it has one, counts).
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.common.tables import read_tsv
from pipeline.intake.qc import pairs

COLUMNS = ["participant_id", "image_a", "image_b", "predicted_a", "predicted_b", "prediction_difference"]
FILE = "retest_predictions.tsv"


def difference(a: pd.Series, b: pd.Series, classes: list[str]) -> float:
    """|a - b| of two predictions (rows of a predictions table): of ``predicted`` for regression,
    the largest over ``classes`` of |p_<class> a - p_<class> b| for classification."""
    if classes:
        return max(abs(float(a[f"p_{c}"]) - float(b[f"p_{c}"])) for c in classes)
    return abs(float(a["predicted"]) - float(b["predicted"]))


def retest_table(predictions: pd.DataFrame, maps: Mapping[str, Mapping[str, nib.Nifti1Image]],
                 brain: np.ndarray) -> pd.DataFrame:
    """One row per pair of images of one participant in ``predictions`` (the ensemble's table:
    participant_id, image_id, predicted [, p_<class>]): ``COLUMNS``, then per method of ``maps``
    (method -> image id -> template-space map, e.g. ``pipeline.results.maps.FoldMeanMaps``) the two
    maps' Pearson and Spearman r inside ``brain`` (X, Y, Z; empty where either image has no map or
    a map is constant). Empty (with its columns) when no participant has two images."""
    from pipeline.results.sanity import correlation, signed_rank_correlation  # torch: not for the report

    classes = sorted(c.removeprefix("p_") for c in predictions.columns if c.startswith("p_"))
    by_id = predictions.drop_duplicates("image_id").set_index("image_id")
    inside = np.asarray(brain) > 0
    columns = COLUMNS + [f"{m}_map_{s}" for m in maps for s in ("pearson", "spearman")]
    rows = []
    for participant, a, b in pairs(predictions):
        row = {"participant_id": participant, "image_a": a, "image_b": b, "predicted_a": by_id.at[a, "predicted"],
               "predicted_b": by_id.at[b, "predicted"],
               "prediction_difference": round(difference(by_id.loc[a], by_id.loc[b], classes), 4)}
        for method, images in maps.items():
            if a in images and b in images:
                x, y = (np.asarray(images[i].dataobj, dtype=np.float64) for i in (a, b))
                row[f"{method}_map_pearson"] = round(correlation(x, y, inside), 4)
                row[f"{method}_map_spearman"] = round(signed_rank_correlation(x, y, inside), 4)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def paragraph(path: Path, task: str, target: str) -> list[str]:
    """One sentence on the model's test-retest from ``retest_predictions.tsv`` (``retest_table``) of
    a study of ``task`` and ``target``: how many pairs, how far apart their predictions are and how
    alike their maps; nothing when the file is absent (a segmentation study, or one from before it)."""
    if not Path(path).exists() or Path(path).stat().st_size == 0:
        return []
    table = read_tsv(path)
    if table.empty:
        return ["<p>Test–retest of the model: no participant has two images with a prediction "
                "(<code>retest_predictions.tsv</code>).</p>"]
    gap = pd.to_numeric(table["prediction_difference"], errors="coerce")
    what = ("the largest difference of a class's probability" if task == "classification"
            else f"|difference| in units of <code>{html.escape(target)}</code>")
    maps = []
    for column in [c for c in table.columns if c.endswith("_map_pearson")]:
        method = column.removesuffix("_map_pearson")
        r = pd.to_numeric(table[column], errors="coerce")
        rho = pd.to_numeric(table[f"{method}_map_spearman"], errors="coerce")
        if r.notna().any():
            maps.append(f"{html.escape(method)} Pearson r median {r.median():.3f} ({r.min():.3f}–{r.max():.3f}), "
                        f"Spearman {rho.median():.3f}")
    return [f"<p>Test–retest of the model: {len(table)} pair(s) of images of one participant "
            f"({table['participant_id'].nunique()} participant(s)); their predictions' {what}: median "
            f"{gap.median():.3g}, largest {gap.max():.3g}"
            + (f"; their explanation maps, inside the template brain: {'; '.join(maps)}" if maps else "")
            + " (<code>retest_predictions.tsv</code>).</p>"]
