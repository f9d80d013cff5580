"""Ingest on the structure of public BIDS example datasets, recreated as zero-byte trees.

File names follow bids-standard/bids-examples (ds001, ds114, 7t_trt, synthetic), including their
quirks (ds001's ``M,`` sex, 7t_trt's ``subject_id`` and ``session`` headers, synthetic's missing
participants.tsv). Images the header check must pass hold a tiny real NIfTI; the rest are empty.
"""

import re

import pytest
from conftest import ingested, tiny_nifti, tree_digest, write_tree

from pipeline.common.errors import InputError


def ds001(root):
    """16 participants, no sessions; T1w + inplaneT2, three runs of one task."""
    files = []
    for s in range(1, 17):
        sub = f"sub-{s:02d}"
        files += [f"{sub}/anat/{sub}_T1w.nii.gz", f"{sub}/anat/{sub}_inplaneT2.nii.gz"]
        for r in (1, 2, 3):
            stem = f"{sub}/func/{sub}_task-balloonanalogrisktask_run-{r:02d}"
            files += [f"{stem}_bold.nii.gz", f"{stem}_events.tsv"]
    sexes = "F M F F M, F M M M F F F F F F M".split()
    ages = [26, 24, 27, 20, 22, 26, 24, 21, 26, 21, 24, 22, 21, 30, 24, 19]
    table = "participant_id\tsex\tage\n" + "".join(f"sub-{i + 1:02d}\t{x}\t{a}\n" for i, (x, a) in enumerate(zip(sexes, ages)))
    real = [f for f in files if f.endswith(("_T1w.nii.gz", "_inplaneT2.nii.gz"))]
    return write_tree(root, files, real, table)


def ds114(root):
    """10 participants × sessions test/retest; T1w, dwi and five tasks."""
    files = []
    for s in range(1, 11):
        for ses in ("test", "retest"):
            stem = f"sub-{s:02d}/ses-{ses}"
            name = f"sub-{s:02d}_ses-{ses}"
            files += [f"{stem}/anat/{name}_T1w.nii.gz", f"{stem}/dwi/{name}_dwi.nii.gz", f"{stem}/dwi/{name}_dwi.bval"]
            files += [f"{stem}/func/{name}_task-{t}_bold.nii.gz" for t in (
                "covertverbgeneration", "fingerfootlips", "linebisection", "overtverbgeneration", "overtwordrepetition")]
    hands = "left right right right right left right right right left".split()
    table = "participant_id\tdominant_hand\n" + "".join(f"sub-{i + 1:02d}\t{h}\n" for i, h in enumerate(hands))
    return write_tree(root, files, [f for f in files if f.endswith("_T1w.nii.gz")], table)


def seven_t(root):
    """22 participants × sessions 1/2: anatomy (T1w, T1map) in session 1 only; acq- and run- in func and fmap."""
    files, sessions = [], {}
    for s in range(1, 23):
        sub = f"sub-{s:02d}"
        for ses in ("1", "2"):
            stem, name = f"{sub}/ses-{ses}", f"{sub}_ses-{ses}"
            if ses == "1":
                files += [f"{stem}/anat/{name}_T1w.nii.gz", f"{stem}/anat/{name}_T1map.nii.gz"]
            files += [f"{stem}/fmap/{name}_run-{r}_{k}.nii.gz" for r in (1, 2) for k in ("magnitude1", "magnitude2", "phasediff")]
            files += [f"{stem}/func/{name}_task-rest_acq-fullbrain_run-{r}_bold.nii.gz" for r in (1, 2)]
            files += [f"{stem}/func/{name}_task-rest_acq-prefrontal_bold.nii.gz", f"{stem}/{name}_scans.tsv"]
        sessions[sub] = f"session\thours_of_sleep_last_night\nses-1\t{6 + s % 3}\nses-2\t{7 + s % 2}\n"
    table = "subject_id\tsex\tage_at_first_scan_years\n" + "".join(f"sub-{s:02d}\t{'FM'[s % 2]}\t{20 + s}\n" for s in range(1, 23))
    real = [f for f in files if "/anat/" in f or "magnitude1" in f]
    root = write_tree(root, files, real, table)
    for sub, text in sessions.items():
        (root / sub / f"{sub}_sessions.tsv").write_text(text)
    return root


def synthetic(root):
    """5 participants × 2 sessions, uncompressed .nii, no participants.tsv."""
    files = []
    for s in range(1, 6):
        for ses in ("01", "02"):
            stem, name = f"sub-{s:02d}/ses-{ses}", f"sub-{s:02d}_ses-{ses}"
            files += [f"{stem}/anat/{name}_T1w.nii", f"{stem}/func/{name}_task-rest_bold.nii"]
            files += [f"{stem}/func/{name}_task-nback_run-0{r}_bold.nii" for r in (1, 2)]
    files += ["derivatives/fmriprep/sub-01/ses-01/func/sub-01_ses-01_task-rest_space-T1w_desc-preproc_bold.nii.gz"]
    return write_tree(root, files, [f for f in files if f.endswith("_T1w.nii")])


def fix_header(path, old, new):
    """Rename a column of a test copy's table (the example's own quirk, fixed for the next check)."""
    path.write_text(path.read_text().replace(old, new, 1))


def test_ds001_selects_t1w_per_participant_and_records_classes(tmp_path):
    root = ds001(tmp_path / "ds001")
    manifest, report, targets = ingested(root, "sex", "classification")
    assert len(manifest) == 16 and report.empty
    assert manifest["image_id"].tolist() == [f"sub-{s:02d}" for s in range(1, 17)]
    assert all(p.endswith("_T1w.nii.gz") and p.startswith(str(root.absolute())) for p in manifest["path"])
    assert targets == {"target": "sex", "task": "classification", "source": "participants.tsv",
                       "classes": ["F", "M", "M,"]}  # the dataset's own typo is a class: visible, not hidden


def test_ds001_second_channel(tmp_path):
    root = ds001(tmp_path / "ds001")
    manifest, _, _ = ingested(root, "age", "regression",
                              channels={"T1w": {"suffix": "T1w"}, "T2": {"suffix": "inplaneT2"}})
    assert list(manifest.columns[:6]) == ["image_id", "participant_id", "session", "subdir", "path", "path_T2"]
    assert manifest.loc[0, "path_T2"].endswith("sub-01/anat/sub-01_inplaneT2.nii.gz")


def test_ds001_runs_policy_and_4d_images(tmp_path):
    root = ds001(tmp_path / "ds001")
    for s in (1, 2):
        tiny_nifti(root / f"sub-{s:02d}/func/sub-{s:02d}_task-balloonanalogrisktask_run-01_bold.nii.gz", shape=(2, 2, 2, 3))
    tiny_nifti(root / "sub-03/func/sub-03_task-balloonanalogrisktask_run-01_bold.nii.gz")
    manifest, report, _ = ingested(root, "age", "regression", bids_filters={"datatype": "func"},
                                   channels={"bold": {"suffix": "bold"}}, runs="first",
                                   participants={"include": ["01", "02", "03"], "exclude": []})
    assert manifest["image_id"].tolist() == ["sub-03_run-01"]  # run distinguishes a participant's images
    reasons = dict(zip(report["image_id"], report["reason"]))
    assert reasons["sub-01_run-01"].startswith("4D image (shape (2, 2, 2, 3)); expected one 3D volume")
    assert set(report["image_id"]) == {"sub-01_run-01", "sub-02_run-01"}  # runs 2-3 were never selected


def test_ds114_sessions_by_label(tmp_path):
    root = ds114(tmp_path / "ds114")
    manifest, _, targets = ingested(root, "dominant_hand", "classification")
    assert len(manifest) == 20 and targets["classes"] == ["left", "right"]
    assert manifest.loc[manifest["image_id"] == "sub-01_ses-test", "subdir"].item() == "sub-01/ses-test"
    named, _, _ = ingested(root, "dominant_hand", "classification", sessions="ses-test")
    assert set(named["session"]) == {"ses-test"} and len(named) == 10
    first, _, _ = ingested(root, "dominant_hand", "classification", sessions="first")
    assert set(first["session"]) == {"ses-retest"}  # label order, not acquisition order
    assert set(first["image_id"]) == {f"sub-{s:02d}_ses-retest" for s in range(1, 11)}


def test_ds114_missing_target_lists_columns(tmp_path):
    root = ds114(tmp_path / "ds114")
    with pytest.raises(InputError, match=r"participants\.tsv has no column 'age' .* Its columns are: dominant_hand\."):
        ingested(root, "age", "regression")


def test_7t_trt_quirks_fail_with_the_file_and_column(tmp_path):
    root = seven_t(tmp_path / "7t_trt")
    with pytest.raises(InputError, match=r"7t_trt/participants\.tsv has no 'participant_id' column \(columns: subject_id, sex"):
        ingested(root, "age_at_first_scan_years", "regression")
    fix_header(root / "participants.tsv", "subject_id", "participant_id")
    with pytest.raises(InputError, match=r"sub-01/sub-01_sessions\.tsv has no 'session_id' column \(columns: session, hours"):
        ingested(root, "hours_of_sleep_last_night", "regression", target_source="sessions")


def test_7t_trt_sessions_acq_runs_and_channels(tmp_path):
    root = seven_t(tmp_path / "7t_trt")
    fix_header(root / "participants.tsv", "subject_id", "participant_id")
    for sub in root.glob("sub-*"):
        fix_header(sub / f"{sub.name}_sessions.tsv", "session", "session_id")
    manifest, report, targets = ingested(root, "hours_of_sleep_last_night", "regression", target_source="sessions",
                                         channels={"T1w": {"suffix": "T1w"}, "T1map": {"suffix": "T1map"}},
                                         sessions="last")
    assert len(manifest) == 22 and report.empty  # the last session *with anatomy* is ses-1
    row = manifest.set_index("image_id").loc["sub-05_ses-1"]
    assert row["hours_of_sleep_last_night"] == "8" and row["sex"] == "M"  # per-session target, participant columns
    assert row["path_T1map"].endswith("sub-05_ses-1_T1map.nii.gz")
    assert targets["source"] == "sessions.tsv"
    fmap, _, _ = ingested(root, "hours_of_sleep_last_night", "regression", bids_filters={"datatype": "fmap"},
                          channels={"mag": {"suffix": "magnitude1"}}, runs="run-2", target_source="sessions")
    assert len(fmap) == 44 and fmap["image_id"].str.fullmatch(r"sub-\d\d_ses-[12]_run-2").all()
    assert fmap["path"].str.endswith("_run-2_magnitude1.nii.gz").all()


def test_7t_trt_acquisition_filters_report_what_exists(tmp_path):
    root = seven_t(tmp_path / "7t_trt")
    fix_header(root / "participants.tsv", "subject_id", "participant_id")
    with pytest.raises(InputError) as error:
        ingested(root, "sex", "classification", bids_filters={"datatype": "func", "acquisition": "full"},
                 channels={"bold": {"suffix": "bold"}})
    assert re.search(r"none has acquisition 'full'; .* with acquisition: 'fullbrain' \(88 files\), 'prefrontal' \(44 files\)",
                     str(error.value))


def test_synthetic_needs_participants_and_reads_uncompressed_nifti(tmp_path):
    root = synthetic(tmp_path / "synthetic")
    with pytest.raises(InputError, match=r"synthetic/participants\.tsv does not exist"):
        ingested(root, "age", "regression")
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"sub-0{s}\t{20 + s}\n" for s in range(1, 6)))
    before = tree_digest(root)
    manifest, _, _ = ingested(root, "age", "regression", cache_dir=tmp_path / "cache")
    assert len(manifest) == 10 and manifest["path"].str.endswith("_T1w.nii").all()
    assert tree_digest(root) == before


def multicontrast(root):
    """4 participants × 1 session: T1w, T2w (empty for sub-01), FLAIR (none for sub-03), lesion labels (none for sub-02)."""
    files, real = [], []
    for s in range(1, 5):
        stem, name = f"sub-0{s}/ses-01/anat", f"sub-0{s}_ses-01"
        real += [f"{stem}/{name}_T1w.nii.gz"] + ([f"{stem}/{name}_FLAIR.nii.gz"] if s != 3 else [])
        (real if s != 1 else files).append(f"{stem}/{name}_T2w.nii.gz")  # sub-01's T2w is empty
        if s != 2:
            real.append(f"derivatives/lesions/{stem}/{name}_desc-lesion_dseg.nii.gz")
    files.append("sub-01/ses-01/anat/sub-01_ses-01_FLAIR.json")
    table = "participant_id\tedss\n" + "".join(f"sub-0{s}\t{s}.5\n" for s in range(1, 5))
    return write_tree(root, files, real, table)


def test_multicontrast_channels_and_label_image(tmp_path):
    root = multicontrast(tmp_path / "ms")
    channels = {"T1w": {"suffix": "T1w"}, "FLAIR": {"suffix": "FLAIR"}, "T2w": {"suffix": "T2w"}}
    label = {"derivatives": "derivatives/lesions", "filters": {"suffix": "dseg", "desc": "lesion"}}
    manifest, report, _ = ingested(root, "edss", "regression", channels=channels, label_image=label)
    assert list(manifest.columns) == ["image_id", "participant_id", "session", "subdir", "path",
                                      "path_FLAIR", "path_T2w", "label", "edss"]
    assert manifest["image_id"].tolist() == ["sub-04_ses-01"]
    assert manifest.loc[0, "label"] == str((root / "derivatives/lesions/sub-04/ses-01/anat/sub-04_ses-01_desc-lesion_dseg.nii.gz").absolute())
    rows = report.set_index("image_id")
    assert rows.loc["sub-03_ses-01", "reason"] == "no FLAIR image with the same entities (channels.FLAIR)"
    assert rows.loc["sub-02_ses-01", "reason"].startswith(f"no label image in {root / 'derivatives/lesions'} with the same entities")
    assert rows.loc["sub-01_ses-01", "reason"].startswith("T2w image: zero-byte file")  # the failing channel named ...
    assert rows.loc["sub-01_ses-01", "path"].endswith("sub-01_ses-01_T2w.nii.gz")  # ... and its file
    assert len(report) == 3
