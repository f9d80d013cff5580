import hashlib
import os

import pandas as pd
import pytest

from pipeline import ingest
from pipeline.errors import InputError

FILTERS = {"suffix": "T1w", "datatype": "anat", "extension": [".nii", ".nii.gz"]}


def tree_digest(root):
    return {p: hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_targets_are_joined_by_participant_id_not_row_order(small_bids, tmp_path):
    manifest, report = ingest.ingest(small_bids, "age", "regression", FILTERS, database_dir=tmp_path / "db")
    ages = dict(zip(manifest["image_id"], manifest["age"]))
    assert ages == {"sub-01": "25.0", "sub-03_ses-01": "70.5", "sub-03_ses-02": "70.5", "sub-04": "40"}
    assert set(manifest["session"]) == {"", "ses-01", "ses-02"}
    assert manifest.loc[manifest["image_id"] == "sub-03_ses-02", "subdir"].item() == "sub-03/ses-02"


def test_exclusions_are_reported_with_reasons(small_bids):
    _, report = ingest.ingest(small_bids, "age", "regression", FILTERS)
    reasons = dict(zip(report["participant_id"], report["reason"]))
    assert "missing" in reasons["sub-02"]
    assert "no image" in reasons["sub-05"]


def test_unreadable_nifti_is_excluded_and_named(small_bids):
    broken = small_bids / "sub-04" / "anat" / "sub-04_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    manifest, report = ingest.ingest(small_bids, "age", "regression", FILTERS)
    assert "sub-04" not in set(manifest["participant_id"])
    row = report[report["image_id"] == "sub-04"].iloc[0]
    assert row["path"].endswith("sub-04_T1w.nii.gz") and "unreadable" in row["reason"]


def test_missing_target_column_names_file_and_columns(small_bids):
    with pytest.raises(InputError, match=r"participants\.tsv has no column 'height'.*age, group"):
        ingest.ingest(small_bids, "height", "regression", FILTERS)


def test_duplicate_participant_rows_are_an_error(small_bids):
    tsv = small_bids / "participants.tsv"
    tsv.write_text(tsv.read_text() + "sub-01\t30\tcontrol\n")
    with pytest.raises(InputError, match="row 3 .*row 7"):
        ingest.read_participants(small_bids)


def test_include_exclude_accept_ids_with_or_without_prefix(small_bids):
    manifest, _ = ingest.ingest(small_bids, "age", "regression", FILTERS, include=["01", "sub-03"], exclude=["03"])
    assert manifest["participant_id"].tolist() == ["sub-01"]


def test_classification_keeps_string_targets(small_bids):
    manifest, report = ingest.ingest(small_bids, "group", "classification", FILTERS)
    assert set(manifest["group"]) == {"patient", "control"}
    assert "sub-02" in set(manifest["participant_id"])


def test_dataset_is_never_written_and_cache_follows_changes(small_bids, tmp_path):
    before = tree_digest(small_bids)
    db = tmp_path / "db"
    first, _ = ingest.ingest(small_bids, "age", "regression", FILTERS, database_dir=db)
    assert tree_digest(small_bids) == before
    # a new image is picked up although a cached index exists
    new = small_bids / "sub-05" / "anat"
    new.mkdir(parents=True)
    (new / "sub-05_T1w.nii.gz").write_bytes((small_bids / "sub-01" / "anat" / "sub-01_T1w.nii.gz").read_bytes())
    second, _ = ingest.ingest(small_bids, "age", "regression", FILTERS, database_dir=db)
    assert len(second) == len(first) + 1


def test_cli_fails_with_message_not_traceback(small_bids, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main([str(small_bids), "--target", "weight", "--task", "regression",
                     "--manifest", str(tmp_path / "m.tsv"), "--report", str(tmp_path / "r.tsv")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ERROR:" in err and "weight" in err and "Traceback" not in err


def test_tree_fingerprint_follows_files_not_touches(small_bids):
    from pipeline.fingerprint import tree_fingerprint

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
