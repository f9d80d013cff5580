"""`bids-deepstudy init` (issue #28, Build 4): config/study.yaml with the dataset's facts filled in and
its comments kept; the result passes every config check. Datasets of a few 6³-voxel files, no
Snakemake (about 2 s in all)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from conftest import write_bids
from pipeline import check
from pipeline.common.locations import STUDY_CONFIG
from pipeline.intake import initconfig


def people(n: int) -> list[dict]:
    return [{"participant_id": f"sub-{i:02d}", "age": str(20 + 2 * i), "sex": "MF"[i % 2], "site": "AB"[i % 2]}
            for i in range(1, n + 1)]


def dataset(root: Path, n: int, sessions: bool = False) -> Path:
    rows = people(n)
    images = {p["participant_id"]: (["ses-01", "ses-02"] if sessions and i % 2 else [""]) for i, p in enumerate(rows)}
    bids = write_bids(root, rows, images, shape=(6, 6, 6))
    flair = bids / "sub-01" / "anat" / "sub-01_FLAIR.nii.gz"  # one participant has a FLAIR too
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6), np.float32), np.eye(4)), flair)
    return bids


def written(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "my.yaml"
    initconfig.main([*args, "--out", str(out), "--force"])
    text = out.read_text()
    return text, yaml.safe_load(text)


def test_init_fills_in_the_datasets_facts_and_keeps_the_comments(tmp_path, capsys):
    bids = dataset(tmp_path / "bids", 20, sessions=True)
    text, config = written(tmp_path, str(bids))
    assert config["bids_dir"] == str(bids.resolve()) and config["results_dir"] == "results/bids"
    assert config["target"] == "age" and config["task"] == "regression" and config["split"]["folds"] == 5
    assert config["channels"] == {"T1w": {"suffix": "T1w"}}
    assert "T1w: {suffix: T1w}  # 20 participants; also found: FLAIR (1)" in text
    assert "# sessions found (participants): ses-01 (10), ses-02 (10)" in text
    assert "target: age  # 20 participants with a value, 22 to 60" in text
    template = STUDY_CONFIG.read_text()
    kept = [line for line in template.splitlines() if line.lstrip().startswith("#")]
    assert all(line in text.splitlines() for line in kept)  # every comment line of study.yaml
    check.check(config)  # the schema's checks and the checks across keys
    out = capsys.readouterr().out
    assert "split.folds: 5" in out and "bids-deepstudy check" in out and "--dry-run" in out


def test_init_guesses_classification_for_text_and_lowers_the_folds_for_a_small_cohort(tmp_path):
    bids = dataset(tmp_path / "bids", 6)
    text, config = written(tmp_path, str(bids), "--target", "sex")
    assert config["task"] == "classification" and "classes F (3), M (3)" in text
    assert config["split"]["folds"] < 5  # 6 participants cannot fill 5 folds and a test set
    assert f"folds: {config['split']['folds']}  # split.folds: {config['split']['folds']} (the split with the fewest" in text
    check.check(config)


def test_init_says_what_to_fix(tmp_path, capsys):
    bids = dataset(tmp_path / "bids", 6)
    for args, says in [([str(bids), "--target", "agee"], "Did you mean `target: age`?"),
                       ([str(tmp_path / "nowhere")], "does not exist"),
                       ([str(bids / "sub-01")], "is not a BIDS dataset")]:
        with pytest.raises(SystemExit) as done:
            initconfig.main([*args, "--out", str(tmp_path / "x.yaml")])
        assert done.value.code == 2 and says in capsys.readouterr().err
    (tmp_path / "x.yaml").write_text("mine\n")
    with pytest.raises(SystemExit):
        initconfig.main([str(bids), "--out", str(tmp_path / "x.yaml")])
    assert "exists; give another --out, or --force" in capsys.readouterr().err
    assert (tmp_path / "x.yaml").read_text() == "mine\n"
