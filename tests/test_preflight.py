"""The data pre-flight of `check` and `run` (pipeline.intake.preflight): what it counts, what it
warns about and what stops a run, on tiny BIDS datasets written here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from conftest import write_bids
from pipeline import check
from pipeline import run as run_cli
from pipeline.common import launch
from pipeline.common.config import fill, schema
from pipeline.intake.preflight import preflight

SHAPE = (6, 6, 6)


def dataset(root: Path, n: int, sessions=("",), **columns) -> Path:
    """``n`` participants sub-001…, ages 21…, one T1w per session; ``columns``: more participants.tsv
    columns as functions of the index."""
    people = [{"participant_id": f"sub-{i:03d}", "age": str(20 + i), **{k: f(i) for k, f in columns.items()}}
              for i in range(1, n + 1)]
    return write_bids(root, people, {p["participant_id"]: list(sessions) for p in people}, shape=SHAPE)


def config(bids: Path, **keys) -> dict:
    return fill(schema(), {"bids_dir": str(bids), **keys})


def test_a_clean_dataset_is_counted_per_channel_and_session_and_split_as_the_study_would(tmp_path):
    bids = dataset(tmp_path / "bids", 12, sessions=("ses-01", "ses-02"))
    found = preflight(config(bids, split={"folds": 2, "test": 0.25}))
    assert found.errors == [] and found.warnings == []
    head, per_channel, target, folds = found.summary
    assert re.fullmatch(r"12 participants, 24 images, 1 channel → 2 folds; \d+ test participants?", head)
    assert per_channel == "images per channel: T1w 24 (ses-01 12, ses-02 12)"
    assert target == "target `age` (regression): 21 to 32, mean 26.5"
    assert folds.startswith("validation participants per fold: ")


def test_cache_is_ingests_own(tmp_path):
    bids = dataset(tmp_path / "bids", 4)
    before = sorted(bids.rglob("*"))
    preflight(config(bids, split={"folds": 1}), tmp_path / "cache")
    assert (tmp_path / "cache" / "checks.json").is_file() and list((tmp_path / "cache").glob("index-*.json"))
    assert sorted(bids.rglob("*")) == before  # nothing written into the dataset


def test_target_typo_names_the_closest_column(tmp_path):
    bids = dataset(tmp_path / "bids", 6, sex=lambda i: "MF"[i % 2])
    found = preflight(config(bids, target="agee"))
    assert len(found.errors) == 1 and "has no column 'agee'" in found.errors[0]
    assert "Did you mean `target: age`?" in found.errors[0] and "Its columns are: age, sex" in found.errors[0]


def test_text_target_under_regression_looks_categorical(tmp_path):
    bids = dataset(tmp_path / "bids", 6, sex=lambda i: "MF"[i % 2])
    found = preflight(config(bids, target="sex"))
    assert found.errors == [f"`target: sex` with `task: regression`: every value in participants.tsv is text ('F', "
                            "'M'); it looks categorical: use `task: classification` (or set `target` to a numeric "
                            "column)."]


def test_some_text_values_under_regression_are_a_warning_naming_the_rows(tmp_path):
    bids = dataset(tmp_path / "bids", 8, score=lambda i: "high" if i == 3 else str(i))
    found = preflight(config(bids, target="score", split={"folds": 1}))
    assert found.errors == []
    assert any("1 value(s) of `score`" in w and "sub-003 ('high')" in w for w in found.warnings)
    assert found.summary[0].startswith("7 participants, 7 images")


def test_numeric_two_values_under_classification_is_said_and_many_look_continuous(tmp_path):
    bids = dataset(tmp_path / "bids", 12, group=lambda i: str(i % 2))
    found = preflight(config(bids, target="group", task="classification", split={"folds": 1}))
    assert found.errors == [] and any(s.startswith("note: `group` holds numbers (0, 1)") for s in found.summary)
    found = preflight(config(bids, task="classification", split={"folds": 1}))
    assert any("12 distinct numeric values" in w and "use `task: regression`" in w for w in found.warnings)


def test_class_with_too_few_participants_gives_the_expected_numbers(tmp_path):
    bids = dataset(tmp_path / "bids", 12, group=lambda i: "patient" if i <= 2 else "control")
    found = preflight(config(bids, target="group", task="classification", split={"folds": 3, "test": 0.2}))
    [warning] = [w for w in found.warnings if w.startswith("class 'patient'")]
    assert "has 2 participant(s): expected 0.4 in the test set (split.test 0.2) and 0.5 per validation set" in warning
    assert "lower `split.folds`" in warning
    assert not any(w.startswith("class 'control'") for w in found.warnings)


def test_a_cohort_too_small_for_the_folds_is_an_error(tmp_path):
    bids = dataset(tmp_path / "bids", 4)
    found = preflight(config(bids, split={"folds": 5}))
    assert len(found.errors) == 1 and "4 participants are too few for `split.folds: 5`" in found.errors[0]
    assert "Lower `split.folds`" in found.errors[0]


def test_unimaged_unlisted_and_unreadable_are_named(tmp_path):
    bids = dataset(tmp_path / "bids", 8)
    (bids / "participants.tsv").write_text((bids / "participants.tsv").read_text() + "sub-050\t70\n")
    bad = bids / "sub-008" / "anat" / "sub-008_T1w.nii.gz"
    bad.write_text("participant_id\tage\n")
    stray = bids / "sub-099" / "anat"
    stray.mkdir(parents=True)
    (stray / "sub-099_T1w.nii.gz").write_bytes((bids / "sub-001" / "anat" / "sub-001_T1w.nii.gz").read_bytes())
    found = preflight(config(bids, split={"folds": 2}))
    assert found.errors == []
    text = "\n".join(found.warnings)
    assert f"{bids / 'participants.tsv'} lists 1 participant(s) without an image the filters select: sub-050" in text
    assert f"1 image(s) of participant(s) not listed in {bids / 'participants.tsv'}: sub-099" in text
    assert f"{bad} (sub-008): unreadable NIfTI: named .gz but not gzip-compressed" in text
    assert found.summary[0].startswith("7 participants, 7 images, 1 channel → 2 folds")
    stopped = preflight(config(bids, split={"folds": 2}, on_error="stop"))
    assert len(stopped.errors) == 3 and all("With `on_error: stop`" in e for e in stopped.errors)


def test_an_image_without_a_row_is_also_header_checked(tmp_path):
    bids = dataset(tmp_path / "bids", 6)
    stray = bids / "sub-077" / "anat" / "sub-077_T1w.nii.gz"
    stray.parent.mkdir(parents=True)
    stray.write_text("not an image")
    found = preflight(config(bids, split={"folds": 1}))
    assert any("not listed in" in w and "sub-077" in w for w in found.warnings)
    assert any(w.startswith(f"{stray} (sub-077): unreadable NIfTI") for w in found.warnings)


def test_two_channels_are_counted(tmp_path):
    bids = dataset(tmp_path / "bids", 5)
    for t1 in bids.glob("sub-*/anat/*_T1w.nii.gz"):
        t1.with_name(t1.name.replace("T1w", "FLAIR")).write_bytes(t1.read_bytes())
    found = preflight(config(bids, channels={"T1w": {"suffix": "T1w"}, "FLAIR": {"suffix": "FLAIR"}},
                             split={"folds": 1}))
    assert found.summary[0].startswith("5 participants, 10 images, 2 channels → 1 fold;")
    assert found.summary[1] == "images per channel: T1w 5, FLAIR 5"


def test_check_prints_the_summary_and_exits_2_on_an_error(tmp_path, capsys):
    bids = dataset(tmp_path / "bids", 10)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"bids_dir": str(bids), "split": {"folds": 2}}))
    check.main([str(path)])
    out = capsys.readouterr().out
    assert "my.yaml: no problems in the config" in out and "10 participants, 10 images, 1 channel → 2 folds" in out
    path.write_text(yaml.safe_dump({"bids_dir": str(bids), "target": "agee"}))
    with pytest.raises(SystemExit) as stopped:
        check.main([str(path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Did you mean `target: age`?" in err and "1 error(s) in the data" in err
    check.main([str(path), "--config-only"])  # the config alone is fine


def test_run_prints_the_pre_flight_before_snakemake_and_stops_on_an_error(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(launch, "snakemake", lambda args, readable=False: calls.append(args) or 0)
    bids = dataset(tmp_path / "bids", 10)
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"bids_dir": str(bids), "results_dir": str(tmp_path / "res"),
                                    "split": {"folds": 2}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        run_cli.main(["-n", "--configfile", str(path)])
    assert done.value.code == 0 and calls == [["-n", "--configfile", str(path)]]
    assert "10 participants, 10 images, 1 channel → 2 folds" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:  # --config overrides the file, as in Snakemake
        run_cli.main(["-n", "--configfile", str(path), "--config", "target=agee"])
    assert done.value.code == 2 and len(calls) == 1
    assert "Did you mean `target: age`?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        run_cli.main(["-n", "--configfile", str(path), "--config", "target=agee", "--skip-preflight"])
    assert done.value.code == 0 and calls[-1] == ["-n", "--configfile", str(path), "--config", "target=agee"]


def test_a_training_set_too_small_for_the_task_is_said_with_the_numbers_and_the_fix(tmp_path):
    """Issue 26's design: 40 participants, half patients, 2 folds: 8 + 8 training participants per fold."""
    bids = dataset(tmp_path / "bids", 40, group=lambda i: "patient" if i % 2 else "control")
    found = preflight(config(bids, target="group", task="classification", split={"folds": 2}))
    small = [w for w in found.warnings if "trains on" in w]
    assert len(small) == 2 and small[0].startswith("fold-1 trains on 8 control, 8 patient participants")
    assert "`split.folds: 3` would train each fold on about 10" in small[0] and "train.init_from" in small[0]
    found = preflight(config(bids, target="group", task="classification", split={"folds": 4}))
    assert not any("trains on" in w for w in found.warnings)


def test_a_ground_truth_folder_without_the_targets_mask_stops_the_run_before_it_starts(tmp_path):
    """`explain.groundtruth` is read only by the last explain job; the demo's folder carried into
    another study's config (no mask for its target) is said by the pre-flight, naming the file."""
    from pipeline.common.paths import SPACE
    from pipeline.intake.preflight import for_config

    bids = dataset(tmp_path / "bids", 12, group=lambda i: "patient" if i % 2 else "control")
    truth = tmp_path / "groundtruth"
    truth.mkdir()
    (truth / f"space-{SPACE}_desc-age_mask.nii.gz").write_bytes(b"")  # only its presence is checked
    keys = {"bids_dir": str(bids), "target": "group", "task": "classification", "explain": {"groundtruth": "groundtruth"}}
    found = for_config(keys, folder=tmp_path)  # relative to the folder the study runs from
    assert [e for e in found.errors if "groundtruth" in e] == [
        f"config `explain.groundtruth`: no ground-truth mask {tmp_path}/groundtruth/space-{SPACE}_desc-group_mask.nii.gz "
        f"for target 'group'. Set it to the folder with space-{SPACE}_desc-group_mask.nii.gz (pipeline.demo writes one "
        "for its cohorts), or to null."]
    assert not for_config({**keys, "target": "age", "task": "regression"}, folder=tmp_path).errors
    assert not for_config({**keys, "explain": {"groundtruth": None}}, folder=tmp_path).errors
