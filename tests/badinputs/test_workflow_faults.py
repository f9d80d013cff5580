"""Bad inputs through Snakemake itself: config faults stop the workflow before any job, and a
sample excluded at ingest or at preprocessing leaves the others going (or stops the run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from builders import BAD, GOOD_IDS, bad_image, good_dataset
from test_preprocessing import spike

from pipeline.intake import exclusions

REPO = Path(__file__).resolve().parents[2]


def study_config(tmp_path: Path, root: Path, **changes) -> dict:
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.update(bids_dir=str(root), results_dir=str(tmp_path / "results"), **changes)
    # The good images are noise (builders.good_dataset): no registration scores above qc_min's 0.5
    # or config qc's floors.
    config["preprocess"].update(resolution=8, shape=[20, 24, 20], n4=False, qc_min=None, registration_resolution=None)
    config["qc"] = {"floors": {}, "ceilings": {}}  # nor any cohort QC floor (config qc)
    config["explain"]["groundtruth"] = None
    return config


def write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("fault", ["misspelled_key", "results_dir_not_writable"])
def test_config_fault_stops_snakemake_before_any_job(fault, tmp_path):
    root = good_dataset(tmp_path / "bids")
    config = study_config(tmp_path, root)
    if fault == "misspelled_key":
        config["train"]["batchsize"] = config["train"].pop("batch_size")
        expected = "config key `train.batchsize` is not known. Did you mean `train.batch_size`? Valid keys under `train`"
    else:
        (tmp_path / "blocker").write_text("a file")
        config["results_dir"] = str(tmp_path / "blocker" / "results")
        expected = f"Cannot write to {tmp_path / 'blocker' / 'results'}"
    run = snakemake(write(tmp_path / "bad.yaml", config), tmp_path, "-n")
    assert run.returncode != 0 and expected in run.stdout + run.stderr, run.stderr[-3000:]


def snakemake(config: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("snakemake")
    return subprocess.run([str(exe), "--snakefile", str(REPO / "workflow" / "Snakefile"), "--configfile", str(config),
                           "--cores", "2", "--directory", str(cwd), *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PATH": f"{exe.parent}{os.pathsep}{os.environ['PATH']}"}, timeout=300)


@pytest.mark.slow
def test_samples_excluded_at_ingest_and_preprocessing_let_the_others_go_on(tmp_path):
    """Five participants: sub-04 passes ingest but fails preprocessing, sub-05's image is zero bytes.
    continue: both are in excluded.tsv (with their stage), samples.tsv holds the other three.
    stop (sub-05 left out by config): sub-04's preprocessing job ends the run naming its file and
    leaves none of its outputs."""
    everyone = [*GOOD_IDS, BAD, "sub-05"]
    root = good_dataset(tmp_path / "bids", [{"participant_id": p, "age": str(30 + i)} for i, p in enumerate(everyone)],
                        {pid: [""] for pid in everyone})
    spike(bad_image(root))
    (root / "sub-05" / "anat" / "sub-05_T1w.nii.gz").write_bytes(b"")
    results = tmp_path / "results"
    done = snakemake(write(tmp_path / "continue.yaml", study_config(tmp_path, root)), tmp_path, str(results / "samples.tsv"))
    assert done.returncode == 0, done.stderr[-3000:]
    excluded = exclusions.read_table(results / "excluded.tsv").set_index("participant_id")
    assert excluded.loc["sub-05", "stage"] == "ingest" and "zero-byte file" in excluded.loc["sub-05", "reason"]
    assert excluded.loc[BAD, "stage"] == "preprocess" and "99 % of its voxels are 0" in excluded.loc[BAD, "reason"]
    assert excluded.loc[BAD, "file"] == str(bad_image(root).absolute())
    assert pd.read_csv(results / "samples.tsv", sep="\t")["participant_id"].tolist() == GOOD_IDS

    shutil.rmtree(results)
    record = results / "derivatives" / "pipeline" / BAD / "anat" / f"{BAD}_desc-preproc_excluded.tsv"
    stop = study_config(tmp_path, root, on_error="stop")
    stop["participants"]["exclude"] = ["sub-05"]  # else ingest stops first
    stopped = snakemake(write(tmp_path / "stop.yaml", stop), tmp_path, str(record))
    assert stopped.returncode != 0
    log = (results / "logs" / "preprocess" / BAD / f"{BAD}.log").read_text()
    assert f"ERROR: {bad_image(root).absolute()}: 99 % of its voxels are 0" in log and "Traceback" not in log
    assert not (results / "derivatives" / "pipeline" / BAD).exists() or not any((results / "derivatives" / "pipeline" / BAD).rglob("*.*"))
