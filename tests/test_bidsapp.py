"""The BIDS-App form of `bids-deepstudy run` (issue #28, Build 3, 5 and 6): folders and levels from
the command line, Snakemake's state in the work folder, a dry run that writes nothing and reads as
one line per job, and `--device cuda` setting the GPU resource itself (dry runs on the CPU).

The two dry runs plan a 10-participant dataset of 6³-voxel images with Snakemake itself (about
10 s each); the rest calls the functions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_bids
from pipeline.common import bidsapp, launch
from pipeline.common.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PEOPLE = [{"participant_id": f"sub-{i:03d}", "age": str(20 + 3 * i)} for i in range(1, 11)]
SMALL = {"preprocess": {"resolution": 8, "shape": [20, 24, 20], "registration_resolution": 8,
                        "brain_extraction": "none", "n4": False},
         "split": {"folds": 2, "test": 0.2}, "train": {"epochs": 1}, "bids_validation": False}


@pytest.fixture
def study(tmp_path) -> dict[str, Path]:
    """A dataset, a study config (config/study.yaml with small settings), and a folder to run from."""
    bids = write_bids(tmp_path / "bids", PEOPLE, {p["participant_id"]: [""] for p in PEOPLE}, shape=(6, 6, 6))
    config = yaml.safe_load((REPO / "config" / "study.yaml").read_text())
    for key, value in SMALL.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    here = tmp_path / "here"
    here.mkdir()
    return {"bids": bids, "config": path, "here": here}


def files_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def bids_deepstudy(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_participant_dry_run_is_one_line_per_job_and_writes_nothing(study):
    """`run BIDS OUT participant --dry-run`: the pre-flight's summary (no split at this level), one
    line per job, the table of jobs per rule; no OUTPUT_DIR, no work folder, the dataset untouched."""
    before = files_under(study["bids"])
    done = bids_deepstudy("run", str(study["bids"]), "out", "participant", "--config-file", str(study["config"]),
                          "--dry-run", cwd=study["here"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "10 participants, 10 images, 1 channel\n" in done.stderr and "folds" not in done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "plan: 5 job(s)", done.stdout  # bids_validation is off in SMALL
    # publish: the images (not the arrays) from the work folder to OUTPUT_DIR/derivatives/pipeline
    assert sorted(lines[1:6]) == ["  exclusions", "  grid", "  ingest", "  publish", "  qc"]
    table = lines[lines.index("Job stats:"):]
    assert table[1].split() == ["job", "count"] and table[8].split() == ["total", "5"]
    assert "one `preprocess` per selected image" in done.stdout and "python -m pipeline" not in done.stdout
    assert "add --print-commands (-p)" in lines[-1]
    assert list(study["here"].iterdir()) == [] and files_under(study["bids"]) == before


@pytest.mark.slow
def test_participant_level_keeps_arrays_and_state_in_the_work_folder(study):
    """`run BIDS OUT participant --work-dir W` for real (issue #28, item 3): preprocessing's arrays,
    ingest's cache, the grid and Snakemake's state in W; OUT/derivatives/pipeline the preprocessed
    images (hard links to W's) as a BIDS derivative dataset with no validator error (~1 min)."""
    from pipeline.intake import bidsvalidation

    config = yaml.safe_load(study["config"].read_text())
    config["preprocess"]["qc_min"] = None  # 6³ noise images: no registration passes a QC threshold
    config["qc"] = {"floors": {}, "ceilings": {}, "robust_z": None}
    study["config"].write_text(yaml.safe_dump(config))
    done = bids_deepstudy("run", str(study["bids"]), "out", "participant", "--config-file", str(study["config"]),
                          "--participant-label", "001", "002", "--work-dir", "work", "--cores", "2", cwd=study["here"])
    assert done.returncode == 0, done.stderr[-3000:]
    out, work = study["here"] / "out", study["here"] / "work"
    published = out / "derivatives" / "pipeline"
    images = sorted(published.rglob("*_desc-preproc_T1w.nii.gz"))
    assert len(images) == 2 and (published / "dataset_description.json").is_file()
    assert len(list(published.rglob("*_xfm.mat"))) == 4 and len(list(published.rglob("*_desc-qc_T1w.png"))) == 2
    assert not list(out.rglob("*.npy")) and not (out / ".snakemake").exists()
    assert not {"grid", "ingest_cache", "train"} & {p.name for p in out.iterdir()}
    assert len(list((work / "derivatives" / "pipeline").rglob("*.npy"))) == 2
    assert (work / ".snakemake").is_dir() and (work / "ingest_cache").is_dir() and (work / "grid").is_dir()
    source = work / images[0].relative_to(out)
    assert images[0].read_bytes() == source.read_bytes() and images[0].stat().st_ino == source.stat().st_ino
    validator = bidsvalidation.find_validator()
    if validator is not None:
        summary = bidsvalidation.summarise(bidsvalidation.run_validator(published, validator))
        print("\n".join(bidsvalidation.lines({"dataset": str(published), **summary})))
        assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}


def test_group_dry_run_with_labels_and_cuda_asks_for_the_gpu_resource(study):
    """--participant-label and --session-label become config values; --device cuda gives the jobs
    device cuda and the gpu resource, and Snakemake --resources gpu=1 (they queue on one GPU); -p
    shows Snakemake's full plan with one line per fold and wildcards."""
    labels = [f"{i:03d}" for i in range(1, 9)]
    done = bids_deepstudy("run", str(study["bids"]), "out", "group", "--config-file", str(study["config"]),
                          "--participant-label", *labels, "--session-label", "first", "--device", "cuda",
                          "--work-dir", "scratch", "--cores", "2", "-n", "-p", cwd=study["here"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 participants, 8 images, 1 channel → 2 folds" in done.stderr
    [command] = [line for line in (done.stdout + done.stderr).splitlines() if "Command:" in line]
    here = study["here"].resolve()
    for part in [f'results_dir="{here / "out"}"', f'work_dir="{here / "scratch"}"', 'sessions="first"',
                 'participants={"include": ["001", "002", "003", "004", "005", "006", "007", "008"]}',
                 'device="cuda"', "gpu=True", "--cores 2", "--resources gpu=1"]:
        assert part in command, command
    blocks = done.stdout.split("\nrule ")
    train = [b for b in blocks if b.startswith("train:")]
    assert len(train) == 2 and all("gpu=1" in b and f"{here / 'scratch'}/train/fold-" in b for b in train)
    assert all("--device cuda" in b for b in train)
    ingest = next(b for b in done.stdout.split("\ncheckpoint ") if b.startswith("ingest:"))
    assert "gpu=" not in ingest.split("resources:")[1].split("\n")[0]  # CPU jobs ask for none
    assert list(study["here"].iterdir()) == []  # the work folder did not exist: Snakemake ran in a scratch folder


def namespace(**given) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bidsapp.add_arguments(parser)
    args = parser.parse_args(["bids", "out", "group"])
    return argparse.Namespace(**{**vars(args), **given})


def test_gpu_jobs_follow_the_device_and_train_gpus():
    """--device cuda: K GPU jobs at once (default 1: they queue); a training job on N GPUs raises K to N."""
    assert bidsapp.gpu_slots(namespace(), {}) == []
    assert bidsapp.gpu_slots(namespace(device="cuda"), {}) == ["--resources", "gpu=1"]
    assert bidsapp.gpu_slots(namespace(device="cuda", gpu_jobs=2), {"train": {"gpus": 1}}) == ["--resources", "gpu=2"]
    assert bidsapp.gpu_slots(namespace(device="cuda"), {"train": {"gpus": 4}}) == ["--resources", "gpu=4"]
    assert bidsapp.gpu_slots(namespace(), {"gpu": True}) == ["--resources", "gpu=1"]  # config gpu: true alone
    values = bidsapp.study_values(namespace(device="cuda"), Path("/w"))
    assert values["device"] == "cuda" and values["gpu"] is True
    assert bidsapp.config_value("gpu", True) == "gpu=True" and bidsapp.config_value("x", "a: b") == 'x="a: b"'


def test_a_work_folder_serves_one_output_folder(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    assert bidsapp.work_folder(work, out) == work.resolve()
    bidsapp.claim(work, out)
    assert json.loads((work / bidsapp.CLAIM).read_text()) == {"output_dir": str(out.resolve())}
    assert bidsapp.work_folder(work, out) == work.resolve()  # the same study again
    with pytest.raises(InputError, match=r"holds the state of the study in .*/out, not of .*/other"):
        bidsapp.work_folder(work, tmp_path / "other")
    with pytest.raises(InputError, match="is OUTPUT_DIR itself"):
        bidsapp.work_folder(out, out)


def test_relative_paths_of_the_config_are_made_absolute(tmp_path):
    """Snakemake runs in the work folder: paths relative to where the command ran are made absolute."""
    (tmp_path / "atlas.nii.gz").write_text("x")
    (tmp_path / "registry").mkdir()
    config = {"registry": "registry", "explain": {"atlas": {"image": "atlas.nii.gz", "labels": "missing.tsv"}},
              "container_image": "docker://x/y:1"}
    assert bidsapp.absolute_paths(config, tmp_path) == {
        "registry": str((tmp_path / "registry").resolve()),
        "explain": {"atlas": {"image": str((tmp_path / "atlas.nii.gz").resolve())}}}


def test_the_bids_app_form_is_told_apart_from_snakemakes():
    assert bidsapp.is_bidsapp(["/data/bids", "/data/out", "participant", "--cores", "2"])
    assert bidsapp.is_bidsapp(["bids", "out", "group"])
    assert not bidsapp.is_bidsapp(["--configfile", "my.yaml", "-n"])
    assert not bidsapp.is_bidsapp(["results/report.html", "--configfile", "my.yaml"])
    assert launch.readable_dry_run(["-n", "--configfile", "x"]) and not launch.readable_dry_run(["-n", "-p"])
    assert not launch.readable_dry_run(["--configfile", "x"])
