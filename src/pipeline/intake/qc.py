"""Registration quality control: every preprocessed image's scores against the template, the
per-image threshold that excludes a failed registration (config ``preprocess.qc_min``), the cohort
rule (config ``qc``: floors, ceilings and robust z-scores over the study's images, ``flags``; the
exclusions stage applies it), the study's QC table ``qc.tsv``, ranked worst first with why each
flagged image is flagged, and the test-retest table ``retest.tsv`` (``retest``).

Scores, inside the template brain mask on the study grid (the sidecar's ``QC``):

* ``correlation_with_template``: Pearson r of the preprocessed image and the template. The demo
  and focal-lesion cohorts score 0.92-0.97, every test cohort 0.64 or more; a whole head squeezed
  into the brain outline 0.12-0.48, noise about 0 (docs/benchmarks.md, *Registration quality
  control*). ``preprocess.qc_min`` applies to this score.
* ``mutual_information_with_template``: normalised mutual information 2 I(A; B) / (H(A) + H(B))
  of a 32 × 32 joint histogram, 0 (independent) to 1 (one determines the other); it does not
  assume a linear intensity relation, so it also speaks for contrasts unlike the template's.
* ``local_correlation_with_template``: the mean Pearson r over windows of about ``LOCAL_MM``
  (``local_correlation``): every region must match, not only the outline and mean contrast.
* ``template_brain_in_view``: the share of the template brain inside the image's field of view
  carried to the grid; a field of view that cut off the top of the brain leaves part out, however
  well an affine stretches the rest into place.
* ``brain_mask_dice_with_template``: Dice of the image's own brain mask carried to the grid and
  the template mask; only with a native mask (``brain_extraction`` not ``none``, where the
  image's mask is the template's and the Dice would be 1 by construction). With it too:
  ``brain_offset_mm`` (the distance between the two masks' centres) and ``brain_volume_ml`` (the
  mask on the image's own grid).

Real whole-head T1w scans score far lower than the phantoms made from the template (correlation
0.54-0.68 against 0.92-0.98; docs/benchmarks.md, *Real scans*), so the cohort rule (``flags``)
judges each image against the study's own images as well as against absolute floors.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.common import atomic
from pipeline.common import columns
from pipeline.common.cli import add_config, channel_names
from pipeline.common.paths import derivative_paths
from pipeline.common.tables import read_tsv
from pipeline.intake.brainmask import dice

SCORES = ("correlation_with_template", "mutual_information_with_template", "local_correlation_with_template",
          "brain_mask_dice_with_template", "template_brain_in_view", "brain_offset_mm", "brain_volume_ml")
LOCAL_MM = 12.0  # the local correlation's window edge (mm)
GATED = "correlation_with_template"  # the score config preprocess.qc_min applies to
BINS = 32
COLUMNS = ["image_id", "participant_id", "file", *SCORES, "excluded", "flagged_because", "qc_png"]


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


def local_correlation(a: np.ndarray, b: np.ndarray, inside: np.ndarray, size: int) -> float:
    """Mean local Pearson r of ``a`` and ``b`` (X, Y, Z) over ``size``³ windows centred on each voxel
    of ``inside``, each window weighted by the voxels of ``inside`` it holds (windows with fewer
    than a quarter inside, or flat in either image, are left out). Unlike one global r it asks that
    every region match, not only the brain's outline and mean contrast."""
    from scipy.ndimage import uniform_filter

    w = inside.astype(np.float64)
    a, b = np.where(inside, a, 0.0), np.where(inside, b, 0.0)

    def mean(x):
        return uniform_filter(x, size=size, mode="constant")

    n = mean(w)
    ok = inside & (n > 0.25)
    n = np.where(ok, n, 1.0)
    ma, mb = mean(a) / n, mean(b) / n
    va, vb = mean(a * a) / n - ma ** 2, mean(b * b) / n - mb ** 2
    cov = mean(a * b) / n - ma * mb
    ok &= (va > 1e-6 * max(float(va[ok].max()) if ok.any() else 0.0, 1e-12)) & (vb > 1e-12)
    if not ok.any():
        return 0.0
    r = cov[ok] / np.sqrt(va[ok] * vb[ok])
    return float(np.clip(r, -1, 1).mean())


def window(spacing_mm: float) -> int:
    """The local correlation's window in voxels of ``spacing_mm``: odd, about ``LOCAL_MM``, at least 3."""
    return max(3, int(round(LOCAL_MM / spacing_mm)) // 2 * 2 + 1)


def scores(image: np.ndarray, template: np.ndarray, brain: np.ndarray, subject: np.ndarray | None = None,
           spacing_mm: float | None = None, native_brain_ml: float | None = None,
           in_view: np.ndarray | None = None) -> dict:
    """The QC scores (rounded to 4 places) of ``image`` (preprocessed, on the template grid)
    against ``template`` inside the template brain mask ``brain``, all (X, Y, Z) arrays of the
    study grid of ``spacing_mm`` (mm; adds the local correlation); ``subject``: the image's own
    brain mask on the grid (adds the Dice and the offset); ``native_brain_ml``: the volume of that
    mask on the image's own grid; ``in_view``: the image's field of view carried to the grid
    (boolean; adds the share of the template brain inside it)."""
    inside = np.asarray(brain) > 0
    a, b = np.asarray(image, dtype=np.float64)[inside], np.asarray(template, dtype=np.float64)[inside]
    found = {"correlation_with_template": round(float(np.corrcoef(a, b)[0, 1]), 4),
             "mutual_information_with_template": round(normalised_mutual_information(a, b), 4)}
    if spacing_mm is not None:
        found["local_correlation_with_template"] = round(local_correlation(
            np.asarray(image, dtype=np.float64), np.asarray(template, dtype=np.float64), inside, window(spacing_mm)), 4)
    if subject is not None:
        own = np.asarray(subject) > 0
        found["brain_mask_dice_with_template"] = round(dice(own, inside), 4)
        if spacing_mm is not None:
            offset = (np.argwhere(own).mean(0) - np.argwhere(inside).mean(0)) * spacing_mm if own.any() else [np.inf] * 3
            found["brain_offset_mm"] = round(float(np.linalg.norm(offset)), 2)
    if in_view is not None:
        found["template_brain_in_view"] = round(float((np.asarray(in_view) & inside).sum() / max(int(inside.sum()), 1)), 4)
    if native_brain_ml is not None:
        found["brain_volume_ml"] = round(float(native_brain_ml), 1)
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


HIGHER_IS_WORSE = {"brain_offset_mm"}  # every other score: lower is worse
SPREAD_FLOOR = {"correlation_with_template": 0.02, "local_correlation_with_template": 0.02,
                "mutual_information_with_template": 0.02, "brain_mask_dice_with_template": 0.01,
                "template_brain_in_view": 0.005, "brain_offset_mm": 1.0, "brain_volume_ml": 50.0}


def robust_z(values: pd.Series, score: str) -> pd.Series:
    """How many robust standard deviations each value lies on the worse side of the median of
    ``values`` (positive: worse; NaN stays NaN): (median - x) / s for a score where lower is worse,
    (x - median) / s otherwise, s = 1.4826 × the median absolute deviation, at least
    ``SPREAD_FLOOR[score]`` (a cohort of near-identical scans would otherwise flag the least
    identical)."""
    known = values.dropna()
    if known.empty:
        return values * np.nan
    median = float(known.median())
    spread = max(1.4826 * float((known - median).abs().median()), SPREAD_FLOOR.get(score, 0.0))
    sign = 1.0 if score in HIGHER_IS_WORSE else -1.0
    return sign * (values - median) / spread if spread > 0 else values * 0.0


def flags(table: pd.DataFrame, rule: dict) -> dict[str, str]:
    """``{image_id: why}`` for the images of ``table`` (one row per image, a column per score)
    that config ``qc`` (``rule``) flags: a score below its ``floors`` entry (above, for
    ``ceilings``), or, with at least ``min_images`` scored images, a score of ``robust_scores``
    ``robust_z`` or more robust standard deviations worse than the cohort's median."""
    why: dict[str, list[str]] = {}
    ids = table["image_id"].tolist()
    for score, floor in (rule.get("floors") or {}).items():
        if score in table:
            for image_id, value in zip(ids, table[score]):
                if pd.notna(value) and value < floor:
                    why.setdefault(image_id, []).append(f"{score} {value:.3g} < floor {floor:g}")
    for score, ceiling in (rule.get("ceilings") or {}).items():
        if score in table:
            for image_id, value in zip(ids, table[score]):
                if pd.notna(value) and value > ceiling:
                    why.setdefault(image_id, []).append(f"{score} {value:.3g} > ceiling {ceiling:g}")
    limit = rule.get("robust_z")
    for score in (rule.get("robust_scores") or []) if limit is not None else []:
        if score not in table or table[score].notna().sum() < rule.get("min_images", 10):
            continue
        z = robust_z(table[score], score)
        median = float(table[score].median())
        for image_id, value, worse in zip(ids, table[score], z):
            if pd.notna(worse) and worse >= limit:
                why.setdefault(image_id, []).append(f"{score} {value:.3g} is {worse:.1f} robust SD worse than the "
                                                    f"cohort's median {median:.3g} (qc.robust_z {limit:g})")
    return {image_id: "; ".join(reasons) for image_id, reasons in why.items()}


def gather(manifest: pd.DataFrame, preproc_dir: Path, excluded: pd.DataFrame, channels=("T1w",)) -> pd.DataFrame:
    """One row per sample of ``manifest`` (``COLUMNS``): its reference sidecar's QC scores (empty
    where preprocessing failed or the score does not apply), whether ``excluded`` lists it (any
    stage) and its QC PNG (both paths absolute), ranked worst first: lowest ``GATED`` score first, no score before any."""
    left_out = set(excluded["image_id"]) - {""}
    because = {}
    for row in excluded.itertuples(index=False):
        if row.image_id:
            because.setdefault(row.image_id, f"{row.stage}: {row.reason}")
    rows = []
    for sample in manifest.itertuples(index=False):
        out = derivative_paths(preproc_dir, sample.subdir, sample.image_id, channels)
        sidecar = out[f"sidecar_{channels[0]}"]
        qc = json.loads(sidecar.read_text()).get("QC", {}) if sidecar.exists() and sidecar.stat().st_size else {}
        rows.append({"image_id": sample.image_id, "participant_id": sample.participant_id,
                     "file": str(Path(sample.path).absolute()), **{k: qc.get(k, np.nan) for k in SCORES},
                     "excluded": "yes" if sample.image_id in left_out else "no",
                     "flagged_because": because.get(sample.image_id, ""), "qc_png": str(Path(out["qc"]).absolute())})
    table = pd.DataFrame(rows, columns=COLUMNS)
    for score in SCORES:
        table[score] = pd.to_numeric(table[score], errors="coerce")
    return table.sort_values([GATED, "image_id"], na_position="first", kind="stable").reset_index(drop=True)


def threshold(qc_min: float | None) -> dict[str, columns.Column]:
    """The gated score's data dictionary entry with this study's threshold (config preprocess.qc_min)."""
    entry = columns.COLUMNS[GATED]
    rule = (f"This study's threshold: {qc_min:g} (config preprocess.qc_min); an image below it is excluded."
            if qc_min is not None else "config preprocess.qc_min is null in this study: no image is excluded for it.")
    return {GATED: columns.Column(entry.long_name, f"{entry.description} {rule}", entry.units, entry.levels)}


RETEST_COLUMNS = ["participant_id", "image_a", "image_b", "correlation"]


def pairs(table: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Every pair of images of one participant in ``table`` (rows with ``participant_id`` and
    ``image_id``; sessions or runs): ``(participant, image_a, image_b)``, participants and image ids
    in sorted order, image_a before image_b. The test-retest pairs of preprocessing (``retest``) and
    of the model's predictions and maps (``pipeline.results.retest``)."""
    found = []
    for participant, images in table.groupby("participant_id", sort=True):
        ids = sorted(images["image_id"].unique())
        found += [(participant, a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
    return found


def retest(manifest: pd.DataFrame, preproc_dir: Path, excluded: pd.DataFrame, brain: np.ndarray,
           channels=("T1w",)) -> pd.DataFrame:
    """Test-retest reproducibility of preprocessing: for every participant with two or more images
    left in the study (sessions or runs), the Pearson r of each pair's preprocessed reference
    channel inside the template brain mask ``brain`` (X, Y, Z). ``RETEST_COLUMNS``; empty when no
    participant has two images."""
    left_out = set(excluded["image_id"]) - {""}
    kept = manifest[~manifest["image_id"].isin(left_out)]
    inside = np.asarray(brain) > 0
    paths = {sample.image_id: derivative_paths(preproc_dir, sample.subdir, sample.image_id, channels)["array"]
             for sample in kept.itertuples(index=False)}
    done = kept.loc[np.array([paths[i].exists() and paths[i].stat().st_size > 0 for i in kept["image_id"]], bool)]
    rows = []
    for participant, a, b in pairs(done):
        x, y = (np.load(paths[i], mmap_mode="r")[0][inside] for i in (a, b))
        rows.append([participant, a, b, round(float(np.corrcoef(x, y)[0, 1]), 4)])
    return pd.DataFrame(rows, columns=RETEST_COLUMNS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)  # channels (the reference's sidecar holds the scores), qc_min (stated in qc.json)
    parser.add_argument("--manifest", type=Path, required=True, help="manifest.tsv: every sample preprocessed")
    parser.add_argument("--preproc-dir", type=Path, required=True, help="derivatives root of preprocessing")
    parser.add_argument("--excluded", type=Path, required=True, help="excluded.tsv")
    parser.add_argument("--out", type=Path, required=True, help="qc.tsv")
    parser.add_argument("--mask", type=Path, help="the grid's brain mask: with --retest, the test-retest table")
    parser.add_argument("--retest", type=Path, help="retest.tsv: correlation of each participant's preprocessed images")
    args = parser.parse_args(argv)
    manifest, excluded = read_tsv(args.manifest), read_tsv(args.excluded)
    table = gather(manifest, args.preproc_dir, excluded, channel_names(args.config))
    with atomic.path(args.out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    # qc_min: the threshold the preprocessing jobs applied (config preprocess.qc_min), for qc.json
    atomic.write_dictionary(args.out, table.columns, threshold(args.config["qc_min"]) if "qc_min" in args.config else {})
    print(f"qc: {len(table)} images, {int((table['excluded'] == 'yes').sum())} excluded; worst first in {args.out}")
    if args.retest and args.mask:
        import nibabel as nib

        pairs = retest(manifest, args.preproc_dir, excluded, np.asarray(nib.load(args.mask).dataobj),
                       channel_names(args.config))
        with atomic.path(args.retest) as tmp:
            pairs.to_csv(tmp, sep="\t", index=False)
        atomic.write_dictionary(args.retest, pairs.columns)
        print(f"test-retest: {len(pairs)} pairs of images of one participant in {args.retest}")


if __name__ == "__main__":
    main()
