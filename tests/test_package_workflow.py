"""End to end on a tiny demo: study → exported package → registry → fetch → apply to the test participants.

The apply run prepares the test images again from the raw dataset with the package's recipe and
predicts with its safetensors weights: its predictions must equal the study's, exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from pipeline.learning.saved import package_coder, package_model
from pipeline.common import package
from pipeline.sharing import registry
from pipeline.common.tables import read_tsv
from pipeline.learning.loader import load_batch
from pipeline.sharing.export import ONNX_TOLERANCE, Ensemble
from smallstudy import env

pytestmark = pytest.mark.slow


def run(cwd: Path, *command: str) -> subprocess.CompletedProcess:
    """``python -m command`` in the environment the study's jobs ran in (smallstudy.env)."""
    done = subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


@pytest.fixture(scope="module")
def study(small_study) -> Path:
    """The session's small study (conftest ``small_study``): the whole workflow on a read-only
    copy of a 10-participant demo cohort at 8 mm, two folds, occlusion and gradient maps."""
    return small_study["workdir"]


@pytest.fixture(scope="module")
def applied(study) -> Path:
    """apply's OUTPUT_DIR (``study/applied``); its stages' files are in ``work`` (``WORK``)."""
    url = f"file://{study / 'registry'}"
    run(study, "pipeline", "register", "results/package/model.tar.gz", "--name", "lab/brainage", "--registry", url)
    splits = read_tsv(study / "results" / "splits.tsv")
    labels = sorted(splits.loc[splits["fold-1"] == "test", "participant_id"].str.removeprefix("sub-").unique())
    bids_dir = yaml.safe_load((study / "config" / "config.yaml").read_text())["bids_dir"]  # the read-only copy
    run(study, "pipeline", "apply", bids_dir, "applied", "participant", "--model", "lab/brainage", "--registry", url,
        "--participant-label", *labels, "--cores", "2")
    return study / "applied"


@pytest.fixture(scope="module")
def work(study, applied) -> Path:
    """apply's work folder (its default ``--work-dir``, ``./work``): the stages' files."""
    return study / "work"


def test_apply_reproduces_the_studys_test_predictions_exactly(study, applied, work):
    ours = read_tsv(work / "predictions.tsv").set_index("image_id")
    theirs = read_tsv(study / "results" / "evaluate" / "predictions.tsv").set_index("image_id")
    assert sorted(ours.index) == sorted(theirs.index) and len(ours) >= 2
    for column in ("predicted", "predicted_corrected"):
        assert (ours[column] == theirs.loc[ours.index, column]).all(), (ours[column], theirs[column])
    for fold in ("fold-1", "fold-2"):
        fold_ours = read_tsv(work / "predict" / fold / "predictions.tsv").set_index("image_id")
        fold_theirs = read_tsv(study / "results" / "evaluate" / fold / "predictions.tsv").set_index("image_id")
        assert (fold_ours["predicted"] == fold_theirs.loc[fold_ours.index, "predicted"]).all()


def test_apply_prepares_the_images_exactly_as_the_study_did(study, work):
    arrays = sorted((work / "derivatives").rglob("*.npy"))
    assert arrays
    for path in arrays:
        original = study / "results" / path.relative_to(work)
        assert np.array_equal(np.load(path), np.load(original)), path.name


def test_apply_writes_maps_in_template_and_native_space_and_a_report(applied, work):
    maps = read_tsv(work / "explain" / "maps.tsv")
    manifest = read_tsv(work / "manifest.tsv").set_index("image_id")
    assert set(maps["method"]) == {"occlusion", "gradient"} and set(maps["image_id"]) == set(manifest.index)
    for row in maps.itertuples():
        assert nib.load(row.template).shape == (20, 24, 20)
        assert nib.load(row.native).shape == nib.load(manifest.at[row.image_id, "path"]).shape
        assert np.abs(nib.load(row.template).get_fdata()).max() > 0
    # Test-retest: one row per pair of one participant's images, with both methods' map correlations.
    retest = read_tsv(work / "retest_predictions.tsv")
    images = manifest.groupby("participant_id").size()
    assert len(retest) == int((images * (images - 1) // 2).sum()) == len(read_tsv(work / "retest.tsv"))
    assert {"occlusion_map_pearson", "gradient_map_spearman", "prediction_difference"} <= set(retest.columns)
    report = (applied / "report.html").read_text()
    assert "Predictions of regression of <code>age</code> by lab/brainage:1" in report
    assert report.count("<p>Test–retest") == 2  # of preprocessing and of the model, pairs or none
    assert report.count("data:image/png;base64") >= 4 and "## Intended use" in report


def test_onnx_matches_pytorch_on_the_demo(study, work):
    import onnxruntime

    folder = next((study / "work" / "models").rglob(package.SPEC)).parent  # apply's default --work-dir ./work
    pkg = package.load(folder)
    ensemble = Ensemble([package_model(pkg, f) for f in pkg.folds], [package_coder(pkg, f) for f in pkg.folds]).eval()
    x = load_batch(sorted(str(p) for p in (work / "derivatives").rglob("*.npy")))
    session = onnxruntime.InferenceSession(str(folder / package.ONNX), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        difference = float(np.abs(session.run(None, {"image": x.numpy()})[0] - ensemble(x).numpy()).max())
    print(f"demo: ONNX vs PyTorch max abs difference {difference:.3g} over {len(x)} images")
    assert difference <= ONNX_TOLERANCE
    predictions = pd.read_csv(work / "predictions.tsv", sep="\t")
    assert np.allclose(np.sort(predictions["predicted"]), np.sort(session.run(None, {"image": x.numpy()})[0][:, 0]),
                       atol=ONNX_TOLERANCE)


def test_the_registry_holds_the_exported_archive(study):
    fs, root = registry.open_registry(f"file://{study / 'registry'}")
    assert registry.versions(fs, root, registry.parse_name("lab/brainage")) == ["1"]


def test_apply_output_is_one_bids_derivative_dataset_and_passes_the_validator(study, applied, work):
    """Issue #29, item 4: OUTPUT_DIR is one derivative dataset at its root (its description, the
    preprocessed images, the maps with BIDS names, participants and scans tables of the predictions,
    the report); arrays, configs, the package and Snakemake's state are in the work folder; the BIDS
    validator finds no error in it."""
    import json

    from bids.layout import parse_file_entities

    from pipeline.intake import bidsvalidation

    description = json.loads((applied / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bids-deepstudy"
    assert "lab/brainage:1" in description["GeneratedBy"][0]["Description"]
    bids_dir = yaml.safe_load((study / "config" / "config.yaml").read_text())["bids_dir"]
    assert [s["URL"] for s in description["SourceDatasets"]] == [Path(bids_dir).resolve().as_uri()]
    files = sorted(p.relative_to(applied).as_posix() for p in applied.rglob("*") if p.is_file())
    print(f"apply's OUTPUT_DIR: {len(files)} files:", *files, sep="\n  ")
    assert not [f for f in files if f.endswith((".npy", ".mat", ".yaml", ".pt", ".safetensors", ".log"))
                or f.split("/")[0] in (".snakemake", "derivatives", "models", "predict", "explain", "logs",
                                       "benchmarks", "grid", "ingest_cache")], files
    assert (work / ".snakemake").is_dir() and (work / "config.yaml").is_file() and (work / "models").is_dir()
    assert {"dataset_description.json", "README", ".bidsignore", "participants.tsv", "participants.json",
            "report.html"} <= set(files)
    # Every predicted image: its preprocessed image, its two methods' maps on both grids, a scans row each.
    ours = read_tsv(work / "predictions.tsv").set_index("image_id")
    scans = pd.concat([read_tsv(p) for p in applied.rglob("*_scans.tsv")]).set_index("filename")
    assert len(scans) == len(ours) * (1 + 2 * 2) and set(scans["image_id"]) == set(ours.index)
    for name, row in scans.iterrows():
        path = next(applied.rglob(name.split("/")[-1]))
        entities = parse_file_entities(str(path))
        assert f"sub-{entities['subject']}" == ours.at[row["image_id"], "participant_id"]
        assert row["predicted"] == ours.at[row["image_id"], "predicted"]
    people = read_tsv(applied / "participants.tsv").set_index("participant_id")
    assert set(people.index) == set(ours["participant_id"]) and "predicted" in people
    validator = bidsvalidation.find_validator()
    if validator is None:
        pytest.skip("bids-validator-deno is not installed (it is in requirements.lock)")
    summary = bidsvalidation.summarise(bidsvalidation.run_validator(applied, validator))
    print("\n".join(bidsvalidation.lines({"dataset": str(applied), **summary})))
    assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}
