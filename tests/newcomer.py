"""A newcomer's first minutes, timed (issue #28, Measure): an unknown BIDS folder → `bids-deepstudy
init` (a config from config/study.yaml with the dataset's facts) → `bids-deepstudy check` →
`bids-deepstudy run BIDS_DIR OUTPUT_DIR group --dry-run`.

    python tests/newcomer.py [N_PARTICIPANTS] [--keep DIR]

Writes a BIDS dataset of N participants (default 100; a third of them with two sessions, 32³-voxel
T1w images, participants.tsv with `age`, `sex` and `site`) into a temporary folder, then runs,
each as its own process, as a person types them (README's *Your own study*):

    python -m pipeline init bids --out my.yaml
    python -m pipeline check my.yaml
    python -m pipeline run bids out group --config-file my.yaml --dry-run

and prints the seconds each took (Python start-up and imports included) and their sum. Exits 1
when a command fails or the sum is 30 s or more. Writing the dataset is not timed. Nothing is
downloaded. docs/benchmarks.md, *A newcomer's first check and dry run*, records the figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
GOAL_S = 30.0


def write_dataset(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` participants; every third has sessions ses-01 and ses-02, the others none."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "newcomer", "BIDSVersion": "1.9.0"}\n')
    rows = ["participant_id\tage\tsex\tsite"]
    for i in range(1, n + 1):
        pid = f"sub-{i:03d}"
        rows.append(f"{pid}\t{rng.uniform(20, 80):.1f}\t{'MF'[i % 2]}\tsite{i % 3}")
        for session in (["ses-01", "ses-02"] if i % 3 == 0 else [""]):
            anat = root / pid / session / "anat"
            anat.mkdir(parents=True)
            name = "_".join(filter(None, [pid, session, "T1w.nii.gz"]))
            data = rng.normal(100, 10, (32, 32, 32)).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([6.0, 6.0, 6.0, 1.0])), anat / name)
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    return root


def timed(command: list[str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, done


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n", type=int, nargs="?", default=100)
    parser.add_argument("--keep", type=Path, help="work in this (new) folder and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        write_dataset(folder / "bids", args.n)
        time.sleep(2)  # the tree at rest (the index trusts folders older than 2 s)
        python = [sys.executable, "-m", "pipeline"]
        total, ok = 0.0, True
        for label, command in [("init", [*python, "init", "bids", "--out", "my.yaml"]),
                               ("check", [*python, "check", "my.yaml"]),
                               ("run --dry-run", [*python, "run", "bids", "out", "group", "--config-file", "my.yaml",
                                                  "--dry-run"])]:
            seconds, done = timed(command, folder)
            total += seconds
            ok &= done.returncode == 0
            summary = [line for line in (done.stdout + done.stderr).splitlines()
                       if "participants," in line or line.startswith(("plan:", "split.folds"))]
            print(f"{label:14s} {seconds:6.1f} s  exit {done.returncode}  {summary[0] if summary else ''}")
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
        print(f"{'total':14s} {total:6.1f} s  (goal: under {GOAL_S:g} s for {args.n} participants)")
    return 0 if ok and total < GOAL_S else 1


if __name__ == "__main__":
    sys.exit(main())
