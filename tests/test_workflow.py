"""End to end: the real Snakemake workflow on a small simulated cohort.

One regression study (age) runs once for the module; the tests read its files, then check rerun
behaviour with dry runs, and finally switch the same study to classification of ``group``.
(The classification study runs for real in test_lesion_study.py.)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.common import columns
from pipeline.demo.cohort import make_demo
from pipeline.results.validation import top_fraction_enrichment
from pipeline.intake.template import SPACE, resample_to_grid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
N_SUBJECTS = 36  # with 30 epochs: MAE 0.12-0.23x the mean predictor's, occlusion 9.6x chance (docs/benchmarks.md, Test-suite time)
CONFIG = {
    "results_dir": "results",
    "target": "age",
    "task": "regression",
    "preprocess": {"resolution": 5, "shape": [32, 38, 34], "n4_shrink_factor": 6, "brain_extraction": "none",
                   "registration_resolution": None},  # on the grid: the working resolution is tests/test_preprocess.py's  # N4 at shrink 6: 3x faster
    "split": {"test": 0.2, "folds": 2, "seed": 0},
    "train": {"epochs": 30},  # the default recipe, shortened (100 epochs: docs/benchmarks.md, Learning)
    "explain": {"window": 6, "stride": 4},  # groundtruth: set with bids_dir below
}


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)


def write_config(workdir: Path, **changes) -> None:
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (workdir / "config").mkdir(exist_ok=True)
    (workdir / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def scheduled(dry_run: subprocess.CompletedProcess) -> dict[str, int]:
    """Job counts from a dry run's 'Job stats' table."""
    assert dry_run.returncode == 0, dry_run.stdout + dry_run.stderr
    text = dry_run.stdout + dry_run.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, with its mode, by relative path."""
    return {str(p.relative_to(root)): f"{p.stat().st_mode:o} {hashlib.sha256(p.read_bytes()).hexdigest()}"
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("data") / "demo", n_subjects=N_SUBJECTS, seed=0, sim_resolution=3.0)


@pytest.fixture(scope="module")
def cohort_digest(cohort) -> dict[str, str]:
    return tree_digest(cohort)


@pytest.fixture(scope="module")
def study(tmp_path_factory, cohort, cohort_digest) -> Path:
    workdir = tmp_path_factory.mktemp("study")
    CONFIG["bids_dir"] = str(cohort)
    CONFIG["explain"]["groundtruth"] = str(cohort / "derivatives" / "groundtruth")
    write_config(workdir)
    run = snakemake(workdir)
    assert run.returncode == 0, run.stderr[-5000:]
    return workdir


def test_every_stage_wrote_its_outputs(study):
    results = study / "results"
    manifest = pd.read_csv(results / "manifest.tsv", sep="\t")
    assert len(manifest) > N_SUBJECTS  # some participants have two sessions
    for row in manifest.itertuples():
        anat = results / "derivatives" / "pipeline" / row.subdir / "anat"
        assert (anat / f"{row.image_id}_space-{SPACE}_desc-preproc_T1w.nii.gz").exists()
        assert (anat / f"{row.image_id}_from-{SPACE}_to-T1w_mode-image_xfm.mat").exists()
    splits = pd.read_csv(results / "splits.tsv", sep="\t")
    assert list(splits.columns) == ["image_id", "participant_id", "fold-1", "fold-2"]
    test_images = set(splits.loc[splits["fold-1"] == "test", "image_id"])
    for fold in ("fold-1", "fold-2"):
        history = pd.read_csv(results / "train" / fold / "history.tsv", sep="\t")
        assert {"train_loss", "val_loss", "val_mae"} <= set(history.columns) and history["train_mae"].notna().all()
        predictions = pd.read_csv(results / "evaluate" / fold / "predictions.tsv", sep="\t")
        assert set(predictions.loc[predictions["split"] == "test", "image_id"]) == test_images
        assert set(predictions.loc[predictions["split"] == "val", "image_id"]) == set(
            splits.loc[splits[fold] == "val", "image_id"])
        assert set(pd.read_csv(results / "explain" / fold / "maps.tsv", sep="\t")["image_id"]) == test_images
        baseline = pd.read_csv(results / "linear" / fold / "predictions.tsv", sep="\t")
        assert set(baseline.loc[baseline["split"] == "test", "image_id"]) == test_images
        assert "findings" in json.loads((results / "train" / fold / "diagnostics.json").read_text())
    comparison = pd.read_csv(results / "evaluate" / "comparison.tsv", sep="\t")
    assert set(comparison["model"]) == {"fold-1", "fold-2", "ensemble"}
    assert {"deep", "linear", "difference", "difference_ci_low", "difference_ci_high", "verdict"} <= set(comparison)
    ensemble = pd.read_csv(results / "evaluate" / "predictions.tsv", sep="\t")
    assert set(ensemble["image_id"]) == test_images
    table = pd.read_csv(results / "evaluate" / "metrics.tsv", sep="\t", index_col="model")
    assert list(table.index) == ["fold-1", "fold-2", "mean", "sd", "ensemble"]
    report = (results / "report.html").read_text()
    assert "Test-set performance" in report and "split balance" in report
    assert report.count("data:image/png;base64") >= 6


def test_the_report_fits_a_laptop_screen(study):
    """The report's tables are split to at most report.MAX_COLUMNS columns, counts print as integers, the
    settings are a table, and in headless Chromium (when installed) the page is no wider than 1366 px."""
    from browser import find_browser, page_width
    from pipeline.results.htmltables import MAX_COLUMNS

    page = study / "results" / "report.html"
    text = page.read_text()
    widths = [len(re.findall(r"<th[ >]", t.split("</tr>")[0])) for t in re.findall(r"<table.*?</table>", text, re.S)]
    assert widths and max(widths) <= MAX_COLUMNS and "<details>" in text and "class='settings'" in text
    assert not re.search(r"<td>[1-9]\d*\.000</td>", text) and "test participant" in text  # counts as integers
    if find_browser() is None:
        pytest.skip("no headless Chromium (apt-get install chromium-headless-shell): width not measured")
    assert page_width(page) <= 1366


def test_every_table_has_a_data_dictionary_of_its_columns(study):
    """Every TSV of the study has its BIDS data dictionary beside it (pipeline.common.columns), with an
    entry that describes each of its columns (issue #29). Not ours to describe: Snakemake's benchmark
    files, and preprocessing's per-sample exclusion records in the derivatives (excluded.tsv gathers them)."""
    results = study / "results"
    tables = [p for p in results.rglob("*.tsv")
              if p.relative_to(results).parts[0] not in ("benchmarks", "derivatives") and not p.name.startswith(".")]
    assert len(tables) >= 20, tables
    for tsv in tables:
        header = pd.read_csv(tsv, sep="\t", nrows=0).columns.tolist()
        dictionary = json.loads(columns.sidecar_of(tsv).read_text())
        assert set(header) <= set(dictionary), (tsv, set(header) - set(dictionary))
        blank = [c for c in header if dictionary[c]["Description"] == columns.UNDOCUMENTED]
        assert not blank, (tsv, blank)
    gated = json.loads((results / "qc.json").read_text())["correlation_with_template"]
    assert re.search(r"This study's threshold: [0-9.]+ \(config preprocess.qc_min\)", gated["Description"])
    assert "ensemble" in json.loads((results / "evaluate" / "metrics.json").read_text())  # the summary, not a dictionary


def test_derivatives_and_the_input_pass_the_bids_validator(study, cohort):
    """results/derivatives/pipeline is a BIDS-Derivatives dataset bids-validator-deno finds no error
    in (issue #19); the demo input validates too, in the study's own bidsvalidation job."""
    from pipeline.intake import bidsvalidation

    validator = bidsvalidation.find_validator()
    if validator is None:
        pytest.skip("bids-validator-deno is not installed (it is in requirements.lock)")
    derivatives = study / "results" / "derivatives" / "pipeline"
    summary = bidsvalidation.summarise(bidsvalidation.run_validator(derivatives, validator))
    print("\n".join(bidsvalidation.lines({"dataset": str(derivatives), **summary})))
    assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}
    description = json.loads((derivatives / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["DatasetLinks"]["raw"] == cohort.resolve().as_uri()
    sidecar = json.loads(next(derivatives.rglob(f"*_space-{SPACE}_desc-preproc_T1w.json")).read_text())
    assert all(source.startswith("bids:raw:sub-") for source in sidecar["Sources"]), sidecar["Sources"]
    maps = pd.read_csv(study / "results" / "explain" / "fold-1" / "maps.tsv", sep="\t")
    assert maps["template"].str.contains("_desc-integratedgradients_saliency").any()
    own = json.loads((study / "results" / "bids_validation.json").read_text())
    assert own["errors"] == 0 and own["dataset"] == str(cohort)
    # The test predictions and explanation maps: a derivative dataset of their own (issue #29).
    outputs = study / "results" / "derivatives" / "predictions"
    summary = bidsvalidation.summarise(bidsvalidation.run_validator(outputs, validator))
    print("\n".join(bidsvalidation.lines({"dataset": str(outputs), **summary})))
    assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}
    assert set(pd.read_csv(outputs / "participants.tsv", sep="\t")["participant_id"]) == set(maps["participant_id"])
    assert len(list(outputs.rglob("*_desc-occlusion_saliency.nii.gz"))) == 2 * maps["image_id"].nunique()


def test_brain_age_beats_the_mean_predictor_by_half(study):
    summary = json.loads((study / "results" / "evaluate" / "metrics.json").read_text())
    table = pd.read_csv(study / "results" / "evaluate" / "metrics.tsv", sep="\t", index_col="model")
    print(f"regression:\n{table[['mae', 'baseline_mae', 'pearson_r']]}")
    for model in ("fold-1", "fold-2", "ensemble"):
        assert table.at[model, "mae"] <= 0.5 * table.at[model, "baseline_mae"], model
    assert summary["ensemble"]["mae"] == pytest.approx(table.at["ensemble", "mae"])


def grid_and_truth(study: Path, cohort: Path):
    results = study / "results"
    mask_img = nib.load(next((results / "grid").glob("*desc-brain_mask.nii.gz")))
    truth = nib.load(cohort / "derivatives" / "groundtruth" / f"space-{SPACE}_desc-age_mask.nii.gz")
    on_grid = resample_to_grid(truth, mask_img.affine, mask_img.shape, order=1) > 0.5
    return mask_img, on_grid


def test_group_occlusion_map_falls_on_the_age_effect(study, cohort):
    mask_img, truth = grid_and_truth(study, cohort)
    occlusion = nib.load(study / "results" / "explain" / f"group_space-{SPACE}_desc-occlusion_mean.nii.gz")
    np.testing.assert_allclose(occlusion.affine, mask_img.affine)
    enrichment = top_fraction_enrichment(occlusion.get_fdata(), truth, mask_img.get_fdata() > 0)
    print(f"group occlusion top-5% enrichment in the age-effect mask: {enrichment:.1f}x chance")
    assert enrichment >= 5
    validation = pd.read_csv(study / "results" / "explain" / "validation.tsv", sep="\t")
    print(validation.to_string(index=False))
    row = validation.set_index("method").loc["occlusion"]  # one row per method
    assert row["enrichment_template_group"] == pytest.approx(enrichment, rel=1e-3)
    assert row["enrichment_native_subject"] >= 3  # each subject's own map, in its scanner space
    assert validation["reading"].str.len().gt(20).all() and not validation["method"].duplicated().any()


def test_native_maps_land_where_the_known_pose_puts_them(study, cohort):
    """Push each template-space map onto its subject's native grid with the *simulated* pose (no
    registration output involved): the pipeline's native-space map must be that image."""
    mask_img, truth = grid_and_truth(study, cohort)
    maps = pd.read_csv(study / "results" / "explain" / "fold-1" / "maps.tsv", sep="\t", dtype=str, keep_default_na=False)
    manifest = pd.read_csv(study / "results" / "manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    subdirs = manifest.set_index("image_id")["subdir"]
    truth_img = nib.Nifti1Image(truth.astype(np.float32), mask_img.affine)
    for row in maps.itertuples():
        pose_file = (cohort / "derivatives" / "groundtruth" / subdirs[row.image_id] / "anat"
                     / f"{row.image_id}_from-{SPACE}_to-T1w_pose.json")
        pose = np.array(json.loads(pose_file.read_text())["matrix"])
        native = nib.load(study / row.native)
        source = nib.load(study / row.template)
        assert native.shape == nib.load(manifest.set_index("image_id").at[row.image_id, "path"]).shape
        to_template = np.linalg.inv(pose) @ native.affine  # native voxel -> template world
        expected = resample_to_grid(source, to_template, native.shape)
        inside = expected != 0
        r = np.corrcoef(native.get_fdata()[inside], expected[inside])[0, 1]
        assert r > 0.95, (row.image_id, row.method, r)
        if row.method == "occlusion":
            native_truth = resample_to_grid(truth_img, to_template, native.shape) > 0.5
            assert top_fraction_enrichment(native.get_fdata(), native_truth, inside) == pytest.approx(
                top_fraction_enrichment(expected, native_truth, inside), rel=0.2)


def test_complete_study_dry_run_schedules_nothing(study):
    assert scheduled(snakemake(study, "-n")) == {}


def test_touching_or_documenting_code_reruns_nothing(study):
    """Code inputs are fingerprints of the syntax without docstrings (pipeline.common.codegraph): a
    module whose file is newer than every output (a checkout, a docstring edit) reruns no job."""
    from pipeline.common.locations import PACKAGE

    touched = [PACKAGE / "common" / "atomic.py", PACKAGE / "learning" / "train.py"]
    times = [(p.stat().st_atime, p.stat().st_mtime) for p in touched]
    try:
        for path in touched:
            os.utime(path)
        assert scheduled(snakemake(study, "-n")) == {}
    finally:
        for path, (atime, mtime) in zip(touched, times):
            os.utime(path, (atime, mtime))
    fingerprints = sorted(p.name for p in (study / ".snakemake" / "pipeline-code").glob("*.sha256"))
    assert "pipeline.learning.train.sha256" in fingerprints and "pipeline.intake.preprocess.sha256" in fingerprints


def test_training_change_reruns_training_not_preprocessing(study):
    write_config(study, train={"epochs": 31})
    try:
        jobs = scheduled(snakemake(study, "-n"))
    finally:
        write_config(study)
    assert "preprocess" not in jobs and "grid" not in jobs and "ingest" not in jobs and "split" not in jobs
    assert jobs == {"all": 1, "train": 2, "evaluate": 2, "evaluate_summary": 1, "explain": 2, "explain_group": 1,
                    "bidsout": 1, "report": 1, "export": 1}


def test_variants_train_as_separate_jobs_and_one_is_chosen_per_fold(study):
    write_config(study, train={"variants": {"lr3": {"learning_rate": 0.003}, "small": {"batch_size": 2}}})
    try:
        run = snakemake(study, "-n", "-p")
        jobs = scheduled(run)
    finally:
        write_config(study)
    assert "preprocess" not in jobs
    assert jobs["train"] == 4 and jobs["variants"] == 2 and jobs["evaluate"] == 2
    assert "--out-dir results/train/fold-2/variant-small" in run.stdout
    assert '"batch_size": 2' in run.stdout and "pipeline.learning.variants results/train/fold-1 --config" in run.stdout
    assert '"variants": {"lr3": {"learning_rate": 0.003}, "small": {"batch_size": 2}}' in run.stdout


def test_a_variant_with_an_unknown_setting_is_refused_before_any_job(study):
    write_config(study, train={"variants": {"fast": {"learning_rte": 0.1}}})
    try:
        run = snakemake(study, "-n")
    finally:
        write_config(study)
    assert run.returncode != 0
    assert "train.variants.fast sets unknown training setting(s) ['learning_rte']" in run.stderr + run.stdout


def test_preprocessing_change_reruns_preprocessing_and_downstream(study):
    n_images = len(pd.read_csv(study / "results" / "manifest.tsv", sep="\t"))
    write_config(study, preprocess={"n4_shrink_factor": 3})
    try:
        jobs = scheduled(snakemake(study, "-n"))
    finally:
        write_config(study)
    assert jobs["preprocess"] == n_images
    assert all(jobs[stage] == 2 for stage in ("train", "evaluate", "explain", "linear"))
    assert all(jobs[stage] == 1 for stage in ("evaluate_summary", "explain_group", "report", "export"))


def test_missing_target_column_fails_with_a_clear_message(tmp_path, cohort):
    CONFIG["bids_dir"] = str(cohort)
    write_config(tmp_path, target="height", explain={"groundtruth": None})  # no ground truth for it either
    run = snakemake(tmp_path)
    assert run.returncode != 0
    log = (tmp_path / "results" / "logs" / "ingest.log").read_text()
    assert "participants.tsv has no column 'height'" in log and "Traceback" not in log


def test_classification_of_group_reuses_preprocessing(study):
    """Switching the same study to classifying ``group`` reruns every stage from the targets on, and
    no preprocessing."""
    write_config(study, target="group", task="classification")
    try:
        jobs = scheduled(snakemake(study, "-n"))
    finally:
        write_config(study)
    assert "preprocess" not in jobs and "grid" not in jobs
    assert all(jobs[stage] == 2 for stage in ("train", "evaluate", "explain", "linear"))
    assert all(jobs[stage] == 1 for stage in ("ingest", "split", "report", "export"))


def test_input_dataset_was_never_written(study, cohort, cohort_digest):
    """After every run of this module (two studies, dry runs, a failed run) the dataset is unchanged."""
    assert tree_digest(cohort) == cohort_digest
