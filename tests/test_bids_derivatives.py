"""BIDS-Derivatives that validate (issue #19): desc labels, NIfTI headers, BIDS URIs, the derivatives'
description, and the input dataset's validation (bids-validator-deno) with its skip switches.

The study's own derivatives are validated end to end in tests/test_workflow.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bids.layout import parse_file_entities

from conftest import tree_digest
from pipeline.common import atomic, launch
from pipeline.common.paths import desc, explanation_maps, group_figure, group_map
from pipeline.intake import bidsvalidation
from pipeline.intake.derivatives import IGNORED, bids_uri, dataset_description, write_dataset_files
from pipeline.results.attribution import METHODS

needs_validator = pytest.mark.skipif(bidsvalidation.find_validator() is None,
                                     reason="bids-validator-deno is not installed (it is in requirements.lock)")


def test_desc_labels_are_letters_and_digits_and_name_every_map_file():
    assert desc("integrated_gradients") == "integratedgradients" and desc("occlusion") == "occlusion"
    labels = [desc(m) for m in METHODS]
    assert all(re.fullmatch(r"[A-Za-z0-9]+", label) for label in labels) and len(set(labels)) == len(labels)
    for method in METHODS:
        names = [*explanation_maps("out", "sub-01/ses-1", "sub-01_ses-1", method).values(),
                 group_map("out", method), group_figure("out", method, "slices")]
        for name in names:
            assert parse_file_entities(name)["desc"] == desc(method), name  # pybids reads the whole label
    with pytest.raises(ValueError, match="no letter or digit"):
        desc("_-_")


def test_every_nifti_written_has_coded_qform_and_sform_and_mm_units(tmp_path):
    affine = np.array([[4.0, 0, 0, -78], [0, 4, 0, -112], [0, 0, 4, -70], [0, 0, 0, 1]])
    atomic.nib_save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine), tmp_path / "plain.nii.gz")
    saved = nib.load(tmp_path / "plain.nii.gz")
    assert int(saved.header["qform_code"]) > 0 and int(saved.header["sform_code"]) > 0
    assert saved.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(saved.affine, affine)
    np.testing.assert_allclose(saved.get_qform(), affine, atol=1e-5)
    mni = nib.Nifti1Image(np.zeros((2, 2, 2), np.uint8), affine)  # codes and units already set are kept
    mni.set_sform(affine, code=4)
    mni.header.set_xyzt_units("micron")
    atomic.nib_save(mni, tmp_path / "mni.nii.gz")
    saved = nib.load(tmp_path / "mni.nii.gz")
    assert (int(saved.header["sform_code"]), int(saved.header["qform_code"])) == (4, 4)
    assert saved.header.get_xyzt_units()[0] == "micron"


def test_sources_are_bids_uris_into_the_raw_dataset(tmp_path):
    raw = tmp_path / "raw"
    assert bids_uri(raw / "sub-01" / "anat" / "sub-01_T1w.nii.gz", raw) == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    assert bids_uri(tmp_path / "elsewhere.nii.gz", raw) == (tmp_path / "elsewhere.nii.gz").resolve().as_uri()
    description = dataset_description(raw)
    assert description["DatasetType"] == "derivative" and description["DatasetLinks"] == {"raw": raw.resolve().as_uri()}
    from pipeline import __version__
    assert description["GeneratedBy"][0]["Version"] == __version__
    paths = write_dataset_files(tmp_path / "derivatives", raw)
    assert json.loads(paths["description"].read_text()) == description
    assert paths["bidsignore"].read_text().split() == list(IGNORED)


def tiny_dataset(root: Path) -> Path:
    """A valid two-participant BIDS dataset (README, authors, coded headers: no error)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.10.0",
                                                               "Authors": ["A", "B"]}))
    (root / "README").write_text("A tiny dataset written by a test.\n")
    (root / "participants.tsv").write_text("participant_id\tage\nsub-01\t30\nsub-02\t40\n")
    for i, pid in enumerate(("sub-01", "sub-02")):
        data = np.random.default_rng(i).normal(100, 10, (8, 8, 8)).astype(np.float32)
        (root / pid / "anat").mkdir(parents=True)
        atomic.nib_save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), root / pid / "anat" / f"{pid}_T1w.nii.gz")
    return root


def validate_main(tmp_path, bids_dir: Path, **keys) -> tuple[dict, str]:
    out = tmp_path / "bids_validation.json"
    bidsvalidation.main(["--config", json.dumps({"bids_dir": str(bids_dir), "non_bids": None, **keys}), "--out", str(out)])
    return json.loads(out.read_text()), out


@needs_validator
def test_a_valid_dataset_has_no_error_and_is_never_written(tmp_path, capsys):
    bids = tiny_dataset(tmp_path / "bids")
    before = tree_digest(bids)
    summary, _ = validate_main(tmp_path, bids, bids_validation=True)
    assert summary["errors"] == 0 and summary["validator"] == "bids-validator-deno"
    assert tree_digest(bids) == before and sorted(p.name for p in bids.iterdir()) == sorted(
        ["dataset_description.json", "README", "participants.tsv", "sub-01", "sub-02"])
    assert "0 errors" in capsys.readouterr().err


@needs_validator
def test_a_planted_error_is_named_with_its_file_and_does_not_stop(tmp_path, capsys):
    bids = tiny_dataset(tmp_path / "bids")
    (bids / "sub-01" / "anat" / "scan_notes.txt").write_text("moved at the end\n")  # no BIDS name
    summary, _ = validate_main(tmp_path, bids, bids_validation=True)
    assert summary["errors"] >= 1
    errors = {code: entry for code, entry in summary["codes"].items() if entry["severity"] == "error"}
    assert any("/sub-01/anat/scan_notes.txt" in entry["files"] for entry in errors.values()), errors
    log = capsys.readouterr().err
    assert "the study goes on" in log and any(f"error {code}" in log for code in errors)


def test_validation_is_skipped_when_off_for_non_bids_input_and_without_the_validator(tmp_path, monkeypatch, capsys):
    bids = tmp_path / "missing"  # never looked at when skipped
    summary, _ = validate_main(tmp_path, bids, bids_validation=False)
    assert summary == {"skipped": "bids_validation is false (--skip-bids-validation)"}
    summary, _ = validate_main(tmp_path, bids, bids_validation=True,
                               non_bids={"pattern": "{id}.nii.gz", "table": "t.tsv", "id_column": "id"})
    assert "not BIDS" in summary["skipped"]
    monkeypatch.setattr(bidsvalidation, "find_validator", lambda: None)
    summary, _ = validate_main(tmp_path, bids, bids_validation=True)
    assert "not installed" in summary["skipped"]
    assert capsys.readouterr().err.count("BIDS validation skipped") == 3


def test_skip_flag_of_run_becomes_the_config_value():
    assert launch.skip_validation(["--configfile", "c.yaml", "--skip-bids-validation"]) == [
        "--configfile", "c.yaml", "--config", "bids_validation=False"]
    assert launch.skip_validation(["--config", "a=1", "--skip-bids-validation", "-n"]) == [
        "--config", "bids_validation=False", "a=1", "-n"]
    assert launch.skip_validation(["-n"]) == ["-n"]
    assert "bids_validation=False" in launch.command(["--skip-bids-validation"])
