"""One small real study, run once per session with the real Snakemake workflow and shared by the
fault tests (tests/test_faults.py: its reference run) and the package/apply end-to-end test
(tests/test_package_workflow.py), which each used to run a study of their own.

The demo cohort (10 participants, simulated at 4 mm) is copied and made read-only
(``chmod -R a-w``); the whole workflow runs on that copy at an 8 mm grid, two folds, 30 epochs
(long enough for the fault test to kill a fold's training mid-way), occlusion and gradient maps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.demo.cohort import make_demo

REPO = Path(__file__).resolve().parents[1]
N_SUBJECTS = 10
CONFIG = {
    "results_dir": "results",
    "target": "age",
    "task": "regression",
    "check_data": False,
    "preprocess": {"resolution": 8, "shape": [20, 24, 20], "n4": False, "brain_extraction": "none",
                   "registration_resolution": None},
    # 2 test participants: config qc leaves 8 of 10 demo images at 8 mm
    "split": {"test": 0.3, "folds": 2, "seed": 0},
    "train": {"epochs": 30, "batch_size": 2, "patience": 30, "augmentation": {}},
    "explain": {"methods": ["occlusion", "gradient"], "window": 4, "stride": 4, "gradcam_layer": "features.1",
                "groundtruth": None},
}


def env() -> dict:
    """Jobs on this interpreter, one ITK and one OpenMP thread (runs compared byte for byte)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1", "OMP_NUM_THREADS": "1"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2", *args]


def write_config(workdir: Path, bids_dir: Path) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump({**CONFIG, "bids_dir": str(bids_dir)}))


def run(workdir: Path, *targets: str) -> subprocess.CompletedProcess:
    done = subprocess.run(command(*targets), cwd=workdir, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    return done


def cohort(root: Path) -> Path:
    return make_demo(root / "demo", n_subjects=N_SUBJECTS, seed=0, sim_resolution=4)


def read_only_copy(cohort: Path, dest: Path) -> Path:
    """A copy of ``cohort`` with every write bit removed (``writable`` gives them back)."""
    shutil.copytree(cohort, dest)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return dest


def writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 and mode of every file under ``root``, by relative path."""
    return {str(p.relative_to(root)): f"{p.stat().st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
            for p in sorted(root.rglob("*")) if p.is_file()}


def build(root: Path) -> dict:
    """The cohort, its read-only copy and that copy's digest before any run, and the finished
    study's folder (the whole workflow run on the read-only copy)."""
    source = cohort(root / "cohort")
    copy = read_only_copy(source, root / "readonly" / "demo")
    before = tree_digest(copy)
    workdir = root / "study"
    write_config(workdir, copy)
    run(workdir)
    return {"cohort": source, "read_only": copy, "digest": before, "workdir": workdir}
