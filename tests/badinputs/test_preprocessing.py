"""Bad inputs that only preprocessing finds: the sample is excluded and listed (on_error: continue)
or ends the run naming its file (stop); either way no partial output is left behind."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from pipeline.intake import exclusions
from pipeline.intake import grid
from pipeline.intake import imagecheck
from pipeline.intake import preprocess
from pipeline.common.errors import InputError


@pytest.fixture(scope="module")
def coarse_grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    grid.write_grid(8.0, (20, 24, 20), d / "tpl.nii.gz", d / "mask.nii.gz")
    settings = preprocess.PreprocessSettings.of({"n4": False, "brain_extraction": "none",
                                                 "registration_resolution": None})
    return {"template": d / "tpl.nii.gz", "mask": d / "mask.nii.gz", "settings": settings}


def spike(path: Path) -> Path:
    """An image every ingest check passes (finite, not constant) that cannot be scaled or
    registered: all voxels 0 but one."""
    data = np.zeros((12, 14, 12), np.float32)
    data[6, 7, 6] = 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def noise(path: Path) -> Path:
    data = np.random.default_rng(0).normal(100, 10, (12, 14, 12)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return path


def registration_fails(monkeypatch):
    import ants

    def fail(*args, **kwargs):
        raise RuntimeError("antsRegistration exited with code 1: metric value is NaN")

    monkeypatch.setattr(ants, "registration", fail)


@pytest.mark.parametrize("fault", ["unscalable_image", "registration_fails"])
def test_failed_sample_is_recorded_and_leaves_only_empty_outputs(fault, tmp_path, coarse_grid, monkeypatch):
    source = spike(tmp_path / "sub-04_T1w.nii.gz") if fault == "unscalable_image" else noise(tmp_path / "sub-04_T1w.nii.gz")
    if fault == "registration_fails":
        registration_fails(monkeypatch)
    assert imagecheck.image_problems([str(source)], True) == {str(source): ""}  # ingest lets it through
    out = preprocess.derivative_paths(tmp_path / "out", "sub-04", "sub-04")
    record = tmp_path / "out" / "sub-04_excluded.tsv"
    assert preprocess.preprocess_or_exclude([source], out, "sub-04", "continue", record, **coarse_grid) is None
    row = exclusions.read_table(record).iloc[0]
    assert (row["image_id"], row["participant_id"], row["stage"], row["file"]) == ("sub-04", "sub-04", "preprocess", str(source))
    expected = "99 % of its voxels are 0" if fault == "unscalable_image" else "RuntimeError: antsRegistration exited"
    assert expected in row["reason"] and "participants.exclude" in row["reason"]
    assert all(p.exists() and p.stat().st_size == 0 for p in out.values())  # what Snakemake needs, nothing more


@pytest.mark.parametrize("fault", ["unscalable_image", "registration_fails"])
def test_failed_sample_with_stop_names_the_file_and_leaves_nothing(fault, tmp_path, coarse_grid, monkeypatch):
    source = spike(tmp_path / "sub-04_T1w.nii.gz") if fault == "unscalable_image" else noise(tmp_path / "sub-04_T1w.nii.gz")
    if fault == "registration_fails":
        registration_fails(monkeypatch)
    out = preprocess.derivative_paths(tmp_path / "out", "sub-04", "sub-04")
    with pytest.raises(InputError, match=str(source)):
        preprocess.preprocess_or_exclude([source], out, "sub-04", "stop", tmp_path / "out" / "x.tsv", **coarse_grid)
    assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_a_good_sample_writes_an_empty_record(tmp_path, coarse_grid):
    out = preprocess.derivative_paths(tmp_path / "out", "sub-01", "sub-01")
    record = tmp_path / "out" / "sub-01_excluded.tsv"
    # Noise registers to nothing (r about 0): preprocess.qc_min (tests/test_qc.py) is off to see the success path.
    settings = {**coarse_grid, "settings": replace(coarse_grid["settings"], qc_min=None)}
    assert preprocess.preprocess_or_exclude([noise(tmp_path / "a.nii.gz")], out, "sub-01", "continue", record, **settings)
    assert exclusions.read_table(record).empty and all(p.stat().st_size > 0 for p in out.values())


def test_excluded_tsv_gathers_both_stages_and_samples_tsv_drops_them(tmp_path):
    report = pd.DataFrame([["sub-05", "", "", "participant has no image matching the filters"]],
                          columns=["participant_id", "image_id", "path", "reason"])
    report.to_csv(tmp_path / "ingest_report.tsv", sep="\t", index=False)
    exclusions.write(exclusions.record("sub-04", "sub-04", "preprocess", "/x/sub-04_T1w.nii.gz", "failed"), tmp_path / "r4.tsv")
    exclusions.write(exclusions.empty(), tmp_path / "r1.tsv")
    manifest = pd.DataFrame({"image_id": ["sub-01", "sub-04"], "participant_id": ["sub-01", "sub-04"]})
    manifest.to_csv(tmp_path / "manifest.tsv", sep="\t", index=False)
    exclusions.main(["--ingest-report", str(tmp_path / "ingest_report.tsv"), "--records", str(tmp_path / "r1.tsv"),
                     str(tmp_path / "r4.tsv"), "--manifest", str(tmp_path / "manifest.tsv"),
                     "--out", str(tmp_path / "excluded.tsv"), "--samples", str(tmp_path / "samples.tsv")])
    excluded = exclusions.read_table(tmp_path / "excluded.tsv")
    assert excluded[["participant_id", "stage"]].values.tolist() == [["sub-05", "ingest"], ["sub-04", "preprocess"]]
    assert exclusions.read_table(tmp_path / "samples.tsv")["image_id"].tolist() == ["sub-01"]


def test_report_shows_an_excluded_samples_empty_qc_as_a_note(tmp_path):
    from pipeline.results.report import embed_png

    (tmp_path / "sub-04_desc-qc_T1w.png").write_bytes(b"")
    assert "excluded" in embed_png(tmp_path / "sub-04_desc-qc_T1w.png", "sub-04") and "<img" not in embed_png(
        tmp_path / "sub-04_desc-qc_T1w.png", "sub-04")


def test_evaluation_summary_lists_the_excluded_samples(tmp_path):
    from test_evaluate import fold_dir

    from pipeline.results.evaluate import summarise

    folds = [fold_dir(tmp_path, f"fold-{k}", [0.0, 22.0, 38.0, 64.0, 76.0]) for k in (1, 2)]
    table = pd.concat([exclusions.record("", "sub-9", "ingest", "", "participant has no image ..."),
                       exclusions.record("sub-6", "sub-6", "preprocess", "/x/sub-6_T1w.nii.gz", "registration failed")])
    exclusions.write(table, tmp_path / "excluded.tsv")
    summary = summarise(folds, tmp_path / "summary", tmp_path / "excluded.tsv")
    assert summary["excluded"] == {"ingest": ["sub-9"], "preprocess": ["sub-6"]}
    assert json.loads((tmp_path / "summary" / "metrics.json").read_text())["excluded"] == summary["excluded"]
