"""Faults: kill -9 mid-study and rerun, a read-only input dataset, and the same seed twice.

One tiny study (8 mm grid, two folds; tests/smallstudy.py) runs twice, each time from scratch in a
fresh folder with the same config and seed:

* **reference**: uninterrupted, the whole workflow, on a copy of the cohort made read-only
  (``chmod -R a-w``): the session's shared small study (conftest ``small_study``, which the
  package/apply test reads too);
* **interrupted**: in a fresh folder, killed with SIGKILL (Snakemake and every job of its session)
  while preprocessing jobs run, unlocked and rerun (the default profile's ``rerun-incomplete``),
  killed again once a fold's training has written a checkpoint but not its model, unlocked and
  rerun to the end (to the fold maps and the evaluation: what is compared).

The interrupted study is also the determinism check (same config and seed twice, identical
metrics and map files): a third, uninterrupted run would add half a minute to the two minutes
these tests may take on 2 cores, and would show less (the kills only add ways to differ). Every
comparison is on bytes: preprocessed arrays, predictions, metrics, explanation maps (NIfTI), weights.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from smallstudy import N_SUBJECTS, command, env, run, tree_digest, write_config

pytestmark = pytest.mark.slow

# Compared between runs, relative to results/ (every fold's explanation maps are added; not
# manifest.tsv, which names the dataset's folder, and the reference reads a copy).
COMPARED = ["splits.tsv", "evaluate/fold-1/metrics.json", "evaluate/fold-1/predictions.tsv",
            "evaluate/fold-2/metrics.json", "evaluate/fold-2/predictions.tsv"]
# What the interrupted study is run to: every compared file, and no more (the
# evaluation summary, group explanation, report and package add work the comparison does not need).
TARGETS = [f"results/{stage}/fold-{k}/{name}" for k in (1, 2)
           for stage, name in (("evaluate", "metrics.json"), ("explain", "maps.tsv"))]


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:  # after "pid (comm)": state ppid pgrp session
                pids.append(int(entry.name))
    return pids


def run_until_killed(workdir: Path, ready, timeout: float = 120) -> None:
    """Start Snakemake in its own session; when ``ready()`` holds, SIGKILL every process of the
    session (Snakemake and the jobs it started), wait until none is left, and remove the lock the
    killed Snakemake left (``snakemake --unlock``, what its error message asks for after a kill)."""
    process = subprocess.Popen(command(*TARGETS), cwd=workdir, env=env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the workflow ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill the workflow"
        time.sleep(0.02)
    for _ in range(50):
        pids = session_pids(process.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    process.wait()
    assert not session_pids(process.pid)
    assert any((workdir / ".snakemake" / "locks").iterdir()), "the kill should have left Snakemake's lock"
    unlock = subprocess.run(command("--unlock"), cwd=workdir, env=env(), capture_output=True, text=True)
    assert unlock.returncode == 0, unlock.stderr[-3000:]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outputs(workdir: Path) -> dict[str, str]:
    """sha256 of the compared results and of every explanation map (NIfTI)."""
    results = workdir / "results"
    files = [results / f for f in COMPARED] + sorted((results / "explain").glob("fold-*/**/*.nii.gz"))
    return {str(f.relative_to(results)): digest(f) for f in files}


def arrays(workdir: Path) -> dict[str, str]:
    """sha256 of every preprocessed array under its final name."""
    folder = workdir / "results" / "derivatives" / "pipeline"
    return {p.name: digest(p) for p in sorted(folder.rglob("*.npy")) if not p.name.startswith(".")}


def weights(workdir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: torch.load(p, map_location="cpu", weights_only=False)["state_dict"]
            for p in sorted((workdir / "results" / "train").glob("fold-*/model.pt"))}


@pytest.fixture(scope="module")
def reference(small_study) -> Path:
    return small_study["workdir"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, small_study) -> dict:
    """The study killed during preprocessing and during training, each time rerun."""
    workdir = tmp_path_factory.mktemp("interrupted")
    write_config(workdir, small_study["cohort"])
    results = workdir / "results"

    def arrays() -> list[Path]:  # final names only, not the hidden temporaries of writes in flight
        folder = results / "derivatives" / "pipeline"
        return [p for p in folder.rglob("*.npy") if not p.name.startswith(".")] if folder.exists() else []

    run_until_killed(workdir, lambda: len(arrays()) >= 1)
    at_kill = arrays()
    unreadable = []
    for path in at_kill:  # a file under its final name is complete
        try:
            np.load(path)
        except Exception as exc:  # noqa: BLE001
            unreadable.append(f"{path}: {exc}")

    def training_midway():
        return any((d / "checkpoints" / "last.pt").exists() and not (d / "model.pt").exists()
                   for d in (results / "train").glob("fold-*"))

    run_until_killed(workdir, training_midway)
    resumed_at = {}
    run(workdir, *TARGETS)
    for log in sorted((results / "logs" / "train").glob("*.log")):
        text = log.read_text()
        resumed_at[log.stem] = next((int(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                     if line.startswith("resuming from")), None)
    return {"workdir": workdir, "arrays_at_kill": len(at_kill), "unreadable": unreadable,
            "resumed_at": resumed_at}


def test_read_only_input_is_never_written(reference, small_study):
    """The whole workflow ran on a read-only copy; its digest is unchanged. As root, chmod does not
    stop writes, so the digest comparison (content and mode of every file) is the real check."""
    copy, before = small_study["read_only"], small_study["digest"]
    assert (reference / "results" / "package" / "model.tar.gz").exists()
    assert tree_digest(copy) == before


def test_kill_during_preprocessing_then_rerun_matches(reference, interrupted):
    assert 1 <= interrupted["arrays_at_kill"] < N_SUBJECTS, "the kill did not land during preprocessing"
    assert interrupted["unreadable"] == []  # every file under a final name at the kill was complete
    reference_arrays = arrays(reference)
    assert len(reference_arrays) >= N_SUBJECTS and arrays(interrupted["workdir"]) == reference_arrays


def test_kill_during_training_resumes_from_checkpoint_and_matches(reference, interrupted):
    resumed = {fold: epoch for fold, epoch in interrupted["resumed_at"].items() if epoch is not None}
    assert resumed and all(epoch >= 1 for epoch in resumed.values()), interrupted["resumed_at"]
    ref, got = weights(reference), weights(interrupted["workdir"])
    assert ref.keys() == got.keys() and len(ref) == 2
    for fold in ref:
        for name, tensor in ref[fold].items():
            assert torch.equal(tensor, got[fold][name]), f"{fold} {name}"
    for fold in ref:
        assert digest(interrupted["workdir"] / "results" / "evaluate" / fold / "predictions.tsv") == \
            digest(reference / "results" / "evaluate" / fold / "predictions.tsv")


def test_same_config_and_seed_twice_gives_identical_metrics_and_maps(reference, interrupted):
    """The reference and the interrupted study: two runs from scratch, same config and seed, on CPU."""
    first, second = outputs(reference), outputs(interrupted["workdir"])
    assert sum(name.endswith(".nii.gz") for name in first) >= 2 * 3  # per fold: subject maps and mean, sd, t
    assert second == first
