"""Small real files for the tests: tiny BIDS datasets written with nibabel into tmp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.common import config as study_config

# ITK reads its thread count once, when ants is first imported: one thread makes registration
# reproducible (tests compare repeated runs).
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")


# `make test` runs on two pytest-xdist workers (``--dist loadscope``, ``StudyScheduling`` below):
# each test module goes whole to one worker (its module-scoped study is built once), the modules
# that share the session-scoped ``small_study`` go to the same worker, and the modules known to take
# minutes go first so that the two workers finish together (docs/benchmarks.md, Test-suite time).
SHARED_STUDY_MODULES = {"test_faults.py": "small_study", "test_package_workflow.py": "small_study"}
LONG_FIRST = ["test_workflow.py", "test_lesion_study.py", "small_study", "test_real_scans.py", "test_docs.py",
              "test_workflow_faults.py", "test_segmentation.py", "test_segmentation_package.py"]


def scope_of(nodeid: str) -> str:
    """The unit of work a test belongs to: its module's path, or the study its module shares."""
    module = nodeid.split("::", 1)[0]
    return SHARED_STUDY_MODULES.get(Path(module).name, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadscope``: scopes by ``scope_of``, in collection order (no reordering)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class StudyScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scope_of(nodeid)

    config.option.loadscopereorder = False
    return StudyScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "small_study" in getattr(item, "fixturenames", ()) and item.path.name not in SHARED_STUDY_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses small_study: add {item.path.name} to "
                                    "SHARED_STUDY_MODULES in tests/conftest.py (one worker builds the study)")
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(SHARED_STUDY_MODULES.get(item.path.name, item.path.name), len(rank)))


def write_bids(root: Path, participants: list[dict], images: dict[str, list[str]], shape=(12, 14, 12), seed=0) -> Path:
    """A BIDS dataset: ``participants`` rows, and per participant id a list of sessions ('' = none)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "test", "BIDSVersion": "1.9.0"}))
    columns = list(participants[0])
    lines = ["\t".join(columns)] + ["\t".join(str(p[c]) for c in columns) for p in participants]
    (root / "participants.tsv").write_text("\n".join(lines) + "\n")
    for pid, sessions in images.items():
        for ses in sessions:
            anat = root / pid / ses / "anat" if ses else root / pid / "anat"
            anat.mkdir(parents=True, exist_ok=True)
            name = f"{pid}_{ses}_T1w.nii.gz" if ses else f"{pid}_T1w.nii.gz"
            data = rng.normal(100, 10, shape).astype(np.float32)
            nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), anat / name)
    return root


@pytest.fixture
def small_bids(tmp_path):
    """Four participants (one with two sessions, one without any image); ages out of row order."""
    participants = [
        {"participant_id": "sub-03", "age": "70.5", "group": "patient"},
        {"participant_id": "sub-01", "age": "25.0", "group": "control"},
        {"participant_id": "sub-02", "age": "n/a", "group": "patient"},
        {"participant_id": "sub-04", "age": "40", "group": "control"},
        {"participant_id": "sub-05", "age": "33", "group": "control"},
    ]
    images = {"sub-01": [""], "sub-02": [""], "sub-03": ["ses-01", "ses-02"], "sub-04": [""]}
    return write_bids(tmp_path / "bids", participants, images)


def tiny_nifti(path: Path, shape=(2, 2, 2), seed=0, affine=None) -> Path:
    """A small real NIfTI with random (non-constant, finite) data and 2 mm voxels."""
    data = np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), path)
    return path


def write_tree(root: Path, files, real=(), participants: str | None = None, description: bool = True) -> Path:
    """A dataset of zero-byte ``files`` (relative paths); those in ``real`` get a tiny real NIfTI.

    ``participants`` is the text of participants.tsv (none when None).
    """
    root.mkdir(parents=True, exist_ok=True)
    if description:
        (root / "dataset_description.json").write_text(json.dumps({"Name": root.name, "BIDSVersion": "1.9.0"}))
    if participants is not None:
        (root / "participants.tsv").write_text(participants)
    real = set(real)
    for i, rel in enumerate(sorted(set(files) | real)):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel in real:
            tiny_nifti(path, seed=i)
        else:
            path.touch()
    return root


def tree_digest(root: Path) -> dict[str, str]:
    """sha1 of every file under ``root`` (with its size and mtime), by relative path."""
    import hashlib

    return {str(p.relative_to(root)): f"{hashlib.sha1(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def mini_study(tmp_path_factory) -> Path:
    """A tiny two-fold study trained, evaluated and exported as a model package (tests/minipackage.py):
    the study folder; the package is ``package/model`` and ``package/model.tar.gz`` under it."""
    from minipackage import build

    root = tmp_path_factory.mktemp("mini_study")
    build(root)
    return root


def ingested(bids_dir: Path, target: str | None, task: str, cache_dir: Path | None = None, **keys):
    """``pipeline.intake.ingest.ingest`` of ``bids_dir`` with the config ``keys`` (e.g. ``bids_filters``,
    ``participants``; the schema's defaults for the rest)."""
    from pipeline.intake.ingest import IngestSettings, ingest

    settings = IngestSettings.of({"bids_dir": str(bids_dir), "target": target, "task": task, **keys})
    return ingest(settings, cache_dir)


def stage_config(**keys) -> str:
    """A stage's ``--config`` as the workflow passes it: ``keys`` and the schema's defaults."""
    return json.dumps(study_config.resolved([], {"bids_dir": "unused", "target": "age", "task": "regression", **keys}))


@pytest.fixture(scope="session")
def small_study(tmp_path_factory):
    """One small real study run by Snakemake (tests/smallstudy.py), shared by the fault and the
    package/apply end-to-end tests: a dict of ``cohort``, its ``read_only`` copy the study read,
    that copy's ``digest`` before the run, and the study's ``workdir``."""
    import smallstudy

    root = tmp_path_factory.mktemp("small_study")
    study = smallstudy.build(root)
    yield study
    smallstudy.writable(study["read_only"])  # let pytest clean it up
