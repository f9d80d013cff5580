"""The workflow's input functions (pipeline.intake.workflowinputs), without Snakemake."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.common import config
from pipeline.intake import recipe, workflowinputs


def write_manifest(path, rows):
    header = ["image_id", "subdir", "path", "path_FLAIR"]
    path.write_text("\n".join("\t".join(r) for r in [header, *rows]) + "\n")
    return path


def test_the_manifest_turns_into_each_samples_paths(tmp_path):
    path = write_manifest(tmp_path / "manifest.tsv", [["sub-01_ses-1", "sub-01/ses-1", "a/t1.nii", "a/flair.nii"],
                                                       ["sub-02", "sub-02", "b/t1.nii", "b/flair.nii"]])
    rows = workflowinputs.read_manifest(path)
    assert workflowinputs.source_images(rows, "sub-02", ["T1w", "FLAIR"]) == ["b/t1.nii", "b/flair.nii"]
    with pytest.raises(ValueError, match="sub-03 is not in the manifest"):
        workflowinputs.source_images(rows, "sub-03", ["T1w"])
    arrays = workflowinputs.preprocessed(rows, "work/derivatives/pipeline", "array", ["T1w"], False)
    assert arrays[0] == "work/derivatives/pipeline/sub-01/ses-1/anat/sub-01_ses-1_space-MNI152NLin2009aSym_desc-preproc_T1w.npy"
    assert workflowinputs.preproc_root(rows, arrays) == "work/derivatives/pipeline"
    assert workflowinputs.exclusion_records(rows, "d")[1] == "d/sub-02/anat/sub-02_desc-preproc_excluded.tsv"
    # a rewritten manifest is read again, not served from the cache
    write_manifest(path, [["sub-09", "sub-09", "c/t1.nii", "c/flair.nii"]])
    os.utime(path, ns=(1, 1))
    assert list(workflowinputs.read_manifest(path).index) == ["sub-09"]


def test_ingest_reads_the_tables_that_exist(tmp_path):
    (tmp_path / "participants.tsv").write_text("participant_id\n")
    (tmp_path / "sub-01").mkdir()
    (tmp_path / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\n")
    assert workflowinputs.ingest_tables(str(tmp_path), None, "participants") == [str(tmp_path / "participants.tsv")]
    assert len(workflowinputs.ingest_tables(str(tmp_path), None, "sessions")) == 2
    assert workflowinputs.ingest_tables(str(tmp_path), {"table": "missing.tsv"}, "participants") == []
    before = workflowinputs.dataset_fingerprint(str(tmp_path), ["derivatives/labels"])
    (tmp_path / "sub-01" / "anat").mkdir()
    (tmp_path / "sub-01" / "anat" / "sub-01_T1w.nii").write_bytes(b"1")
    assert workflowinputs.dataset_fingerprint(str(tmp_path), ["derivatives/labels"]) != before


def test_apply_modes_package_must_be_readable_and_of_the_configs_recipe(tmp_path):
    study = recipe.from_config(config.defaults(["preprocess"]), {"T1w": {"suffix": "T1w"}}, {})
    with pytest.raises(ValueError, match="not a readable model package.*bids-deepstudy fetch"):
        workflowinputs.package_spec(str(tmp_path), study)
    (tmp_path / "spec.json").write_text(json.dumps({"task": "regression"}))
    (tmp_path / "preprocessing.json").write_text(json.dumps(study))
    assert workflowinputs.package_spec(str(tmp_path), study) == {"task": "regression"}
    (tmp_path / "preprocessing.json").write_text(json.dumps({**study, "resolution": study["resolution"] * 2}))
    with pytest.raises(ValueError, match="differ from the recipe"):
        workflowinputs.package_spec(str(tmp_path), study)
