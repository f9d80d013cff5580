"""config/study.yaml, the starting point for real scans: it passes every config check, its 2 mm
grid covers the template brain, and the workflow plans a whole study with it on a tiny dataset."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from conftest import write_bids
from pipeline import check
from pipeline.intake.template import brain_mask_on_grid

REPO = Path(__file__).resolve().parents[1]
STUDY = REPO / "config" / "study.yaml"


def test_study_config_passes_every_check_with_real_scan_settings():
    config = yaml.safe_load(STUDY.read_text())
    check.check(config)  # the schema's checks and the stages' checks across keys
    pre = config["preprocess"]
    assert pre["brain_extraction"] == "deepbet" and pre["resolution"] == 2 and pre["qc_min"] is not None
    assert config["split"]["folds"] == 5 and config["explain"]["groundtruth"] is None
    assert "demo" not in config["bids_dir"] and config["results_dir"] != "results"  # the demo's


def test_study_grid_covers_the_template_brain():
    pre = yaml.safe_load(STUDY.read_text())["preprocess"]
    mask = np.asarray(brain_mask_on_grid(pre["resolution"], pre["shape"]).dataobj) > 0
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    assert mask.sum() > 100_000 and not any(face.any() for face in faces)  # no brain voxel on the border


def test_study_config_plans_a_whole_study(tmp_path):
    """Ingest for real on a tiny BIDS dataset (the plan after the checkpoint needs the manifest),
    then a dry run plans preprocessing per image, the QC table, five folds and the report."""
    people = [{"participant_id": f"sub-{i:02d}", "age": str(20 + 5 * i)} for i in range(1, 9)]
    bids = write_bids(tmp_path / "bids", people, {p["participant_id"]: [""] for p in people})
    (tmp_path / "config").mkdir()
    shutil.copy(STUDY, tmp_path / "config" / "config.yaml")  # the study config alone, not merged with the demo's
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}

    def snakemake(*args):
        return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                               "--cores", "1", *args, "--config", f"bids_dir={bids}"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    ingest = snakemake(f"{yaml.safe_load(STUDY.read_text())['results_dir']}/manifest.tsv")
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    plan = snakemake("-n", "--quiet", "rules")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = dict(line.split()[:2] for line in plan.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[1].isdigit())
    assert jobs["preprocess"] == "8" and jobs["qc"] == "1" and jobs["grid"] == "1"
    assert jobs["train"] == jobs["evaluate"] == jobs["explain"] == "5"
    assert {"exclusions", "split", "report", "export", "all"} <= set(jobs)


def test_check_of_a_config_that_does_not_exist_is_a_message(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit) as stopped:
        check.main([str(tmp_path / "nonexist.yaml")])
    assert stopped.value.code != 0
    error = capsys.readouterr().err
    assert "nonexist.yaml: no such config file" in error and "Traceback" not in error
