"""A 2,000-subject study planned with the SLURM profile: how many jobs it would submit.

The dataset is 2,000 subjects of 2 × 2 × 2-voxel NIfTIs (ingestion opens every image, so they must
be valid, not empty). Ingestion runs for real and locally, because the plan after the ``ingest``
checkpoint needs its manifest; then ``snakemake --profile workflow/profiles/slurm -n`` plans the
study. No scheduler is needed: the dry run only groups and prints the jobs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "workflow" / "profiles" / "slurm"
N_SUBJECTS = 2000


def snakemake(workdir: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["timeout", str(timeout), sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), *args]
    run = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    assert run.returncode != 124, f"snakemake {' '.join(args)} ran past {timeout} s"
    return run


def write_tiny_bids(root: Path, n_subjects: int) -> Path:
    """``n_subjects`` participants with one 2 × 2 × 2-voxel T1w each (352-byte header + 16 bytes)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "scale", "BIDSVersion": "1.9.0"}))
    image = nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.diag([4.0, 4.0, 4.0, 1.0]))
    rows = ["participant_id\tage"]
    for i in range(1, n_subjects + 1):
        pid = f"sub-{i:05d}"
        (root / pid / "anat").mkdir(parents=True)
        nib.save(image, root / pid / "anat" / f"{pid}_T1w.nii")
        rows.append(f"{pid}\t{20 + i % 60}")
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def batch_size() -> int:
    """Images per preprocessing job, from the profile's ``group-components``."""
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text())
    components = dict(item.split("=") for item in profile["group-components"])
    return int(components["preprocess"])


def group_jobs(dry_run_log: str) -> list[set[str]]:
    """The images of every preprocessing group job printed by a dry run."""
    blocks = re.split(r"^.*Group job preprocess .*$", dry_run_log, flags=re.M)[1:]
    return [set(re.findall(r"wildcards: subdir=\S+, image=(\S+)", block)) for block in blocks]


def test_two_thousand_subjects_make_a_few_dozen_preprocessing_jobs(tmp_path):
    bids = write_tiny_bids(tmp_path / "bids", N_SUBJECTS)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump({"bids_dir": str(bids), "results_dir": "results"}))
    ingest = snakemake(tmp_path, "--cores", "1", "results/manifest.tsv")
    assert ingest.returncode == 0, ingest.stderr[-3000:]

    start = time.monotonic()
    plan = snakemake(tmp_path, "--profile", str(PROFILE), "--dry-run")
    seconds = time.monotonic() - start
    assert plan.returncode == 0, plan.stderr[-3000:]
    log = plan.stdout + plan.stderr

    groups = group_jobs(log)
    n = batch_size()
    sizes = sorted(len(g) for g in groups)
    print(f"{N_SUBJECTS} subjects: {len(groups)} preprocessing jobs of {sizes[0]}-{sizes[-1]} images "
          f"(group-components preprocess={n}); dry run {seconds:.1f} s")
    assert len(groups) == math.ceil(N_SUBJECTS / n) <= 300
    assert set().union(*groups) == {f"sub-{i:05d}" for i in range(1, N_SUBJECTS + 1)}
    assert sum(sizes) == N_SUBJECTS and sizes[-1] == n
    stats = log.split("Job stats:")[1].split("\n\n")[0]
    assert re.search(r"^preprocess\s+2000$", stats, re.M)
    folds = 5  # the schema's default
    expected = {"grid": 1, "split": 1, "train": folds, "evaluate": folds, "evaluate_summary": 1, "explain": folds,
                "explain_group": 1, "report": 1}
    assert all(re.search(rf"^{rule}\s+{n}$", stats, re.M) for rule, n in expected.items()), stats
