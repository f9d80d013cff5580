"""Registration quality control: every preprocessed image's scores against the template, the
threshold that excludes a failed registration (config ``preprocess.qc_min``) and the study's QC
table ``qc.tsv``, ranked worst first.

Scores, inside the template brain mask on the study grid (the sidecar's ``QC``):

* ``correlation_with_template``: Pearson r of the preprocessed image and the template. The demo
  and focal-lesion cohorts score 0.92-0.97, every test cohort 0.64 or more; a whole head squeezed
  into the brain outline 0.12-0.48, noise about 0 (docs/benchmarks.md, *Registration quality
  control*). ``preprocess.qc_min`` applies to this score.
* ``mutual_information_with_template``: normalised mutual information 2 I(A; B) / (H(A) + H(B))
  of a 32 × 32 joint histogram, 0 (independent) to 1 (one determines the other); it does not
  assume a linear intensity relation, so it also speaks for contrasts unlike the template's.
* ``brain_mask_dice_with_template``: Dice of the image's own brain mask carried to the grid and
  the template mask; only with a native mask (``brain_extraction`` not ``none``, where the
  image's mask is the template's and the Dice would be 1 by construction).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config, channel_names
from pipeline.common.paths import derivative_paths
from pipeline.common.tables import read_tsv
from pipeline.intake.brainmask import dice

SCORES = ("correlation_with_template", "mutual_information_with_template", "brain_mask_dice_with_template")
GATED = "correlation_with_template"  # the score config preprocess.qc_min applies to
BINS = 32
COLUMNS = ["image_id", "participant_id", "file", *SCORES, "excluded", "qc_png"]


def normalised_mutual_information(a: np.ndarray, b: np.ndarray, bins: int = BINS) -> float:
    """2 I(a; b) / (H(a) + H(b)) of two equally long 1D samples, from a ``bins`` × ``bins`` joint
    histogram: 0 for independent samples, 1 when each determines the other (0 for constants)."""
    joint, _, _ = np.histogram2d(a, b, bins=bins)
    p = joint / joint.sum()

    def entropy(q):
        q = q[q > 0]
        return float(-(q * np.log(q)).sum())

    ha, hb = entropy(p.sum(axis=1)), entropy(p.sum(axis=0))
    return 0.0 if ha + hb == 0 else max(0.0, 2.0 * (ha + hb - entropy(p)) / (ha + hb))


def scores(image: np.ndarray, template: np.ndarray, brain: np.ndarray, subject: np.ndarray | None = None) -> dict:
    """The QC scores (rounded to 4 places) of ``image`` (preprocessed, on the template grid)
    against ``template`` inside the template brain mask ``brain``, all (X, Y, Z) arrays of the
    study grid; ``subject``: the image's own brain mask on the grid (adds the Dice)."""
    inside = np.asarray(brain) > 0
    a, b = np.asarray(image, dtype=np.float64)[inside], np.asarray(template, dtype=np.float64)[inside]
    found = {"correlation_with_template": round(float(np.corrcoef(a, b)[0, 1]), 4),
             "mutual_information_with_template": round(normalised_mutual_information(a, b), 4)}
    if subject is not None:
        found["brain_mask_dice_with_template"] = round(dice(np.asarray(subject) > 0, inside), 4)
    return found


def failure(qc: dict, qc_min: float | None, source: Path, png: Path | None = None) -> str | None:
    """The exclusion reason of an image whose ``GATED`` score (in its sidecar's ``qc``) is below
    ``qc_min`` (a missing or non-finite score fails too); None when it passes or ``qc_min`` is None."""
    if qc_min is None:
        return None
    score = qc.get(GATED, float("nan"))
    if np.isfinite(score) and score >= qc_min:
        return None
    where = f" (see its QC image {Path(png).name})" if png is not None else ""
    return (f"{source}: registration failed quality control: correlation with the template {score:.2f} is below "
            f"preprocess.qc_min {qc_min:g}{where}. Check the image and its brain extraction, lower "
            "preprocess.qc_min (null turns the check off), or leave the participant out (participants.exclude)")


def gather(manifest: pd.DataFrame, preproc_dir: Path, excluded: pd.DataFrame, channels=("T1w",)) -> pd.DataFrame:
    """One row per sample of ``manifest`` (``COLUMNS``): its reference sidecar's QC scores (empty
    where preprocessing failed or the score does not apply), whether ``excluded`` lists it (any
    stage) and its QC PNG, ranked worst first: lowest ``GATED`` score first, no score before any."""
    left_out = set(excluded["image_id"]) - {""}
    rows = []
    for sample in manifest.itertuples(index=False):
        out = derivative_paths(preproc_dir, sample.subdir, sample.image_id, channels)
        sidecar = out[f"sidecar_{channels[0]}"]
        qc = json.loads(sidecar.read_text()).get("QC", {}) if sidecar.exists() and sidecar.stat().st_size else {}
        rows.append({"image_id": sample.image_id, "participant_id": sample.participant_id, "file": sample.path,
                     **{k: qc.get(k, np.nan) for k in SCORES},
                     "excluded": "yes" if sample.image_id in left_out else "no", "qc_png": str(out["qc"])})
    table = pd.DataFrame(rows, columns=COLUMNS)
    for score in SCORES:
        table[score] = pd.to_numeric(table[score], errors="coerce")
    return table.sort_values([GATED, "image_id"], na_position="first", kind="stable").reset_index(drop=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)  # channels (the reference's sidecar holds the scores)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.tsv: every sample preprocessed")
    parser.add_argument("--preproc-dir", type=Path, required=True, help="derivatives root of preprocessing")
    parser.add_argument("--excluded", type=Path, required=True, help="excluded.tsv")
    parser.add_argument("--out", type=Path, required=True, help="qc.tsv")
    args = parser.parse_args(argv)
    table = gather(read_tsv(args.manifest), args.preproc_dir, read_tsv(args.excluded), channel_names(args.config))
    with atomic.path(args.out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    print(f"qc: {len(table)} images, {int((table['excluded'] == 'yes').sum())} excluded; worst first in {args.out}")


if __name__ == "__main__":
    main()
