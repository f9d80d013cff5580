"""Real anatomy (issue 27): the two real T1w sessions that the npm package brainbrowser 2.3.0
ships, variants of them the study must accept and induced failures it must flag, through ingest →
preprocess → exclusions (the cohort QC rule, config ``qc``) → ``qc.tsv``, at 4 mm without N4.

The scans are fetched by ``make real-scans`` (``.ci/run`` runs it) into ``data/real/brainbrowser``;
without them the end-to-end test is skipped, saying so. The converter's test needs no download.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import ingested
from pipeline.common.config import resolved
from pipeline.demo import realscans
from pipeline.intake import exclusions, grid, preprocess, qc

SCANS = Path(__file__).resolve().parents[1] / "data" / "real" / "brainbrowser"
RES, SHAPE = 4.0, (40, 48, 40)
SETTINGS = {"resolution": RES, "shape": list(SHAPE), "registration_resolution": RES, "n4": False,
            "brain_extraction": "deepbet", "qc_min": None}
N_VARIANTS, SEED = 4, 3


def test_brainbrowser_header_and_raw_become_a_nifti_with_minc_world_coordinates(tmp_path):
    """MINC: world = Σ (start + i·step)·cosines per axis; ``order`` lists axes slowest first."""
    cos = {"xspace": [0.99, 0.1, 0.0], "yspace": [-0.1, 0.99, 0.0], "zspace": [0.0, 0.0, 1.0]}
    header = {"order": ["xspace", "zspace", "yspace"],
              **{axis: {"start": start, "space_length": n, "step": step, "direction_cosines": cos[axis]}
                 for axis, start, n, step in (("xspace", 70.0, 4, -1.0), ("yspace", 90.0, 5, -1.5),
                                              ("zspace", -30.0, 3, 2.0))}}
    data = np.arange(4 * 3 * 5, dtype=np.uint8).reshape(4, 3, 5)  # (x, z, y): x slowest, y fastest
    (tmp_path / "s.mnc.header.gz").write_bytes(gzip.compress(json.dumps(header).encode()))
    (tmp_path / "s.mnc.raw.gz").write_bytes(gzip.compress(data.tobytes()))
    img = realscans.read_brainbrowser(tmp_path / "s.mnc.header.gz", tmp_path / "s.mnc.raw.gz")
    assert img.shape == (4, 5, 3) and img.get_data_dtype() == np.uint8
    i, j, k = 3, 4, 2  # x, y, z indices
    assert np.asarray(img.dataobj)[i, j, k] == data[i, k, j]
    world = sum((header[a]["start"] + n * header[a]["step"]) * np.asarray(cos[a])
                for a, n in (("xspace", i), ("yspace", j), ("zspace", k)))
    assert np.allclose(nib.affines.apply_affine(img.affine, [i, j, k]), world)
    (tmp_path / "t.mnc.raw.gz").write_bytes(gzip.compress(data.tobytes()[:-1]))
    with pytest.raises(ValueError, match="59 voxels, the header .* says"):
        realscans.read_brainbrowser(tmp_path / "s.mnc.header.gz", tmp_path / "t.mnc.raw.gz")


def preprocessed(task: tuple) -> None:
    """One sample through ``preprocess_or_exclude`` (a worker process: one ITK thread, as a job)."""
    source, out_dir, subdir, image_id, study_grid = task
    out = preprocess.derivative_paths(out_dir, subdir, image_id)
    preprocess.preprocess_or_exclude([Path(source)], out, image_id, "continue", Path(out_dir) / f"{image_id}.tsv",
                                     template=study_grid[0], mask=study_grid[1],
                                     settings=preprocess.PreprocessSettings.of(SETTINGS), threads=1)


@pytest.mark.quality  # make test-quality (CI runs it)
@pytest.mark.skipif(not (SCANS / "structural2.mnc.raw.gz").exists(),
                    reason=f"the real scans are not fetched into {SCANS}: run `make real-scans` (.ci/run does)")
def test_real_scans_pass_and_every_induced_failure_is_flagged(tmp_path):
    cohort = realscans.make_cohort(SCANS, tmp_path / "cohort", n_variants=N_VARIANTS, seed=SEED, extension=".nii")
    people = pd.read_csv(cohort / "participants.tsv", sep="\t").set_index("participant_id")
    grid.write_grid(RES, SHAPE, tmp_path / "tpl.nii.gz", tmp_path / "mask.nii.gz")
    result = ingested(cohort, "age", "regression")
    assert result.report.empty and len(result.manifest) == 2 + N_VARIANTS + len(realscans.FAILURES)
    assert nib.load(result.manifest["path"].iloc[0]).shape == (160, 224, 256)  # sub-A ses-1 as shipped
    result.report.to_csv(tmp_path / "ingest_report.tsv", sep="\t", index=False)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"  # the workers inherit it
    tasks = [(row.path, tmp_path / "preproc", row.subdir, row.image_id, (tmp_path / "tpl.nii.gz", tmp_path / "mask.nii.gz"))
             for row in result.manifest.itertuples()]
    # Spawned, not forked: this pytest process may hold torch's OpenMP threads from earlier tests.
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(preprocessed, tasks))
    excluded = exclusions.gather(tmp_path / "ingest_report.tsv", sorted((tmp_path / "preproc").glob("*.tsv")))
    flagged = exclusions.cohort_qc(result.manifest, tmp_path / "preproc", excluded, resolved(["qc"], {}))
    excluded = pd.concat([excluded, flagged], ignore_index=True)
    table = qc.gather(result.manifest, tmp_path / "preproc", excluded).set_index("image_id")
    table["expected"] = [people.loc[p, "expected"] for p in table["participant_id"]]
    shown = table[["expected", "correlation_with_template", "local_correlation_with_template",
                   "template_brain_in_view", "brain_offset_mm", "brain_volume_ml", "flagged_because"]].to_string()
    good, failed = table[table["expected"] == "good"], table[table["expected"] == "failure"]
    assert (good["excluded"] == "no").all(), f"good images flagged:\n{shown}"
    assert (failed["excluded"] == "yes").all() and (failed["flagged_because"] != "").all(), f"failures passed:\n{shown}"
    # Test-retest: the two sessions of one person, preprocessed, agree (r 0.965 at 4 mm, docs/benchmarks.md).
    pairs = qc.retest(result.manifest, tmp_path / "preproc", excluded, nib.load(tmp_path / "mask.nii.gz").get_fdata())
    assert pairs[["image_a", "image_b"]].values.tolist() == [["sub-A_ses-1", "sub-A_ses-2"]]
    assert pairs["correlation"].iloc[0] > 0.9, pairs
