import json
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from conftest import ingested, tiny_nifti, tree_digest, write_tree

from conftest import stage_config
from pipeline.common import config
from pipeline.intake import ingest
from pipeline.intake import reportrows
from pipeline.intake import selection
from pipeline.intake import targets
from pipeline.common.errors import InputError

FILTERS = {"suffix": "T1w", "datatype": "anat", "extension": [".nii", ".nii.gz"]}


def test_targets_are_joined_by_participant_id_not_row_order(small_bids, tmp_path):
    manifest, report, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS, cache_dir=tmp_path / "db")
    ages = dict(zip(manifest["image_id"], manifest["age"]))
    assert ages == {"sub-01": "25.0", "sub-03_ses-01": "70.5", "sub-03_ses-02": "70.5", "sub-04": "40"}
    assert set(manifest["session"]) == {"", "ses-01", "ses-02"}
    assert manifest.loc[manifest["image_id"] == "sub-03_ses-02", "subdir"].item() == "sub-03/ses-02"


def test_exclusions_are_reported_with_reasons(small_bids):
    _, report, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS)
    reasons = dict(zip(report["participant_id"], report["reason"]))
    assert "missing" in reasons["sub-02"]
    assert "no image" in reasons["sub-05"]


def test_unreadable_nifti_is_excluded_and_named(small_bids):
    broken = small_bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    manifest, report, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS)
    assert "sub-04" not in set(manifest["participant_id"])
    row = report[report["image_id"] == "sub-04"].iloc[0]
    assert row["path"].endswith("sub-04_T1w.nii.gz") and "unreadable" in row["reason"]


def test_missing_target_column_names_file_and_columns(small_bids):
    with pytest.raises(InputError, match=r"participants\.tsv has no column 'height'.*age, group"):
        ingested(small_bids, "height", "regression", bids_filters=FILTERS)


def test_duplicate_participant_rows_are_an_error(small_bids):
    tsv = small_bids / "participants.tsv"
    tsv.write_text(tsv.read_text() + "sub-01\t30\tcontrol\n")
    with pytest.raises(InputError, match="row 3 .*row 7"):
        targets.read_participants(small_bids)


def test_include_exclude_accept_ids_with_or_without_prefix(small_bids):
    manifest, _, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS,
                              participants={"include": ["01", "sub-03"], "exclude": ["03"]})
    assert manifest["participant_id"].tolist() == ["sub-01"]


def test_classification_keeps_string_targets(small_bids):
    manifest, report, _ = ingested(small_bids, "group", "classification", bids_filters=FILTERS)
    assert set(manifest["group"]) == {"patient", "control"}
    assert "sub-02" in set(manifest["participant_id"])


def test_dataset_is_never_written_and_cache_follows_changes(small_bids, tmp_path):
    before = tree_digest(small_bids)
    db = tmp_path / "db"
    first, _, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS, cache_dir=db)
    assert tree_digest(small_bids) == before
    # a new image is picked up although a cached index exists
    new = small_bids / "sub-05" / "anat"
    new.mkdir(parents=True)
    (new / "sub-05_T1w.nii.gz").write_bytes((small_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes())
    second, _, _ = ingested(small_bids, "age", "regression", bids_filters=FILTERS, cache_dir=db)
    assert len(second) == len(first) + 1


def test_cli_fails_with_message_not_traceback(small_bids, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(["--config", stage_config(bids_dir=str(small_bids), target="weight"),
                     "--manifest", str(tmp_path / "m.tsv"), "--report", str(tmp_path / "r.tsv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ERROR:" in err and "weight" in err and "Traceback" not in err


def test_tree_fingerprint_follows_files_not_touches(small_bids):
    from pipeline.common.fingerprint import tree_fingerprint

    image = small_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    listing, stamped = tree_fingerprint(small_bids, mtimes=False), tree_fingerprint(small_bids)
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert tree_fingerprint(small_bids, mtimes=False) == listing  # touching keeps the listing
    assert tree_fingerprint(small_bids) != stamped  # but invalidates the pybids cache stamp
    (small_bids / "derivatives").mkdir()
    (small_bids / "derivatives" / "x.txt").write_text("ignored")
    assert tree_fingerprint(small_bids, mtimes=False) == listing
    (small_bids / "sub-05" / "anat").mkdir(parents=True)
    (small_bids / "sub-05" / "anat" / "sub-05_T1w.nii.gz").write_bytes(image.read_bytes())
    assert tree_fingerprint(small_bids, mtimes=False) != listing


# --- bad input: each fails (or reports) naming the file, row or key --------------------------

def test_bids_dir_that_is_missing_or_a_file(tmp_path):
    with pytest.raises(InputError, match=r"bids_dir .*nowhere does not exist\. Set `bids_dir`"):
        ingested(tmp_path / "nowhere", "age", "regression")
    (tmp_path / "file.tsv").write_text("x")
    with pytest.raises(InputError, match=r"file\.tsv is a file, not a folder"):
        ingested(tmp_path / "file.tsv", "age", "regression")


def test_not_a_bids_folder_points_at_the_dataset_inside(small_bids):
    parent = small_bids.parent
    with pytest.raises(InputError, match=rf"{parent} is not a BIDS dataset: no dataset_description\.json and no "
                                         rf"sub-\* folders\..* Did you mean {small_bids}\?"):
        ingested(parent, "age", "regression")


def test_missing_dataset_description_is_named_and_never_written(small_bids):
    (small_bids / "dataset_description.json").unlink()
    with pytest.raises(InputError, match=r"has no dataset_description\.json, which a BIDS dataset needs at its root"):
        ingested(small_bids, "age", "regression")
    assert not (small_bids / "dataset_description.json").exists()


def test_empty_dataset(tmp_path):
    root = write_tree(tmp_path / "empty", [], participants="participant_id\tage\n")
    with pytest.raises(InputError, match=r"empty BIDS dataset: it has no sub-\* folders"):
        ingested(root, "age", "regression")
    write_tree(root, ["sub-01/anat/sub-01_T1w.json"])
    with pytest.raises(InputError, match=r"holds no NIfTI image \(\.nii or \.nii\.gz\) under its sub-\* folders"):
        ingested(root, "age", "regression")


def test_participants_tsv_without_id_column(small_bids):
    tsv = small_bids / "participants.tsv"
    tsv.write_text(tsv.read_text().replace("participant_id", "subject"))
    with pytest.raises(InputError, match=r"participants\.tsv has no 'participant_id' column \(columns: subject, age, group\)"):
        ingested(small_bids, "age", "regression")


def test_images_without_participants_row_are_reported_not_fatal(small_bids):
    tiny_nifti(small_bids / "sub-09" / "anat" / "sub-09_T1w.nii.gz")
    manifest, report, _ = ingested(small_bids, "age", "regression")
    assert "sub-09" not in set(manifest["participant_id"]) and len(manifest) == 4
    row = report.set_index("image_id").loc["sub-09"]
    assert row["reason"].startswith("participant not listed in participants.tsv") and row["path"].endswith("sub-09_T1w.nii.gz")


def test_zero_byte_image_is_excluded_and_the_rest_kept(small_bids):
    (small_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").write_bytes(b"")
    manifest, report, _ = ingested(small_bids, "age", "regression")
    assert manifest["image_id"].tolist() == ["sub-03_ses-01", "sub-03_ses-02", "sub-04"]
    assert report.set_index("image_id").loc["sub-01", "reason"].startswith("zero-byte file")


def test_unknown_entity_in_config_fails_before_reading(small_bids):
    with pytest.raises(InputError, match=r"Unknown BIDS entity 'sequence' in bids_filters\. Valid entities: subject, session"):
        ingested(small_bids, "age", "regression", bids_filters={"sequence": "mprage"})


def test_filters_that_select_nothing_show_what_exists(small_bids):
    with pytest.raises(InputError, match=r"bids_filters \+ channels\.FLAIR selects no file: none has suffix 'FLAIR'; "
                                         r"the dataset has 5 NIfTI files under sub-\*/, with suffix: 'T1w' \(5 files\)\."):
        ingested(small_bids, "age", "regression", channels={"FLAIR": {"suffix": "FLAIR"}})


def test_target_values_missing_or_not_numbers(small_bids):
    tsv = small_bids / "participants.tsv"
    tsv.write_text(tsv.read_text().replace("sub-04\t40", "sub-04\tforty").replace("sub-01\t25.0", "sub-01\tinf"))
    manifest, report, _ = ingested(small_bids, "age", "regression")
    reasons = dict(zip(report["participant_id"], report["reason"]))
    assert reasons["sub-04"].startswith("target 'age' is not a number ('forty')")
    assert reasons["sub-01"].startswith("target 'age' is not a finite number ('inf')")
    assert reasons["sub-02"].startswith("target 'age' is missing (n/a)")
    assert set(manifest["participant_id"]) == {"sub-03"}


# --- selection -------------------------------------------------------------------------------

def acquisitions(root):
    """sub-01 with two acquisitions, sub-02 with one, sub-03 with none; ages in participants.tsv."""
    files = ["sub-01/anat/sub-01_acq-fast_T1w.nii.gz", "sub-01/anat/sub-01_acq-slow_T1w.nii.gz",
             "sub-02/anat/sub-02_acq-fast_T1w.nii.gz", "sub-03/anat/sub-03_T1w.nii.gz"]
    return write_tree(root, files, files, "participant_id\tage\nsub-01\t30\nsub-02\t40\nsub-03\t50\n")


def test_image_ids_carry_the_entities_that_tell_a_participants_images_apart(tmp_path):
    manifest, _, _ = ingested(acquisitions(tmp_path / "ds"), "age", "regression")
    assert manifest["image_id"].tolist() == ["sub-01_acq-fast", "sub-01_acq-slow", "sub-02", "sub-03"]
    assert manifest["image_id"].str.fullmatch(selection.IMAGE_ID.pattern).all()


def test_absent_entity_list_and_regex_filters(tmp_path):
    root = acquisitions(tmp_path / "ds")
    defaults = config.defaults(["bids_filters"])
    ids = lambda filters: ingested(root, "age", "regression",  # noqa: E731
                                   bids_filters={**defaults, **filters}).manifest["image_id"].tolist()
    assert ids({"acquisition": None}) == ["sub-03"]
    assert ids({"acquisition": [None, "slow"]}) == ["sub-01", "sub-03"]
    assert ids({"acquisition": {"regex": "f.*"}}) == ["sub-01", "sub-02"]


def test_two_files_for_one_sample_are_reported_with_both_paths(tmp_path):
    root = acquisitions(tmp_path / "ds")
    tiny_nifti(root / "sub-03" / "anat" / "sub-03_T1w.nii")
    manifest, report, _ = ingested(root, "age", "regression")
    assert "sub-03" not in set(manifest["participant_id"])
    reasons = report.loc[report["image_id"] == "sub-03", "reason"]
    assert len(reasons) == 2 and "sub-03_T1w.nii, " in reasons.iloc[0] and "narrow bids_filters or channels.T1w" in reasons.iloc[0]


def test_named_session_that_does_not_exist_lists_the_sessions(small_bids):
    with pytest.raises(InputError, match=r"No image is left after `sessions: ses-03` and `runs: all`\. Sessions: "
                                         r"absent \(3 files\), '01' \(1 file\), '02' \(1 file\)"):
        ingested(small_bids, "age", "regression", sessions="ses-03")


def test_policy_losses_are_reported_per_participant(small_bids):
    manifest, report, _ = ingested(small_bids, "age", "regression", sessions="02")
    assert manifest["image_id"].tolist() == ["sub-03_ses-02"]
    reasons = dict(zip(report["participant_id"], report["reason"]))
    assert reasons["sub-01"] == "no image left after sessions: 02, runs: all"
    assert reasons["sub-05"].startswith("participant has no image matching the filters")


def test_sessions_tsv_targets_joined_by_participant_and_session(small_bids):
    (small_bids / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tage\n02\t72.5\nses-01\t70.5\n")
    (small_bids / "sub-04" / "sub-04_sessions.tsv").write_text("session_id\tage\nses-01\t41\n")
    manifest, report, targets = ingested(small_bids, "age", "regression", target_source="sessions")
    assert dict(zip(manifest["image_id"], manifest["age"])) == {"sub-03_ses-01": "70.5", "sub-03_ses-02": "72.5"}
    assert manifest.columns.tolist() == selection.MANIFEST_COLUMNS + ["age", "group"]  # participants' other columns follow
    reasons = dict(zip(report["image_id"], report["reason"]))
    assert reasons["sub-01"] == ("no sub-01/sub-01_sessions.tsv (target_source: sessions); set `target_fallback: "
                                 "participants` to take its target from participants.tsv")
    assert reasons["sub-04"] == "image has no session, so it has no row in a sessions.tsv (target_source: sessions)"
    assert targets["source"] == "sessions.tsv" and "rows_from" not in targets


def test_participants_without_a_sessions_table_fall_back_to_participants_tsv(small_bids):
    """Only the two-session participant has a sessions.tsv; the others keep their participants.tsv age."""
    (small_bids / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tage\n02\t72.5\nses-01\t70.5\n")
    manifest, report, targets = ingested(small_bids, "age", "regression", target_source="sessions",
                                         target_fallback="participants")
    assert dict(zip(manifest["image_id"], manifest["age"])) == {
        "sub-01": "25.0", "sub-03_ses-01": "70.5", "sub-03_ses-02": "72.5", "sub-04": "40"}
    assert manifest.columns.tolist() == selection.MANIFEST_COLUMNS + ["age", "group"]
    assert set(manifest["group"]) == {"control", "patient"}
    assert targets["rows_from"] == {"sessions.tsv": 2, "participants.tsv": 2}
    reasons = dict(zip(report["image_id"], report["reason"]))
    assert reasons["sub-02"].startswith("target 'age' is missing (n/a)")  # participants.tsv's n/a still counts


def test_fallback_without_participants_tsv_says_what_to_add(small_bids):
    (small_bids / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tage\n02\t72.5\nses-01\t70.5\n")
    (small_bids / "participants.tsv").unlink()
    with pytest.raises(InputError, match=r"target_fallback: participants.*participants\.tsv.*sub-01.*Add the file"):
        ingested(small_bids, "age", "regression", target_source="sessions", target_fallback="participants")


def test_positive_class_must_be_a_class_of_the_target(small_bids):
    targets = ingested(small_bids, "group", "classification", positive_class="patient").targets
    assert targets["classes"] == ["control", "patient"] and targets["positive_class"] == "patient"
    with pytest.raises(InputError, match=r"`positive_class` is 'AD'.*choose one of: control, patient"):
        ingested(small_bids, "group", "classification", positive_class="AD")


def test_duplicate_session_rows_are_an_error(small_bids):
    (small_bids / "sub-03" / "sub-03_sessions.tsv").write_text("session_id\tage\nses-01\t70\n01\t71\n")
    with pytest.raises(InputError, match=r"sub-03_sessions\.tsv lists a session more than once: row 2 \(ses-01\), row 3 \(ses-01\)"):
        ingested(small_bids, "age", "regression", target_source="sessions")


def test_data_check_only_when_asked(small_bids):
    image = small_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), image)
    assert "sub-01" in set(ingested(small_bids, "age", "regression", check_data=False).manifest["participant_id"])
    _, report, _ = ingested(small_bids, "age", "regression")
    assert report.set_index("image_id").loc["sub-01", "reason"].startswith("image is constant (every voxel is 0)")


# --- non-BIDS folders ------------------------------------------------------------------------

def non_bids_folder(root):
    """ADNI-style ids with underscores, T1 and FLAIR per id (no FLAIR for one), a CSV table."""
    for i in ("002_S_0295", "002_S_0413", "011_S_0002"):
        tiny_nifti(root / "images" / f"{i}_t1.nii.gz")
        if i != "011_S_0002":
            tiny_nifti(root / "flair" / i / "scan.nii")
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "demographics.csv").write_text("subject,age,dx\n002_S_0295,71,CN\n011_S_0002,n/a,AD\n002_S_0413,80,AD\n")
    return root


def test_non_bids_pattern_and_table_give_the_same_manifest(tmp_path):
    root = non_bids_folder(tmp_path / "raw")
    spec = {"pattern": "images/{id}_t1.nii.gz", "table": "demographics.csv", "id_column": "subject"}
    manifest, report, targets = ingested(root, "age", "regression", non_bids=spec)
    assert manifest.columns.tolist() == selection.MANIFEST_COLUMNS + ["subject", "age", "dx"]
    assert manifest[["image_id", "participant_id", "session", "subdir", "subject", "age"]].values.tolist() == [
        ["sub-002S0295", "sub-002S0295", "", "sub-002S0295", "002_S_0295", "71"],
        ["sub-002S0413", "sub-002S0413", "", "sub-002S0413", "002_S_0413", "80"]]
    assert report.set_index("participant_id").loc["sub-011S0002", "reason"].startswith("target 'age' is missing (n/a)")
    assert targets == {"target": "age", "task": "regression", "source": "demographics.csv", "classes": None}


def test_non_bids_channels_from_a_pattern_mapping(tmp_path):
    root = non_bids_folder(tmp_path / "raw")
    spec = {"pattern": {"T1": "images/{id}_t1.nii.gz", "FLAIR": "flair/{id}/*.nii"}, "table": str(root / "demographics.csv"),
            "id_column": "subject"}
    manifest, report, targets = ingested(root, "dx", "classification", non_bids=spec)
    assert manifest["path_FLAIR"].tolist() == [str(root / "flair/002_S_0295/scan.nii"), str(root / "flair/002_S_0413/scan.nii")]
    assert report.set_index("participant_id").loc["sub-011S0002", "reason"] == "no FLAIR image for this id (non_bids.pattern.FLAIR)"
    assert targets["classes"] == ["AD", "CN"]


def test_non_bids_errors_name_the_key(tmp_path):
    root = non_bids_folder(tmp_path / "raw")
    spec = {"pattern": "images/{id}_t1.nii.gz", "table": "demographics.csv", "id_column": "subject"}
    with pytest.raises(InputError, match=r"non_bids\.pattern 'images/\*_t1\.nii\.gz' has no \{id\}"):
        ingested(root, "age", "regression", non_bids={**spec, "pattern": "images/*_t1.nii.gz"})
    with pytest.raises(InputError, match=r"non_bids pattern 'scans/\{id\}\.nii' \(channel T1w\) matches no file"):
        ingested(root, "age", "regression", non_bids={**spec, "pattern": "scans/{id}.nii"})
    with pytest.raises(InputError, match=r"demographics\.csv has no id column 'ID' \(non_bids\.id_column\); columns: subject, age, dx"):
        ingested(root, "age", "regression", non_bids={**spec, "id_column": "ID"})
    tiny_nifti(root / "images" / "002-S-0295_t1.nii.gz")
    with pytest.raises(InputError, match=r"ids 002-S-0295, 002_S_0295 all become participant sub-002S0295"):
        ingested(root, "age", "regression", non_bids=spec)


# --- outputs and the command line ------------------------------------------------------------

def test_cli_writes_manifest_report_and_targets(small_bids, tmp_path):
    before = tree_digest(small_bids)
    out = tmp_path / "results"
    keys = {"bids_dir": str(small_bids), "target": "group", "task": "classification", "bids_filters": FILTERS,
            "sessions": "last", "check_data": False, "participants": {"include": [], "exclude": ["sub-04"]}}
    ingest.main(["--config", stage_config(**keys), "--cache-dir", str(out / "cache"),
                 "--manifest", str(out / "manifest.tsv"), "--report", str(out / "report.tsv"), "--targets", str(out / "t.json")])
    manifest = pd.read_csv(out / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert manifest["image_id"].tolist() == ["sub-01", "sub-02", "sub-03_ses-02"]
    assert pd.read_csv(out / "report.tsv", sep="\t").columns.tolist() == reportrows.REPORT_COLUMNS
    assert json.loads((out / "t.json").read_text()) == {"target": "group", "task": "classification",
                                                        "source": "participants.tsv", "classes": ["control", "patient"]}
    assert tree_digest(small_bids) == before


def test_regression_on_a_text_column_says_to_classify_instead_of_a_traceback(tmp_path):
    from conftest import write_bids

    rows = [{"participant_id": f"sub-0{i}", "group": "ab"[i % 2]} for i in range(1, 5)]
    root = write_bids(tmp_path / "bids", rows, {f"sub-0{i}": [""] for i in range(1, 5)})
    with pytest.raises(InputError, match="(?s)not a number.*Every value of 'group' is text.*task: classification"):
        ingested(root, "group", "regression")
