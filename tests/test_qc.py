"""Registration quality control (``pipeline.intake.qc``): the scores tell an aligned image from a
misaligned one, ``preprocess.qc_min`` excludes a failed registration (on_error continue) or stops
the run naming it (stop), ``qc.tsv`` ranks every image worst first and the report shows the worst
first. Small grids (6-8 mm) keep ANTs quick."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.common.errors import InputError
from pipeline.intake import exclusions, grid, preprocess, qc
from pipeline.results.report import qc_sections

SETTINGS = {"n4": False, "brain_extraction": "none"}


@pytest.fixture(scope="module")
def coarse_grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    grid.write_grid(8.0, (20, 24, 20), d / "tpl.nii.gz", d / "mask.nii.gz")
    return d / "tpl.nii.gz", d / "mask.nii.gz"


def noise(path: Path) -> Path:
    """An image ingest lets through whose registration cannot match the template (r about 0)."""
    data = np.random.default_rng(0).normal(100, 10, (12, 14, 12)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def test_scores_tell_an_aligned_image_from_a_misaligned_one(coarse_grid):
    template = nib.load(coarse_grid[0]).get_fdata()
    brain = nib.load(coarse_grid[1]).get_fdata() > 0
    rng = np.random.default_rng(0)
    aligned = template + rng.normal(0, 0.05, template.shape)
    shifted = np.roll(template, (3, -2, 2), axis=(0, 1, 2)) + rng.normal(0, 0.05, template.shape)
    good = qc.scores(aligned, template, brain, subject=brain)
    bad = qc.scores(shifted, template, brain, subject=np.roll(brain, (3, -2, 2), axis=(0, 1, 2)))
    assert set(good) == set(qc.SCORES)
    assert good["correlation_with_template"] > 0.9 and bad["correlation_with_template"] < 0.5
    assert good["mutual_information_with_template"] > 2 * bad["mutual_information_with_template"]
    assert good["brain_mask_dice_with_template"] == 1.0 and bad["brain_mask_dice_with_template"] < 0.8
    assert "brain_mask_dice_with_template" not in qc.scores(aligned, template, brain)  # no native mask
    assert qc.normalised_mutual_information(template[brain], template[brain]) == pytest.approx(1.0)


def test_a_registered_image_gets_every_score_in_its_sidecar(tmp_path):
    from test_preprocess import RES, SETTINGS as POSED, SHAPE, posed_subject

    grid.write_grid(RES, SHAPE, tmp_path / "tpl.nii.gz", tmp_path / "mask.nii.gz")
    posed_subject(tmp_path / "sub-01_T1w.nii", rotation_deg=(8, -6, 5), translation_mm=(7, -5, 9))
    out = preprocess.derivative_paths(tmp_path / "out", "sub-01", "sub-01")
    sidecar = preprocess.preprocess_or_exclude([tmp_path / "sub-01_T1w.nii"], out, "sub-01", "stop",
                                               tmp_path / "rec.tsv", template=tmp_path / "tpl.nii.gz",
                                               mask=tmp_path / "mask.nii.gz", settings=POSED)
    assert sidecar["QC"]["correlation_with_template"] > 0.85
    assert sidecar["QC"]["mutual_information_with_template"] > 0.3
    assert json.loads(out["sidecar_T1w"].read_text())["QC"] == sidecar["QC"]
    assert exclusions.read_table(tmp_path / "rec.tsv").empty


def test_qc_min_excludes_a_failed_registration_with_its_score_and_file(tmp_path, coarse_grid):
    source = noise(tmp_path / "sub-07_T1w.nii.gz")
    out = preprocess.derivative_paths(tmp_path / "out", "sub-07", "sub-07")
    record = tmp_path / "out" / "sub-07_excluded.tsv"
    assert preprocess.preprocess_or_exclude([source], out, "sub-07", "continue", record, template=coarse_grid[0],
                                            mask=coarse_grid[1], settings={**SETTINGS, "qc_min": 0.5}) is None
    row = exclusions.read_table(record).iloc[0]
    assert (row["image_id"], row["stage"], row["file"]) == ("sub-07", "preprocess", str(source))
    score = json.loads(out["sidecar_T1w"].read_text())["QC"]["correlation_with_template"]
    assert score < 0.5 and f"correlation with the template {score:.2f}" in row["reason"]
    assert str(source) in row["reason"] and "preprocess.qc_min 0.5" in row["reason"]
    kept = {"sidecar_T1w", "qc"}  # why it was excluded; the data are left empty like any excluded sample's
    assert all(p.stat().st_size > 0 for role, p in out.items() if role in kept)
    assert all(p.exists() and p.stat().st_size == 0 for role, p in out.items() if role not in kept)


def test_qc_min_with_stop_ends_the_run_naming_the_file(tmp_path, coarse_grid):
    source = noise(tmp_path / "sub-07_T1w.nii.gz")
    out = preprocess.derivative_paths(tmp_path / "out", "sub-07", "sub-07")
    with pytest.raises(InputError, match="registration failed quality control") as raised:
        preprocess.preprocess_or_exclude([source], out, "sub-07", "stop", tmp_path / "out" / "x.tsv",
                                         template=coarse_grid[0], mask=coarse_grid[1], settings=SETTINGS)
    assert str(source) in str(raised.value) and "on_error: continue" in str(raised.value)  # the default qc_min
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "x.tsv"]


def test_qc_min_null_lets_every_registration_through(tmp_path, coarse_grid):
    out = preprocess.derivative_paths(tmp_path / "out", "sub-07", "sub-07")
    sidecar = preprocess.preprocess_or_exclude([noise(tmp_path / "a.nii.gz")], out, "sub-07", "stop", None,
                                               template=coarse_grid[0], mask=coarse_grid[1],
                                               settings={**SETTINGS, "qc_min": None})
    assert sidecar["QC"]["correlation_with_template"] < 0.5


def write_qc_study(root: Path) -> Path:
    """A manifest of four samples, their sidecars' QC (one failed preprocessing: empty files) and
    excluded.tsv; returns the derivatives root."""
    preproc = root / "derivatives"
    ids = ["sub-01", "sub-02", "sub-03", "sub-04"]
    manifest = pd.DataFrame({"image_id": ids, "participant_id": ids, "session": "", "subdir": ids,
                             "path": [f"/bids/{i}/anat/{i}_T1w.nii.gz" for i in ids]})
    manifest.to_csv(root / "manifest.tsv", sep="\t", index=False)
    correlations = {"sub-01": 0.95, "sub-02": 0.17, "sub-03": 0.91, "sub-04": None}
    for image_id, r in correlations.items():
        out = preprocess.derivative_paths(preproc, image_id, image_id)
        out["sidecar_T1w"].parent.mkdir(parents=True, exist_ok=True)
        if r is None:
            out["sidecar_T1w"].write_bytes(b"")
            out["qc"].write_bytes(b"")
            continue
        scores = {"correlation_with_template": r, "mutual_information_with_template": r / 2}
        out["sidecar_T1w"].write_text(json.dumps({"QC": scores}))
        out["qc"].write_bytes(PNG)
    excluded = pd.concat([exclusions.record("sub-02", "sub-02", "preprocess", "/bids/sub-02", "qc_min"),
                          exclusions.record("sub-04", "sub-04", "preprocess", "/bids/sub-04", "failed")])
    exclusions.write(excluded, root / "excluded.tsv")
    return preproc


# The smallest valid PNG (1 x 1 pixel), enough for the report to embed.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                    "0000000d4944415478da63f8cfc0f01f0005000201a5f9d3e80000000049454e44ae426082")


def test_qc_table_ranks_every_image_worst_first(tmp_path):
    preproc = write_qc_study(tmp_path)
    qc.main(["--config", json.dumps({"channels": {"T1w": {"suffix": "T1w"}}}), "--manifest",
             str(tmp_path / "manifest.tsv"), "--preproc-dir", str(preproc), "--excluded",
             str(tmp_path / "excluded.tsv"), "--out", str(tmp_path / "qc.tsv")])
    table = pd.read_csv(tmp_path / "qc.tsv", sep="\t", keep_default_na=False)
    assert list(table.columns) == qc.COLUMNS
    assert table["image_id"].tolist() == ["sub-04", "sub-02", "sub-03", "sub-01"]  # no score (failed) first
    assert table["excluded"].tolist() == ["yes", "yes", "no", "no"]
    assert table["file"].tolist()[1] == "/bids/sub-02/anat/sub-02_T1w.nii.gz"
    assert pd.to_numeric(table["correlation_with_template"]).tolist()[1:] == [0.17, 0.91, 0.95]


def test_report_shows_the_worst_images_first_with_the_total(tmp_path):
    preproc = write_qc_study(tmp_path)
    table = qc.gather(pd.read_csv(tmp_path / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False), preproc,
                      exclusions.read_table(tmp_path / "excluded.tsv"))
    table.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    page = "\n".join(qc_sections(tmp_path / "qc.tsv", 0.5, rows=3, figures=2))
    assert "worst first" in page and "The worst 3 of 4 images (2 excluded)" in page and "qc_min</code> 0.5" in page
    rows = [page.index(f"<td>{i}</td>") for i in ("sub-04", "sub-02", "sub-03")]
    assert rows == sorted(rows) and "<td>sub-01</td>" not in page  # the top 3 only
    figures = [page.index(f'alt="{i}_space') for i in ("sub-02", "sub-03")]  # worst with a QC image first
    assert figures == sorted(figures) and figures[0] > rows[-1] and 'alt="sub-01_space' not in page
