"""Ingest speed at scale: this ingest (cold and warm), pybids' default indexing and a bare glob, one tree.

    python benchmarks/ingest.py [N_SUBJECTS] [--pybids-subjects M] [--no-pybids] [--tree DIR]

Writes a BIDS tree of N subjects (default 10,000) × 2 sessions into a temporary folder: per
session anat/T1w.nii.gz + .json and func/task-rest_bold.nii.gz + .json, a sessions.tsv per
subject, and participants.tsv. Every file is empty except the T1w images, which hold a real
1-voxel NIfTI (ingest reads the header of every image it selects; an empty file would be excluded
as zero-byte), and the JSON sidecars, which hold ``{}`` (pybids parses them).

Timed, in one process (imports excluded, the tree in the OS file cache for every method):
* ingest cold: ``python -m pipeline.intake.ingest`` as the workflow runs it (``check_data: false``) with an
  empty cache folder: walks the tree, parses every NIfTI name, reads every selected header, joins
  participants.tsv, writes manifest, report and targets;
* ingest warm: the same again, nothing changed (index and header checks come from the cache);
* pybids: ``BIDSLayout(root)`` with pybids' defaults (validation and metadata indexing on), on the
  same tree or on its first M subjects (``--pybids-subjects``) when a full run would take too long;
* glob: ``glob("sub-*/**/*_T1w.nii*", recursive=True)``, what a hand-written loader does (no
  entities, targets or checks).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.intake import bidsindex
from pipeline.intake import ingest


def write_tree(root: Path, n_subjects: int) -> Path:
    """The benchmark dataset (see the module docstring)."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "benchmark", "BIDSVersion": "1.9.0"}))
    rows = [f"sub-{i:05d}\t{20 + i % 60}\t{'FM'[i % 2]}" for i in range(n_subjects)]
    (root / "participants.tsv").write_text("participant_id\tage\tsex\n" + "\n".join(rows) + "\n")
    one_voxel = nib.Nifti1Image(np.ones((1, 1, 1), np.int16), np.eye(4)).to_bytes()
    t1w = nib.Nifti1Image.from_bytes(one_voxel)
    with tempfile.TemporaryDirectory() as tmp:  # nibabel writes the gzip; its bytes are copied
        nib.save(t1w, Path(tmp) / "t.nii.gz")
        t1w_bytes = (Path(tmp) / "t.nii.gz").read_bytes()
    for i in range(n_subjects):
        sub = f"sub-{i:05d}"
        (root / sub).mkdir()
        (root / sub / f"{sub}_sessions.tsv").write_text("session_id\tage\nses-01\t30\nses-02\t31\n")
        for ses in ("ses-01", "ses-02"):
            for datatype, stem in (("anat", "T1w"), ("func", "task-rest_bold")):
                folder = root / sub / ses / datatype
                folder.mkdir(parents=True)
                (folder / f"{sub}_{ses}_{stem}.nii.gz").write_bytes(t1w_bytes if datatype == "anat" else b"")
                (folder / f"{sub}_{ses}_{stem}.json").write_text("{}")
    return root


def run_ingest(root: Path, out: Path) -> int:
    """``python -m pipeline.intake.ingest`` in this process (stderr captured); the manifest's row count."""
    from pipeline.common import config

    keys = config.resolved([], {"bids_dir": str(root), "target": "age", "task": "regression", "check_data": False})
    argv = ["--config", json.dumps(keys), "--cache-dir", str(out / "cache"), "--manifest", str(out / "manifest.tsv"),
            "--report", str(out / "report.tsv"), "--targets", str(out / "t.json")]
    with contextlib.redirect_stderr(io.StringIO()):
        ingest.main(argv)
    return sum(1 for _ in open(out / "manifest.tsv")) - 1


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - start, result


def pybids_index(root: Path) -> int:
    from bids import BIDSLayout

    return len(BIDSLayout(root).get(suffix="T1w", extension=[".nii", ".nii.gz"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("n_subjects", type=int, nargs="?", default=10_000)
    parser.add_argument("--pybids-subjects", type=int, help="time pybids on the first M subjects only")
    parser.add_argument("--no-pybids", action="store_true", help="skip pybids")
    parser.add_argument("--repeats", type=int, default=3, help="median of this many runs (not for pybids)")
    parser.add_argument("--tree", type=Path, help="keep the tree here (reused when it exists) instead of a temporary folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = args.tree or tmp / "bids"
        if not root.exists():
            seconds, root = timed(write_tree, root, args.n_subjects)
            print(f"tree: {args.n_subjects} subjects × 2 sessions written in {seconds:.1f} s", file=sys.stderr)
        time.sleep(bidsindex.RACY_NS / 1e9)  # a dataset at rest: folders modified this recently are always rescanned
        bidsindex.entity_rules()  # imports pybids' entity configuration once, as every method's imports are excluded
        rows = {}
        rows["glob"] = [timed(lambda: len(glob.glob(f"{root}/sub-*/**/*_T1w.nii*", recursive=True))) for _ in range(args.repeats)]
        rows["ingest cold"] = [timed(run_ingest, root, tmp / f"cold{i}") for i in range(args.repeats)]
        rows["ingest warm"] = [timed(run_ingest, root, tmp / "cold0") for _ in range(args.repeats)]
        if not args.no_pybids:
            subset = root
            if args.pybids_subjects and args.pybids_subjects < args.n_subjects:
                subset = write_tree(tmp / "subset", args.pybids_subjects)
            rows[f"pybids BIDSLayout ({args.pybids_subjects or args.n_subjects} subjects)"] = [timed(pybids_index, subset)]
    glob_s = statistics.median(s for s, _ in rows["glob"])
    print(f"| method ({args.n_subjects} subjects × 2 sessions) | seconds | × glob | T1w images found |")
    print("|---|---|---|---|")
    for name, runs in rows.items():
        seconds = statistics.median(s for s, _ in runs)
        print(f"| {name} | {seconds:.2f} | {seconds / glob_s:.1f} | {runs[0][1]} |")


if __name__ == "__main__":
    main()
