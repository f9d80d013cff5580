"""A newcomer's mistakes (issue #28), each walked through `bids-deepstudy check` and `run -n`: every
one ends in a message that names the file, row or key and what to fix, never a traceback.

Errors stop `check` and `run` (exit status 2) before Snakemake starts; warnings let `run` go on to
Snakemake (replaced here by a recorder: the plan itself is test_workflow's business). The datasets
are a few 6³-voxel NIfTI files written here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import stage_config, write_bids
from pipeline import check
from pipeline import run as run_cli
from pipeline.common import launch
from pipeline.intake import ingest

REPO = Path(__file__).resolve().parents[1]
PEOPLE = [{"participant_id": f"sub-{i:03d}", "age": str(20 + 3 * i), "sex": "MF"[i % 2]} for i in range(1, 11)]


def dataset(root: Path) -> Path:
    """Ten participants, one T1w each, numeric `age` and text `sex`."""
    return write_bids(root, PEOPLE, {p["participant_id"]: [""] for p in PEOPLE}, shape=(6, 6, 6))


def drop_row(bids: Path, pid: str) -> None:
    lines = (bids / "participants.tsv").read_text().splitlines(keepends=True)
    (bids / "participants.tsv").write_text("".join(line for line in lines if not line.startswith(pid)))


def text_as_nifti(bids: Path, pid: str) -> None:
    (bids / pid / "anat" / f"{pid}_T1w.nii.gz").write_text("participant_id\tage\nsub-010\t50\n")


# name → (what to break: (bids folder, config) → config, "error" or "warning", texts the message holds)
MISTAKES = {
    "bids_dir_missing": (lambda bids, cfg: {**cfg, "bids_dir": str(bids.parent / "nowhere")}, "error",
                         ["bids_dir {tmp}/nowhere does not exist", "Set `bids_dir` in config"]),
    "bids_dir_not_bids": (lambda bids, cfg: {**cfg, "bids_dir": str(bids / "sub-001")}, "error",
                          ["is not a BIDS dataset: no dataset_description.json", "Point `bids_dir` at the dataset root"]),
    "target_typo": (lambda bids, cfg: {**cfg, "target": "agee"}, "error",
                    ["participants.tsv has no column 'agee'", "Did you mean `target: age`?"]),
    "sex_under_regression": (lambda bids, cfg: {**cfg, "target": "sex"}, "error",
                             ["`target: sex` with `task: regression`", "looks categorical: use `task: classification`"]),
    "too_many_folds": (lambda bids, cfg: {**cfg, "split": {"folds": 12}}, "error",
                       ["10 participants are too few for `split.folds: 12`", "Lower `split.folds`"]),
    "participant_missing_from_table": (lambda bids, cfg: drop_row(bids, "sub-004") or cfg, "warning",
                                       ["image(s) of participant(s) not listed in {tmp}/bids/participants.tsv: sub-004",
                                        "Add their rows"]),
    "text_saved_as_nii_gz": (lambda bids, cfg: text_as_nifti(bids, "sub-010") or cfg, "warning",
                             ["{tmp}/bids/sub-010/anat/sub-010_T1w.nii.gz (sub-010): unreadable NIfTI: named .gz but "
                              "not gzip-compressed", "replace or repair the file"]),
    "participant_without_image": (lambda bids, cfg: (bids / "participants.tsv").open("a").write("sub-077\t44\tF\n")
                                  and cfg, "warning",
                                  ["participants.tsv lists 1 participant(s) without an image", "sub-077",
                                   "Add their images"]),
    "class_too_small": (lambda bids, cfg: {**cfg, "target": "sex", "task": "classification",
                                           "participants": {"exclude": ["sub-001", "sub-003", "sub-005", "sub-007"]}},
                        "warning", ["class 'F' of `sex` has 1 participant(s): expected 0.2 in the test set",
                                    "lower `split.folds`"]),
}


def texts(expected: list[str], tmp: Path) -> list[str]:
    return [t.format(tmp=tmp) for t in expected]


@pytest.fixture
def study(tmp_path):
    bids = dataset(tmp_path / "bids")
    return bids, {"bids_dir": str(bids), "results_dir": str(tmp_path / "results"), "split": {"folds": 2}}


@pytest.mark.parametrize("name", MISTAKES)
def test_each_mistake_is_a_message_from_check_and_from_run(name, study, tmp_path, capsys, monkeypatch):
    break_it, severity, expected = MISTAKES[name]
    bids, cfg = study
    monkeypatch.chdir(tmp_path)  # a folder of the user's own: no checkout's config/config.yaml (the demo's) under it
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(break_it(bids, cfg)))
    expected = texts(expected, tmp_path)

    with pytest.raises(SystemExit) if severity == "error" else contextlib.nullcontext() as stopped:
        check.main([str(path)])
    out, err = capsys.readouterr()
    prefix = "ERROR: " if severity == "error" else "warning: "
    [line] = [line for line in err.splitlines() if expected[0] in line]
    assert line.startswith(prefix) and all(t in line for t in expected), err
    assert "Traceback" not in out + err
    if severity == "error":
        assert stopped.value.code == 2 and "a run would stop on them" in err
    else:
        assert "no errors" in out and "participants, " in out  # the summary

    calls = []
    monkeypatch.setattr(launch, "snakemake", lambda args, readable=False: calls.append(args) or 0)
    with pytest.raises(SystemExit) as ran:
        run_cli.main(["-n", "--configfile", str(path)])
    err = capsys.readouterr().err
    assert any(line.startswith(prefix) and all(t in line for t in expected) for line in err.splitlines()), err
    assert "Traceback" not in err
    if severity == "error":
        assert ran.value.code == 2 and calls == [] and "nothing was run" in err  # Snakemake never started
    else:
        assert ran.value.code == 0 and calls == [["-n", "--configfile", str(path)]]


def test_check_of_a_missing_or_broken_file_is_a_message(tmp_path, capsys):
    for text, expected in [(None, "nonexist.yaml: no such config file. Start from config/study.yaml"),
                           ("bids_dir: [unclosed\n", "is not valid YAML"),
                           ("- a list\n", "holds a list, not a mapping of config keys")]:
        path = tmp_path / "nonexist.yaml"
        if text is not None:
            path.write_text(text)
        with pytest.raises(SystemExit) as stopped:
            check.main([str(path)])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and expected in err and "Traceback" not in err


def test_run_without_a_config_says_how_to_give_one(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(launch, "snakemake", lambda args, readable=False: pytest.fail("Snakemake started"))
    with pytest.raises(SystemExit) as stopped:
        run_cli.main(["-n"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert "No config: `bids-deepstudy run` needs a study config, e.g. `bids-deepstudy run --configfile my.yaml`" in err
    with pytest.raises(SystemExit):
        run_cli.main(["-n", "--configfile", "missing.yaml"])
    assert "--configfile missing.yaml: no such config file" in capsys.readouterr().err


def test_regression_on_a_text_column_at_ingest_is_a_message(study, tmp_path, capsys):
    bids, _ = study
    argv = ["--config", stage_config(bids_dir=str(bids), target="sex"), "--manifest", str(tmp_path / "m.tsv"),
            "--report", str(tmp_path / "r.tsv")]
    with pytest.raises(SystemExit) as stopped:
        ingest.main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and "Traceback" not in err
    assert "Every value of 'sex' is text: if it names classes, set `task: classification`." in err


def test_config_errors_under_run_and_snakemake_have_no_file_line_prefix(study, tmp_path, capsys, monkeypatch):
    """`run` checks the config itself, before Snakemake; Snakemake run directly (about 8 s: an
    interpreter importing torch) prints the same message without its file/line prefix."""
    bids, cfg = study
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({**cfg, "train": {"epoch": 3, "batch_size": 0}}))
    expected = ["config key `train.epoch` is not known. Did you mean `train.epochs`?",
                "`train.batch_size`: 0 is less than the minimum of 2"]
    monkeypatch.setattr(launch, "snakemake", lambda args, readable=False: pytest.fail("Snakemake started"))
    with pytest.raises(SystemExit) as stopped:
        run_cli.main(["-n", "--configfile", str(path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and all(t in err for t in expected) and "Traceback" not in err

    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-n",
                           "--configfile", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and all(t in done.stderr for t in expected), done.stderr[-2000:]
    assert "InputError in file" not in done.stderr and "Traceback" not in done.stderr
    assert "common.smk" not in done.stderr
