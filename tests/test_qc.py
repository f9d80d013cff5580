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
    everywhere, cut = np.ones(brain.shape, bool), np.ones(brain.shape, bool)
    cut[:, :, int(np.argwhere(brain)[:, 2].max()) - 2:] = False  # the top of the brain out of view
    good = qc.scores(aligned, template, brain, subject=brain, spacing_mm=8.0, native_brain_ml=1200.0, in_view=everywhere)
    bad = qc.scores(shifted, template, brain, subject=np.roll(brain, (3, -2, 2), axis=(0, 1, 2)), spacing_mm=8.0,
                    in_view=cut)
    assert set(good) == set(qc.SCORES) and good["brain_volume_ml"] == 1200.0
    assert good["correlation_with_template"] > 0.9 and bad["correlation_with_template"] < 0.5
    assert good["local_correlation_with_template"] > 0.5 > bad["local_correlation_with_template"]
    assert good["mutual_information_with_template"] > 2 * bad["mutual_information_with_template"]
    assert good["brain_mask_dice_with_template"] == 1.0 and bad["brain_mask_dice_with_template"] < 0.8
    assert good["template_brain_in_view"] == 1.0 and 0.8 < bad["template_brain_in_view"] < 0.97
    assert good["brain_offset_mm"] == 0.0 and bad["brain_offset_mm"] == pytest.approx(8 * np.sqrt(17), abs=3)
    assert "brain_mask_dice_with_template" not in qc.scores(aligned, template, brain)  # no native mask
    assert qc.normalised_mutual_information(template[brain], template[brain]) == pytest.approx(1.0)


def test_a_registered_image_gets_every_score_in_its_sidecar(tmp_path):
    from test_preprocess import RES, SETTINGS as POSED, SHAPE, posed_subject

    grid.write_grid(RES, SHAPE, tmp_path / "tpl.nii.gz", tmp_path / "mask.nii.gz")
    posed_subject(tmp_path / "sub-01_T1w.nii", rotation_deg=(8, -6, 5), translation_mm=(7, -5, 9))
    out = preprocess.derivative_paths(tmp_path / "out", "sub-01", "sub-01")
    sidecar = preprocess.preprocess_or_exclude([tmp_path / "sub-01_T1w.nii"], out, "sub-01", "stop",
                                               tmp_path / "rec.tsv", template=tmp_path / "tpl.nii.gz",
                                               mask=tmp_path / "mask.nii.gz",
                                               settings=preprocess.PreprocessSettings.of(POSED))
    assert sidecar["QC"]["correlation_with_template"] > 0.85
    assert sidecar["QC"]["mutual_information_with_template"] > 0.3
    assert json.loads(out["sidecar_T1w"].read_text())["QC"] == sidecar["QC"]
    assert exclusions.read_table(tmp_path / "rec.tsv").empty


def test_qc_min_excludes_a_failed_registration_with_its_score_and_file(tmp_path, coarse_grid):
    source = noise(tmp_path / "sub-07_T1w.nii.gz")
    out = preprocess.derivative_paths(tmp_path / "out", "sub-07", "sub-07")
    record = tmp_path / "out" / "sub-07_excluded.tsv"
    settings = preprocess.PreprocessSettings.of({**SETTINGS, "qc_min": 0.5})
    assert preprocess.preprocess_or_exclude([source], out, "sub-07", "continue", record, template=coarse_grid[0],
                                            mask=coarse_grid[1], settings=settings) is None
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
                                         template=coarse_grid[0], mask=coarse_grid[1],
                                         settings=preprocess.PreprocessSettings.of(SETTINGS))
    assert str(source) in str(raised.value) and "on_error: continue" in str(raised.value)  # the default qc_min
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.name != "x.tsv"]


def test_qc_min_null_lets_every_registration_through(tmp_path, coarse_grid):
    out = preprocess.derivative_paths(tmp_path / "out", "sub-07", "sub-07")
    sidecar = preprocess.preprocess_or_exclude([noise(tmp_path / "a.nii.gz")], out, "sub-07", "stop", None,
                                               template=coarse_grid[0], mask=coarse_grid[1],
                                               settings=preprocess.PreprocessSettings.of({**SETTINGS, "qc_min": None}))
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
    figures = [page.index(f'alt="QC image of {i}_space') for i in ("sub-02", "sub-03")]  # worst with a QC image first
    assert figures == sorted(figures) and figures[0] > rows[-1] and 'of sub-01_space' not in page


def test_cohort_rule_flags_by_floor_ceiling_and_robust_z_and_says_why():
    rng = np.random.default_rng(0)
    n = 12
    table = pd.DataFrame({"image_id": [f"sub-{i:02d}" for i in range(n)],
                          "local_correlation_with_template": rng.uniform(0.55, 0.62, n),
                          "brain_offset_mm": rng.uniform(0.5, 2.0, n)})
    table.loc[3, "local_correlation_with_template"] = 0.45  # above the floor, far below its cohort
    table.loc[5, "local_correlation_with_template"] = 0.2  # below the floor too
    table.loc[7, "brain_offset_mm"] = 14.0
    rule = {"floors": {"local_correlation_with_template": 0.3}, "ceilings": {"brain_offset_mm": 8.0},
            "robust_z": 4.0, "robust_scores": ["local_correlation_with_template"], "min_images": 10}
    flagged = qc.flags(table, rule)
    assert set(flagged) == {"sub-03", "sub-05", "sub-07"}
    assert "local_correlation_with_template 0.45 is" in flagged["sub-03"] and "robust SD worse" in flagged["sub-03"]
    assert "< floor 0.3" in flagged["sub-05"] and "brain_offset_mm 14 > ceiling 8" in flagged["sub-07"]
    # Fewer scored images than min_images: the floors and ceilings only.
    assert set(qc.flags(table, {**rule, "min_images": 13})) == {"sub-05", "sub-07"}
    # The spread has a floor: a cohort of near-identical scores does not flag its least identical.
    tight = pd.DataFrame({"image_id": list("abcdefghijkl"), "local_correlation_with_template": [0.6] * 11 + [0.59]})
    assert qc.flags(tight, rule) == {}


def test_exclusions_apply_the_cohort_rule_and_qc_tsv_says_why(tmp_path):
    preproc = write_qc_study(tmp_path)
    (tmp_path / "report.tsv").write_text("participant_id\timage_id\tpath\treason\n")
    records = tmp_path / "rec.tsv"
    exclusions.write(pd.concat([exclusions.record("sub-02", "sub-02", "preprocess", "/bids/sub-02", "qc_min"),
                                exclusions.record("sub-04", "sub-04", "preprocess", "/bids/sub-04", "failed")]), records)
    config = {"channels": {"T1w": {"suffix": "T1w"}}, "qc": {"floors": {"correlation_with_template": 0.93}}}
    exclusions.main(["--ingest-report", str(tmp_path / "report.tsv"), "--records", str(records), "--out",
                     str(tmp_path / "excluded.tsv"), "--manifest", str(tmp_path / "manifest.tsv"), "--samples",
                     str(tmp_path / "samples.tsv"), "--preproc-dir", str(preproc), "--config", json.dumps(config)])
    excluded = exclusions.read_table(tmp_path / "excluded.tsv")
    row = excluded[excluded["stage"] == "qc"].iloc[0]
    assert row["image_id"] == "sub-03" and "correlation_with_template 0.91 < floor 0.93" in row["reason"]
    assert "sub-03_space-MNI152NLin2009aSym_desc-qc_T1w.png" in row["reason"]
    assert pd.read_csv(tmp_path / "samples.tsv", sep="\t")["image_id"].tolist() == ["sub-01"]
    qc.main(["--config", json.dumps(config), "--manifest", str(tmp_path / "manifest.tsv"), "--preproc-dir",
             str(preproc), "--excluded", str(tmp_path / "excluded.tsv"), "--out", str(tmp_path / "qc.tsv")])
    table = pd.read_csv(tmp_path / "qc.tsv", sep="\t", keep_default_na=False).set_index("image_id")
    assert table.loc["sub-03", "flagged_because"].startswith("qc: registration quality control (config qc)")
    assert table.loc["sub-02", "flagged_because"] == "preprocess: qc_min" and table.loc["sub-01", "flagged_because"] == ""


def test_retest_correlates_each_participants_images_and_the_report_says_so(tmp_path):
    preproc = tmp_path / "derivatives"
    rng = np.random.default_rng(0)
    brain = np.zeros((6, 7, 6), bool)
    brain[1:5, 1:6, 1:5] = True
    base = rng.normal(0, 1, brain.shape)
    rows, arrays = [], {"sub-01_ses-1": base, "sub-01_ses-2": base + rng.normal(0, 0.3, brain.shape),
                        "sub-01_ses-3": rng.normal(0, 1, brain.shape), "sub-02": base}
    for image_id, data in arrays.items():
        participant, subdir = image_id.split("_")[0], image_id.replace("_", "/")
        out = preprocess.derivative_paths(preproc, subdir, image_id)
        out["array"].parent.mkdir(parents=True, exist_ok=True)
        np.save(out["array"], np.where(brain, data, 0.0)[None].astype(np.float32))
        rows.append({"image_id": image_id, "participant_id": participant, "subdir": subdir, "path": f"/{image_id}"})
    manifest = pd.DataFrame(rows)
    excluded = exclusions.record("sub-01_ses-3", "sub-01", "qc", "/x", "flagged")  # left out: not paired
    pairs = qc.retest(manifest, preproc, excluded, brain)
    assert pairs[["participant_id", "image_a", "image_b"]].values.tolist() == [["sub-01", "sub-01_ses-1", "sub-01_ses-2"]]
    expected = np.corrcoef(base[brain], arrays["sub-01_ses-2"][brain])[0, 1]
    assert pairs["correlation"].iloc[0] == pytest.approx(expected, abs=1e-4) and 0.9 < expected < 0.99
    pairs.to_csv(tmp_path / "retest.tsv", sep="\t", index=False)
    write_qc_study(tmp_path)
    table = qc.gather(pd.read_csv(tmp_path / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False), preproc,
                      exclusions.read_table(tmp_path / "excluded.tsv"))
    table.to_csv(tmp_path / "qc.tsv", sep="\t", index=False)
    page = "\n".join(qc_sections(tmp_path / "qc.tsv", 0.5))
    assert f"1 pair(s) of images of one participant (1 participant(s)); correlation of their preprocessed images " \
           f"inside the template brain median {expected:.3f}" in page
