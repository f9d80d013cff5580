"""The demo study on a real SLURM cluster, through ``snakemake --profile workflow/profiles/slurm``.

Needs a running cluster whose configuration the SLURM commands find (as root on Debian:
``tests/cluster/slurm.sh up``, which is what ``.ci/run`` does); skipped otherwise, or failed when
PIPELINE_REQUIRE_SLURM is set. A tiny cohort
(10 subjects, 8 mm grid, 2 epochs) runs end to end as SLURM jobs. Checked: every job of the study
ran under SLURM (its job id in the executor's per-job log and, completed, in the cluster's
job-completion log) with the resources its rule declares; preprocessing ran in batches; and every
result (preprocessed arrays, transforms, splits, weights, predictions, metrics, maps) equals, byte
for byte or value for value, an independent local run of the same study (registration runs one
ITK thread with a fixed seed, training and explanation the same thread count in both runs).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.demo.cohort import make_demo

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
# seconds; a hung status check must fail the test, not CI. The local reference run shares 2 cores
# with the SLURM run and `make test` in CI: at 600 s it was once killed in its last job.
TIMEOUT = 900
N_SUBJECTS = 10
BATCH = 6  # images per preprocessing job (the profile's 50 would make one job here)
CONFIG = {
    "results_dir": "results",
    "target": "age",
    "task": "regression",
    "preprocess": {"resolution": 8, "shape": [20, 24, 20], "n4": False, "brain_extraction": "none",  # N4 is not what this tests
                   "registration_resolution": None},
    "split": {"test": 0.2, "folds": 2, "seed": 0},
    "train": {"epochs": 2, "batch_size": 4},
    "explain": {"window": 4, "stride": 4, "sanity_images": 0},  # the randomisation check is not what this tests
}
# The test node has 2 CPUs: a batch may ask for 2 (the profile's 8 would never be scheduled), and
# both runs give train/explain the same 2 threads. Status checks start after 2 s instead of 40.
SLURM_ARGS = ["--cores", "2", "--group-components", f"preprocess={BATCH}",
              "--slurm-init-seconds-before-status-checks", "2"]
FOLDS = ["fold-1", "fold-2"]
# rule: (SLURM jobs, cpus, mem_mb) of every rule but preprocess
RULE_JOBS = {"ingest": (1, 1, 2000), "bidsvalidation": (1, 1, 2000), "grid": (1, 1, 2000), "qc": (1, 1, 1000),
             "exclusions": (1, 1, 1000), "split": (1, 1, 1000), "train": (2, 2, 8000),
             "evaluate": (2, 1, 4000), "evaluate_summary": (1, 1, 2000), "explain": (2, 2, 8000), "linear": (2, 1, 3000),
             "explain_group": (1, 1, 4000), "bidsout": (1, 1, 2000), "report": (1, 1, 2000),
             "export": (1, 1, 4000)}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["timeout", "--kill-after=30", str(TIMEOUT), sys.executable, "-m", "snakemake",
           "-s", str(REPO / "workflow" / "Snakefile"), *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)


def cluster_problem() -> str | None:
    """Why no SLURM cluster can run the test here, or None."""
    if not (shutil.which("sbatch") and shutil.which("scontrol")):
        return "SLURM commands not installed (as root on Debian: tests/cluster/slurm.sh up)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    if ping.returncode != 0 or "UP" not in ping.stdout:
        return f"no SLURM controller answers `scontrol ping` ({(ping.stdout + ping.stderr).strip()[:200]})"
    return None


def jobcomp_records(run_id: str) -> dict[str, dict[str, str]]:
    """The job-completion log's records of the SLURM jobs named ``run_id`` (the plugin names every job
    of a run so), by job id."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    settings = dict(re.findall(r"^(\w+)\s+=\s+(.*?)\s*$", config, re.M))
    assert settings.get("JobCompType") == "jobcomp/filetxt", "the cluster must log finished jobs to a text file"
    records = {}
    for line in Path(settings["JobCompLoc"]).read_text().splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if fields.get("Name") == run_id:
            records[fields["JobId"]] = fields
    return records


def tres(record: dict[str, str]) -> tuple[int, int]:
    """(cpus, memory in MB) that SLURM allocated to a job."""
    alloc = dict(item.split("=") for item in record["Tres"].split(","))
    mem = alloc["mem"]
    return int(alloc["cpu"]), int(float(mem[:-1]) * (1024 if mem.endswith("G") else 1))


@dataclass
class Study:
    workdir: Path
    log: str
    seconds: float

    @property
    def results(self) -> Path:
        return self.workdir / "results"


def write_config(workdir: Path, cohort: Path) -> None:
    (workdir / "config").mkdir(parents=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "bids_dir": str(cohort)}))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    problem = cluster_problem()
    if problem and os.environ.get("PIPELINE_REQUIRE_SLURM"):  # CI started a cluster: never skip
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)
    return make_demo(tmp_path_factory.mktemp("data") / "demo", n_subjects=N_SUBJECTS, seed=0, sim_resolution=4)


@pytest.fixture(scope="module")
def local_process(tmp_path_factory, cohort) -> tuple[Path, subprocess.Popen, float]:
    """The same study from scratch on this machine, without SLURM, started in the background: it
    runs while the SLURM run mostly waits for the scheduler."""
    workdir = tmp_path_factory.mktemp("local")
    write_config(workdir, cohort)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["timeout", "--kill-after=30", str(TIMEOUT), sys.executable, "-m", "snakemake",
           "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2"]  # the SLURM jobs' threads
    process = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield workdir, process, time.monotonic()
    if process.poll() is None:
        process.kill()


@pytest.fixture(scope="module")
def slurm_study(tmp_path_factory, cohort, local_process) -> Study:
    workdir = tmp_path_factory.mktemp("slurm")
    write_config(workdir, cohort)
    start = time.monotonic()
    run = snakemake(workdir, "--profile", str(PROFILE), *SLURM_ARGS)
    seconds = time.monotonic() - start
    log = run.stdout + run.stderr
    run_id = re.search(r"SLURM run ID: (\S+)", log)
    if run.returncode != 0 and run_id:  # leave no job of a failed run behind
        subprocess.run(["scancel", "--name", run_id[1]], capture_output=True)
    assert run.returncode != 124, f"the SLURM run took more than {TIMEOUT} s:\n{log[-5000:]}"
    assert run.returncode == 0, log[-5000:]
    print(f"SLURM run: {seconds:.0f} s")
    return Study(workdir, log, seconds)


@pytest.fixture(scope="module")
def slurm_jobs(slurm_study) -> dict[str, tuple[str, dict[str, str]]]:
    """Every SLURM job of the run: job id -> (the folder of its executor log, its jobcomp record)."""
    run_id = re.search(r"SLURM run ID: (\S+)", slurm_study.log)[1]
    records = jobcomp_records(run_id)
    logs = {p.stem: p.parent.relative_to(slurm_study.workdir / ".snakemake" / "slurm_logs").parts[0]
            for p in (slurm_study.workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert set(logs) == set(records), f"executor logs {sorted(logs)} vs job-completion log {sorted(records)}"
    return {job: (logs[job], records[job]) for job in records}


@pytest.fixture(scope="module")
def local_study(local_process) -> Study:
    workdir, process, start = local_process
    log, _ = process.communicate(timeout=TIMEOUT + 60)
    assert process.returncode == 0, log[-5000:]
    return Study(workdir, log, time.monotonic() - start)


def test_every_job_ran_under_slurm_with_its_rules_resources(slurm_study, slurm_jobs):
    images = len(pd.read_csv(slurm_study.results / "manifest.tsv", sep="\t"))
    folders = sorted(folder for folder, _ in slurm_jobs.values())
    expected = [f"rule_{rule}" for rule, (n, _, _) in RULE_JOBS.items() for _ in range(n)]
    assert folders == sorted(expected + ["group_preprocess_preprocess"] * math.ceil(images / BATCH))
    for job, (folder, record) in slurm_jobs.items():
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
        assert f"submitted with SLURM jobid {job} " in slurm_study.log
        if folder.startswith("rule_"):
            assert tres(record) == RULE_JOBS[folder.removeprefix("rule_")][1:], (folder, record["Tres"])
    assert (slurm_study.results / "report.html").exists()


def test_preprocessing_ran_in_batches_of_images(slurm_study, slurm_jobs):
    manifest = pd.read_csv(slurm_study.results / "manifest.tsv", sep="\t")
    batches = {}
    for job, (folder, record) in slurm_jobs.items():
        if folder.startswith("group_preprocess"):
            log = (slurm_study.workdir / ".snakemake" / "slurm_logs" / folder / f"{job}.log").read_text()
            batches[job] = set(re.findall(r"wildcards: subdir=\S+, image=(\S+)", log))
            assert tres(record) == (2, 2 * 3000), record["Tres"]  # 2 images side by side on --cores 2
    assert sorted(len(b) for b in batches.values()) == sorted(
        [BATCH] * (len(manifest) // BATCH) + ([len(manifest) % BATCH] if len(manifest) % BATCH else []))
    assert set().union(*batches.values()) == set(manifest["image_id"])
    for row in manifest.itertuples():
        assert (slurm_study.results / "derivatives" / "pipeline" / row.subdir / "anat"
                / f"{row.image_id}_space-MNI152NLin2009aSym_desc-preproc_T1w.npy").exists()


def test_results_equal_a_local_run(slurm_study, local_study):
    print(f"SLURM run {slurm_study.seconds:.0f} s, local run {local_study.seconds:.0f} s")
    slurm, local = slurm_study.results, local_study.results
    exact = ["manifest.tsv", "ingest_report.tsv", "targets.json", "splits.tsv", "split_balance.tsv",
             "evaluate/metrics.tsv", "evaluate/predictions.tsv", "evaluate/metrics.json"]
    for fold in FOLDS:
        exact += [f"evaluate/{fold}/predictions.tsv", f"evaluate/{fold}/metrics.json",
                  f"train/{fold}/hyperparameters.json", f"explain/{fold}/maps.tsv"]
    derived = sorted(p.relative_to(slurm) for p in (slurm / "derivatives").rglob("*") if p.suffix in (".npy", ".mat"))
    assert len(derived) >= 3 * 10 and derived == sorted(
        p.relative_to(local) for p in (local / "derivatives").rglob("*") if p.suffix in (".npy", ".mat"))
    for name in [*exact, *derived, *(p.relative_to(slurm) for p in (slurm / "grid").iterdir())]:
        assert (slurm / name).read_bytes() == (local / name).read_bytes(), name
    for fold in FOLDS:
        history = [pd.read_csv(r / "train" / fold / "history.tsv", sep="\t").drop(columns=["seconds", "data_wait"])
                   for r in (slurm, local)]
        pd.testing.assert_frame_equal(*history, check_exact=True)
        states = [torch.load(r / "train" / fold / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
                  for r in (slurm, local)]
        assert states[0].keys() == states[1].keys()
        assert all(torch.equal(states[0][k], states[1][k]) for k in states[0]), fold
    maps = sorted(p.relative_to(slurm) for p in (slurm / "explain").rglob("*.nii.gz"))
    assert len(maps) >= 12 and maps == sorted(p.relative_to(local) for p in (local / "explain").rglob("*.nii.gz"))
    for name in maps:
        a, b = nib.load(slurm / name), nib.load(local / name)
        assert np.array_equal(a.affine, b.affine) and np.array_equal(a.get_fdata(), b.get_fdata()), name
