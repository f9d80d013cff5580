"""End to end on the hard case: patients with a small (≈1 cm), faint (25-40 % darker), jittered
lesion in deep grey matter, 40 participants, at the demo's 4 mm grid.

The study runs the real workflow once for the module (classification of ``group``); the tests
read its files: the deep ensemble must find the lesion (ROC AUC ≥ 0.9, and never more than 0.05
below the linear baseline fitted to the same arrays), learn its training data, and its maps must
land on the lesion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pandas as pd
import pytest
import yaml

from pipeline.demo.cohort import make_demo
from pipeline.demo.lesion import Lesion
from pipeline.results.validation import top_fraction_enrichment
from pipeline.intake.template import SPACE, resample_to_grid

pytestmark = [pytest.mark.slow, pytest.mark.quality]  # make test-quality (CI runs it)

REPO = Path(__file__).resolve().parents[1]
N_SUBJECTS = 40
LESION = Lesion.from_options("deep-gm", radius_mm=5.0, contrast=(0.25, 0.40), jitter_mm=3.0)
CONFIG = {
    "results_dir": "results",
    "target": "group",
    "task": "classification",
    # the default stable design, stratified by class: a test set of 4 + 4, 12 + 12 training
    # participants per fold (with 2 folds, 8 + 8: too few, the split warns)
    "split": {"test": 0.2, "folds": 4, "seed": 0},
    "preprocess": {"brain_extraction": "none", "registration_resolution": None},  # brain-only images, as the demo
    "train": {"epochs": 40},  # the default recipe, shortened for CI (100 epochs: docs/benchmarks.md, Learning)
    # no randomisation cascade (explain.sanity_images): 30 % of each explain job here, and none of
    # this test's checks; tests/test_sanity.py asserts it and test_workflow.py's study runs it
    "explain": {"methods": ["integrated_gradients"], "sanity_images": 0},
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    cohort = make_demo(tmp_path_factory.mktemp("data") / "lesion", n_subjects=N_SUBJECTS, seed=1, lesion=LESION)
    workdir = tmp_path_factory.mktemp("study")
    config = {**CONFIG, "bids_dir": str(cohort),
              "explain": {**CONFIG["explain"], "groundtruth": str(cohort / "derivatives" / "groundtruth")}}
    (workdir / "config").mkdir()
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                          "--cores", "2"], cwd=workdir, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def test_deep_ensemble_finds_the_lesion_where_the_linear_baseline_does(study):
    evaluate = study / "results" / "evaluate"
    summary = json.loads((evaluate / "metrics.json").read_text())
    comparison = pd.read_csv(evaluate / "comparison.tsv", sep="\t")
    print(comparison.to_string(index=False))
    # issue #26's goal: never more than 0.05 below the logistic baseline on the same arrays and split
    # (on this default split's test set of 4 + 4 the baseline reaches only 0.6: the deep model must
    # not need it to be easy)
    assert summary["ensemble"]["roc_auc"] >= max(0.9, summary["linear"]["roc_auc"] - 0.05)
    row = comparison.set_index(["model", "metric"]).loc[("ensemble", "roc_auc")]
    assert row["verdict"] != "linear better"
    assert set(comparison["model"]) == {"fold-1", "fold-2", "fold-3", "fold-4", "ensemble"}


def test_every_fold_fitted_its_training_data(study):
    for fold in ("fold-1", "fold-2", "fold-3", "fold-4"):
        history = pd.read_csv(study / "results" / "train" / fold / "history.tsv", sep="\t")
        assert history["train_accuracy"].tail(5).max() >= 0.9, fold
        findings = json.loads((study / "results" / "train" / fold / "diagnostics.json").read_text())["findings"]
        assert "did_not_fit" not in {f["finding"] for f in findings}, fold
    report = (study / "results" / "report.html").read_text()
    assert "Deep model against a linear baseline" in report and "<h2>Diagnostics</h2>" in report


def test_group_map_lands_on_the_lesion(study):
    results = study / "results"
    mask_img = nib.load(next((results / "grid").glob("*desc-brain_mask.nii.gz")))
    cohort = Path(yaml.safe_load((study / "config" / "config.yaml").read_text())["bids_dir"])
    truth = nib.load(cohort / "derivatives" / "groundtruth" / f"space-{SPACE}_desc-group_mask.nii.gz")
    lesion = resample_to_grid(truth, mask_img.affine, mask_img.shape, order=1) > 0.5
    group = nib.load(results / "explain" / f"group_space-{SPACE}_desc-integratedgradients_mean.nii.gz")
    enrichment = top_fraction_enrichment(group.get_fdata(), lesion, mask_img.get_fdata() > 0)
    print(f"integrated gradients, group map: top-5 % enrichment in the lesion {enrichment:.1f}x chance")
    assert enrichment >= 5
