"""The bad-input corpus: broken datasets and configs built at test time, and what a user needs
from each.

For every case: a message that names the file, row or key and says what to do; with
``on_error: continue`` the other participants go on and ``excluded.tsv`` lists what was left out
and why; with ``on_error: stop`` (or for a fault in the dataset or config as a whole) the run
ends with the message and writes no output at all.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import (ARCHIVE_CASES, ARCHIVE_LIMIT, BAD, IMAGE_CASES, LIMITS, PARTICIPANTS, TABLE_CASES, bad_image,
                      good_dataset, is_root, noise, package_archive, save)

from atlases import write_atlas
from conftest import stage_config
from pipeline import check as workflow_configcheck
from pipeline.common import configcheck
from pipeline.intake import exclusions
from pipeline.intake import imagecheck
from pipeline.intake import ingest
from pipeline.common.errors import InputError
from pipeline.sharing import tarball
from pipeline.sharing import registry

REPO = Path(__file__).resolve().parents[2]
GOOD = ["sub-01", "sub-02", "sub-03"]
# What "says what to do" looks like: every message holds one of these.
ACTIONS = ("replace", "repair", "rewrite the header", "raise the limit", "narrow bids_filters", "make it readable",
           "correct it", "add its row", "add its image", "Keep one row each", "Set `target`", "Valid entities",
           "Did you mean", "Valid keys", "choose one of", "Set a valid value", "Make it writable", "Add the",
           "participants.exclude", "re-create the archive")


def says_what_to_do(message: str) -> bool:
    return any(action in message for action in ACTIONS)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def run_ingest(root: Path, out: Path, on_error: str, target: str = "age", filters=None) -> int:
    """``python -m pipeline.intake.ingest`` as the workflow runs it (no cache folder): its exit status."""
    keys = {"bids_dir": str(root), "target": target, "image_limits": LIMITS, "on_error": on_error,
            **({"bids_filters": filters} if filters is not None else {})}
    argv = ["--config", stage_config(**keys), "--manifest", str(out / "manifest.tsv"),
            "--report", str(out / "ingest_report.tsv")]
    try:
        ingest.main(argv)
    except SystemExit as exc:
        return exc.code
    return 0


def excluded_table(out: Path) -> pd.DataFrame:
    """excluded.tsv as the workflow's exclusions rule writes it from ingest's report."""
    exclusions.main(["--ingest-report", str(out / "ingest_report.tsv"), "--out", str(out / "excluded.tsv")])
    return exclusions.read_table(out / "excluded.tsv")


@pytest.fixture
def unreadable_as_root(monkeypatch):
    """Root reads any file whatever its mode: there, a PermissionError from open() stands in."""

    def simulate(path: Path):
        if not is_root():
            return
        real_open = open

        def fake_open(file, *args, **kwargs):
            if str(file) == str(path):
                raise PermissionError(13, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(imagecheck, "open", fake_open, raising=False)

    return simulate


def broken_image_dataset(tmp_path: Path, case: str, unreadable_as_root) -> tuple[Path, Path]:
    root = good_dataset(tmp_path / "bids")
    path = bad_image(root)
    IMAGE_CASES[case][0](path)
    if case == "unreadable_permissions":
        unreadable_as_root(path)
    return root, path


def broken_table_dataset(tmp_path: Path, case: str) -> Path:
    row = TABLE_CASES[case][0]
    return good_dataset(tmp_path / "bids", PARTICIPANTS[:3] + ([row] if row else []))


# --- one bad sample among good ones -----------------------------------------------------------

@pytest.mark.parametrize("case", IMAGE_CASES)
def test_bad_image_is_excluded_named_and_the_others_go_on(case, tmp_path, unreadable_as_root, capsys):
    root, path = broken_image_dataset(tmp_path, case, unreadable_as_root)
    out = tmp_path / "results"
    assert run_ingest(root, out, "continue") == 0
    assert pd.read_csv(out / "manifest.tsv", sep="\t")["participant_id"].tolist() == GOOD
    row = excluded_table(out).set_index("image_id").loc[BAD]
    assert (row["stage"], row["file"]) == ("ingest", str(path.absolute()))
    assert IMAGE_CASES[case][1] in row["reason"] and says_what_to_do(row["reason"]), row["reason"]
    assert f"excluded {BAD}: {row['reason']}" in capsys.readouterr().err  # the log says it too


@pytest.mark.parametrize("case", TABLE_CASES)
def test_bad_table_row_is_excluded_named_and_the_others_go_on(case, tmp_path):
    root, out = broken_table_dataset(tmp_path, case), tmp_path / "results"
    assert run_ingest(root, out, "continue") == 0
    assert pd.read_csv(out / "manifest.tsv", sep="\t")["participant_id"].tolist() == GOOD
    row = excluded_table(out).set_index("image_id").loc[BAD]
    assert row["file"] == str(bad_image(root).absolute()) and row["participant_id"] == BAD
    assert TABLE_CASES[case][1] in row["reason"] and "participants" in row["reason"] and says_what_to_do(row["reason"])


def test_participant_without_image_is_listed(tmp_path):
    root = good_dataset(tmp_path / "bids", PARTICIPANTS + [{"participant_id": "sub-05", "age": "70"}])
    out = tmp_path / "results"
    assert run_ingest(root, out, "continue") == 0
    assert pd.read_csv(out / "manifest.tsv", sep="\t")["participant_id"].tolist() == [*GOOD, BAD]
    row = excluded_table(out).set_index("participant_id").loc["sub-05"]
    assert row["image_id"] == "" and "no image matching the filters" in row["reason"] and says_what_to_do(row["reason"])


@pytest.mark.parametrize("case", [*IMAGE_CASES, *TABLE_CASES])
def test_on_error_stop_ends_at_the_bad_sample_and_writes_nothing(case, tmp_path, unreadable_as_root, capsys):
    if case in IMAGE_CASES:
        root, path = broken_image_dataset(tmp_path, case, unreadable_as_root)
        reason = IMAGE_CASES[case][1]
    else:
        root = broken_table_dataset(tmp_path, case)
        path, reason = bad_image(root), TABLE_CASES[case][1]
    out = tmp_path / "results"
    assert run_ingest(root, out, "stop") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ERROR: {path.absolute()} ({BAD}): ") and reason in err and "on_error: stop" in err, err
    assert says_what_to_do(err.split("With `on_error: stop`")[0])  # the reason's own advice
    assert "Traceback" not in err and files_under(out) == []


def test_ids_with_and_without_sub_prefix_join_the_same_participants(tmp_path):
    rows = [{"participant_id": pid if i % 2 else pid.removeprefix("sub-"), "age": "40"} for i, pid in enumerate(GOOD + [BAD])]
    root, out = good_dataset(tmp_path / "bids", rows), tmp_path / "results"
    assert run_ingest(root, out, "stop") == 0  # nothing to exclude, so stop does not stop
    assert pd.read_csv(out / "manifest.tsv", sep="\t")["participant_id"].tolist() == [*GOOD, BAD]
    assert excluded_table(out).empty


# --- faults of the dataset as a whole: an error naming it, nothing written ---------------------

def duplicate_rows(tmp_path):
    return good_dataset(tmp_path / "bids", PARTICIPANTS + [{"participant_id": "sub-02", "age": "33"}]), {}


def same_id_with_and_without_prefix(tmp_path):
    return good_dataset(tmp_path / "bids", PARTICIPANTS + [{"participant_id": "02", "age": "33"}]), {}


def target_column_missing(tmp_path):
    return good_dataset(tmp_path / "bids"), {"target": "height"}


def unknown_entity_filter(tmp_path):
    return good_dataset(tmp_path / "bids"), {"filters": {"acquisiton": "mprage"}}


def empty_dataset(tmp_path):
    return good_dataset(tmp_path / "bids", images={}), {}


FATAL = {
    duplicate_rows: r"participants\.tsv lists a participant more than once: row 3 \(sub-02\), row 6 \(sub-02\)\. Keep one row each",
    same_id_with_and_without_prefix: r"participants\.tsv lists a participant more than once: row 3 \(sub-02\), row 6 \(sub-02\)",
    target_column_missing: r"participants\.tsv has no column 'height'.*Its columns are: age\. Set `target`",
    unknown_entity_filter: r"Unknown BIDS entity 'acquisiton' in bids_filters.*Valid entities: .*acquisition",
    empty_dataset: r"bids is an empty BIDS dataset: it has no sub-\* folders\. Add the",
}


@pytest.mark.parametrize("build", FATAL, ids=lambda f: f.__name__)
@pytest.mark.parametrize("on_error", ["continue", "stop"])
def test_dataset_fault_ends_the_run_with_its_name_and_writes_nothing(build, on_error, tmp_path, capsys):
    root, args = build(tmp_path)
    out = tmp_path / "results"
    assert run_ingest(root, out, on_error, **args) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and "Traceback" not in err
    assert re.search(FATAL[build], err), err
    assert files_under(out) == []


@pytest.mark.parametrize("on_error", ["continue", "stop"])
def test_no_usable_image_at_all(on_error, tmp_path, capsys):
    root = good_dataset(tmp_path / "bids")
    for pid in GOOD + [BAD]:
        (root / pid / "anat" / f"{pid}_T1w.nii.gz").write_bytes(b"")
    out = tmp_path / "results"
    assert run_ingest(root, out, on_error) == 2
    err = capsys.readouterr().err
    first = f"{root.absolute()}/sub-01/anat/sub-01_T1w.nii.gz"
    expected = (f"No usable image in {root} for target 'age'; the exclusions:" if on_error == "continue" else
                f"{first} (sub-01): zero-byte file; replace or repair the file")
    assert expected in err and first in err and files_under(out) == []


def test_output_folder_that_cannot_be_written(tmp_path, capsys):
    root = good_dataset(tmp_path / "bids")
    (tmp_path / "blocker").write_text("a file where the results folder should be")
    assert run_ingest(root, tmp_path / "blocker" / "results", "continue") == 2
    err = capsys.readouterr().err
    assert f"Cannot write to {tmp_path / 'blocker' / 'results'}" in err and "set `results_dir`" in err


@pytest.mark.skipif(is_root(), reason="root writes into a read-only folder; the case above covers the message")
def test_output_folder_without_write_permission(tmp_path, capsys):
    root = good_dataset(tmp_path / "bids")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert run_ingest(root, locked, "continue") == 2
        assert f"Cannot write to {locked} (Permission denied)" in capsys.readouterr().err
        assert files_under(locked) == []
    finally:
        locked.chmod(0o700)


def test_ingest_outputs_are_never_half_written(tmp_path, monkeypatch):
    """A failure while writing (disk full) leaves the previous outputs as they were, no temp files."""
    root, out = good_dataset(tmp_path / "bids"), tmp_path / "results"
    assert run_ingest(root, out, "continue") == 0
    before = {p: p.read_bytes() for p in files_under(out)}
    save(bad_image(root), noise() * 2)  # a changed dataset: new outputs would differ

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", disk_full)
    with pytest.raises(OSError, match="No space"):
        run_ingest(root, out, "continue")
    assert {p: p.read_bytes() for p in files_under(out)} == before
    monkeypatch.undo()
    assert run_ingest(root, out, "continue") == 0
    (tmp_path / "plain").touch()  # outputs get a new file's mode, not the private one of a temp file
    assert {p.stat().st_mode & 0o777 for p in files_under(out)} == {(tmp_path / "plain").stat().st_mode & 0o777}


# --- package archives: refused before anything is extracted or registered ----------------------

@pytest.mark.parametrize("case", ARCHIVE_CASES)
def test_bad_package_archive_is_refused_with_its_name_and_registers_nothing(case, tmp_path, monkeypatch, capsys):
    archive = package_archive(tmp_path / "model.tar.gz", ARCHIVE_CASES[case][0])
    monkeypatch.setenv(tarball.MAX_UNPACKED_VARIABLE, str(ARCHIVE_LIMIT))
    extracted = []
    monkeypatch.setattr(tarball.tarfile.TarFile, "extractall", lambda *a, **k: extracted.append(a))
    with pytest.raises(SystemExit) as exit_info:
        registry.main(["register", str(archive), "--name", "lab/model", "--registry", str(tmp_path / "registry")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"ERROR: {archive} ") and "Traceback" not in err
    assert ARCHIVE_CASES[case][1] in err and says_what_to_do(err), err
    assert extracted == [] and files_under(tmp_path / "registry") == []


# --- config faults: every problem at once, each naming its key --------------------------------

def study_config() -> dict:
    return yaml.safe_load((REPO / "config" / "config.yaml").read_text())


def misspelled_top_level_key(c):
    c["on_eror"] = "stop"
    return r"`on_eror` is not known\. Did you mean `on_error`\? Valid keys at the top level: .*image_limits.*on_error"


def misspelled_nested_key(c):
    c["train"]["batchsize"] = c["train"].pop("batch_size")
    return r"`train\.batchsize` is not known\. Did you mean `train\.batch_size`\? Valid keys under `train`: amp, "


def zero_batch_size(c):
    c["train"]["batch_size"] = 0
    return r"`train\.batch_size`: 0 is less than the minimum of 2 \(Images per batch"


def negative_batch_size(c):
    c["train"]["batch_size"] = -4
    return r"`train\.batch_size`: -4 is less than the minimum of 2"


def unknown_model(c):
    from pipeline.learning.models import REGISTRY

    c["train"]["model"] = "resnet1000"
    return r"`train\.model` is 'resnet1000'; choose one of: " + ", ".join(REGISTRY)


def unknown_on_error(c):
    c["on_error"] = "ignore"
    return r"`on_error` is 'ignore'; choose one of: continue, stop"


def zero_voxel_limit(c):
    c["image_limits"] = {"max_voxels": 0}
    return r"`image_limits\.max_voxels`: 0 is less than the minimum of 1"


def unknown_explain_method(c):
    c["explain"]["methods"] = ["occlusion", "lime"]
    return r"`explain\.methods\[1\]` is 'lime'; choose one of: occlusion, gradient, smoothgrad, integrated_gradients, gradcam"


def stride_beyond_window(c):
    c["explain"].update(window=4, stride=6)
    return r"`explain\.stride` \(6\) is larger than `explain\.window` \(4\).*Set a valid value: a stride of at most"


def unknown_gradcam_layer(c):
    c["train"]["model"], c["explain"]["gradcam_layer"] = "simple_cnn", "features.9"
    c["explain"]["methods"].append("gradcam")  # not a default: its layer is checked when chosen
    return (r"`explain\.gradcam_layer` is 'features\.9', a layer `train\.model` \(simple_cnn\) does not have\..*"
            r"choose one of: features, features\.0, features\.0\.0, .*features\.3, .*head")


def gradcam_layer_named_inside_the_slice_wrapper(c):
    c["train"]["sampler"], c["explain"]["gradcam_layer"] = {"kind": "slices"}, "network.features.2"
    c["explain"]["methods"].append("gradcam")  # not a default: its layer is checked when chosen
    return r"`explain\.gradcam_layer` is 'network\.features\.2'.*Did you mean `features\.2`\? Names are those of the configured network, whatever `train\.sampler`"


def gradcam_layer_missing_in_a_variant(c):
    c["train"].update(model="simple_cnn", variants={"small": {"model_args": {"channels": [4, 8]}}})
    c["explain"]["gradcam_layer"] = "features.3"
    c["explain"]["methods"].append("gradcam")  # not a default: its layer is checked when chosen
    return r"`explain\.gradcam_layer` is 'features\.3', a layer `train\.variants\.small` \(simple_cnn\) does not have"


CONFIG_FAULTS = [misspelled_top_level_key, misspelled_nested_key, zero_batch_size, negative_batch_size,
                 unknown_model, unknown_on_error, zero_voxel_limit, unknown_explain_method, stride_beyond_window,
                 unknown_gradcam_layer, gradcam_layer_named_inside_the_slice_wrapper, gradcam_layer_missing_in_a_variant]


@pytest.mark.parametrize("fault", CONFIG_FAULTS, ids=lambda f: f.__name__)
def test_config_fault_names_the_key_and_what_is_valid(fault):
    """Checked as the workflow checks before any job runs: the schema, then the checks across keys."""
    config = study_config()
    expected = fault(config)
    with pytest.raises(InputError) as error:
        workflow_configcheck.check(config)
    assert re.search(expected, str(error.value)), str(error.value)
    assert says_what_to_do(str(error.value))


def test_config_faults_are_reported_together():
    config = study_config()
    for fault in CONFIG_FAULTS[:4]:
        fault(config)
    with pytest.raises(InputError) as error:
        configcheck.check(copy.deepcopy(config))
    assert len(str(error.value).splitlines()) == 1 + 3  # batch size 0 and -4 are the same key: the last wins


def test_explain_problems_are_reported_together_and_only_for_explained_tasks():
    config = study_config()
    stride_beyond_window(config), unknown_gradcam_layer(config)
    with pytest.raises(InputError) as error:
        workflow_configcheck.check(config)
    assert len(str(error.value).splitlines()) == 1 + 2
    config = {**study_config(), "task": "segmentation", "label_image": {"derivatives": "d", "filters": {"suffix": "dseg"}}}
    config["train"]["model"], config["explain"]["gradcam_layer"] = "unet", "features.2"
    workflow_configcheck.check(config)  # segmentation writes no maps: no layer to check
    workflow_configcheck.check({**study_config(), "explain": {"methods": ["gradient"], "gradcam_layer": "nowhere"}})


# --- explain.atlas: the user's atlas files, checked before any job runs -------------------------

def atlas_image_missing(c, folder):
    c["explain"]["atlas"] = {**write_atlas(folder), "image": str(folder / "HarvardOxford.nii.gz")}
    return r"`explain\.atlas\.image`: no file .*HarvardOxford\.nii\.gz .*Set a valid value"


def atlas_image_unreadable(c, folder):
    c["explain"]["atlas"] = write_atlas(folder)
    Path(c["explain"]["atlas"]["image"]).write_bytes(b"\x1f\x8b not really gzip")
    return r"`explain\.atlas\.image`: .*atlas\.nii\.gz cannot be read as a NIfTI image .*make it readable or replace"


def atlas_labels_missing(c, folder):
    c["explain"]["atlas"] = {**write_atlas(folder), "labels": str(folder / "labels.tsv")}
    return r"`explain\.atlas\.labels`: no file .*labels\.tsv \(the atlas's labels table\)"


def atlas_labels_without_the_columns(c, folder):
    c["explain"]["atlas"] = write_atlas(folder, labels_text="roi\tcolour\n1\tred\n")
    return (r"`explain\.atlas\.labels`: .*atlas\.tsv has the columns roi, colour; expected a header row with an "
            r"index column \(one of index, label, value, id, label_id\) and a name column \(one of name, .*; correct it")


def atlas_label_values_not_in_the_table(c, folder):
    c["explain"]["atlas"] = write_atlas(folder, labels_text="index\tname\n2\tmidline\n")
    return r"`explain\.atlas\.image`: label value\(s\) 1, 3 of .* have no row in `explain\.atlas\.labels`.*add its row"


def atlas_image_not_3d(c, folder):
    c["explain"]["atlas"] = write_atlas(folder, data=np.ones((8, 8, 8, 3), np.int16))
    return r"`explain\.atlas\.image`: .* has shape \(8, 8, 8, 3\), not a 3-D label image; replace it"


def atlas_image_probabilistic(c, folder):
    c["explain"]["atlas"] = write_atlas(folder, data=np.full((8, 8, 8), 0.25, np.float32))
    return r"`explain\.atlas\.image`: .* holds values that are not integer labels \(e\.g\. 0\.25\); replace it"


def atlas_off_the_grid(c, folder):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = 1000.0  # e.g. voxel coordinates taken for millimetres
    c["explain"]["atlas"] = write_atlas(folder, data=np.ones((8, 8, 8), np.int16), affine=affine)
    return (r"`explain\.atlas\.image`: no label of the atlas lies on the study grid \(atlas: x 1000\.\.1014, .*grid: "
            r"x -78\.\.78, .*Replace it with an atlas in MNI space")


ATLAS_FAULTS = [atlas_image_missing, atlas_image_unreadable, atlas_labels_missing, atlas_labels_without_the_columns,
                atlas_label_values_not_in_the_table, atlas_image_not_3d, atlas_image_probabilistic, atlas_off_the_grid]


@pytest.mark.parametrize("fault", ATLAS_FAULTS, ids=lambda f: f.__name__)
def test_atlas_fault_names_the_key_and_what_to_do(fault, tmp_path):
    config = study_config()
    expected = fault(config, tmp_path)
    with pytest.raises(InputError) as error:
        workflow_configcheck.check(config)
    assert re.search(expected, str(error.value)), str(error.value)
    assert says_what_to_do(str(error.value))


def test_atlas_files_are_checked_together_and_only_where_the_group_step_reads_them(tmp_path):
    config = study_config()
    config["explain"]["atlas"] = write_atlas(tmp_path, labels_text="roi\n1\n", data=np.ones((2, 2, 2, 2), np.int16))
    with pytest.raises(InputError) as error:
        workflow_configcheck.check(config)
    assert len(str(error.value).splitlines()) == 1 + 2  # the table's columns and the image's shape
    config["explain"]["atlas"] = write_atlas(tmp_path)
    workflow_configcheck.check(config)
    config["explain"]["atlas"]["image"] = str(tmp_path / "nowhere.nii.gz")
    segmentation = {**config, "task": "segmentation", "label_image": {"derivatives": "d", "filters": {"suffix": "dseg"}}}
    segmentation["train"] = {**config["train"], "model": "unet"}
    workflow_configcheck.check(segmentation)  # segmentation writes no maps: the atlas is never read


def test_model_choices_are_the_registry():
    from pipeline.learning.models import REGISTRY

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    assert schema["properties"]["train"]["properties"]["model"]["enum"] == list(REGISTRY)


def test_study_config_has_no_problems():
    workflow_configcheck.check(study_config())
    assert np.isclose(imagecheck.DEFAULT_LIMITS["max_voxel_size"],
                      yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
                      ["properties"]["image_limits"]["properties"]["max_voxel_size"]["default"])


def test_required_keys_with_a_schema_default_may_be_left_out():
    """`target` and `task` are required but have defaults, which Snakemake's validate fills in."""
    configcheck.check({"bids_dir": "data/demo"})
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    schema["properties"]["target"].pop("default")
    found = configcheck.problems({"bids_dir": "data/demo"}, schema)
    assert [line for line in found if "required" in line] == [
        "config lacks a required key: 'target' is a required property. Add it (config/README.md describes every key)."]
