"""End to end on a tiny demo: study → exported package → registry → fetch → apply to the test participants.

The apply run prepares the test images again from the raw dataset with the package's recipe and
predicts with its safetensors weights: its predictions must equal the study's, exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.learning.saved import package_coder, package_model
from pipeline.sharing import package
from pipeline.sharing import registry
from pipeline.common.tables import read_tsv
from pipeline.learning.loader import load_batch
from pipeline.demo.cohort import make_demo
from pipeline.sharing.export import ONNX_TOLERANCE, Ensemble

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = """
target: age
task: regression
results_dir: results
preprocess: {resolution: 8, shape: [20, 24, 20], n4: false, brain_extraction: none, registration_resolution: null}
split: {folds: 2, test: 0.2, seed: 0}
train: {epochs: 2, batch_size: 4}
explain: {window: 4, stride: 4, methods: [occlusion, gradient], gradcam_layer: features.1}
"""


def run(cwd: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("package_study")
    make_demo(root / "demo", n_subjects=10, seed=0, sim_resolution=4)
    (root / "config").mkdir()
    (root / "config" / "config.yaml").write_text(f"bids_dir: {root / 'demo'}\n{CONFIG}")
    run(root, "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "2",
        "results/package/model.tar.gz", "results/evaluate/predictions.tsv")
    return root


@pytest.fixture(scope="module")
def applied(study) -> Path:
    url = f"file://{study / 'registry'}"
    run(study, "pipeline.registry", "register", "results/package/model.tar.gz", "--name", "lab/brainage", "--registry", url)
    splits = read_tsv(study / "results" / "splits.tsv")
    labels = sorted(splits.loc[splits["fold-1"] == "test", "participant_id"].str.removeprefix("sub-").unique())
    run(study, "pipeline.apply", "demo", "applied", "participant", "--model", "lab/brainage", "--registry", url,
        "--participant-label", *labels, "--cores", "2")
    return study / "applied"


def test_apply_reproduces_the_studys_test_predictions_exactly(study, applied):
    ours = read_tsv(applied / "predictions.tsv").set_index("image_id")
    theirs = read_tsv(study / "results" / "evaluate" / "predictions.tsv").set_index("image_id")
    assert sorted(ours.index) == sorted(theirs.index) and len(ours) >= 2
    for column in ("predicted", "predicted_corrected"):
        assert (ours[column] == theirs.loc[ours.index, column]).all(), (ours[column], theirs[column])
    for fold in ("fold-1", "fold-2"):
        fold_ours = read_tsv(applied / "predict" / fold / "predictions.tsv").set_index("image_id")
        fold_theirs = read_tsv(study / "results" / "evaluate" / fold / "predictions.tsv").set_index("image_id")
        assert (fold_ours["predicted"] == fold_theirs.loc[fold_ours.index, "predicted"]).all()


def test_apply_prepares_the_images_exactly_as_the_study_did(study, applied):
    for path in sorted((applied / "derivatives").rglob("*.npy")):
        original = study / "results" / path.relative_to(applied)
        assert np.array_equal(np.load(path), np.load(original)), path.name


def test_apply_writes_maps_in_template_and_native_space_and_a_report(applied):
    maps = read_tsv(applied / "explain" / "maps.tsv")
    manifest = read_tsv(applied / "manifest.tsv").set_index("image_id")
    assert set(maps["method"]) == {"occlusion", "gradient"} and set(maps["image_id"]) == set(manifest.index)
    for row in maps.itertuples():
        assert nib.load(row.template).shape == (20, 24, 20)
        assert nib.load(row.native).shape == nib.load(manifest.at[row.image_id, "path"]).shape
        assert np.abs(nib.load(row.template).get_fdata()).max() > 0
    report = (applied / "report.html").read_text()
    assert "Predictions of regression of <code>age</code> by lab/brainage:1" in report
    assert report.count("data:image/png;base64") >= 4 and "## Intended use" in report


def test_onnx_matches_pytorch_on_the_demo(applied):
    import onnxruntime

    folder = next((applied / "models").rglob(package.SPEC)).parent
    pkg = package.load(folder)
    ensemble = Ensemble([package_model(pkg, f) for f in pkg.folds], [package_coder(pkg, f) for f in pkg.folds]).eval()
    x = load_batch(sorted(str(p) for p in (applied / "derivatives").rglob("*.npy")))
    session = onnxruntime.InferenceSession(str(folder / package.ONNX), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        difference = float(np.abs(session.run(None, {"image": x.numpy()})[0] - ensemble(x).numpy()).max())
    print(f"demo: ONNX vs PyTorch max abs difference {difference:.3g} over {len(x)} images")
    assert difference <= ONNX_TOLERANCE
    predictions = pd.read_csv(applied / "predictions.tsv", sep="\t")
    assert np.allclose(np.sort(predictions["predicted"]), np.sort(session.run(None, {"image": x.numpy()})[0][:, 0]),
                       atol=ONNX_TOLERANCE)


def test_the_registry_holds_the_exported_archive(study):
    fs, root = registry.open_registry(f"file://{study / 'registry'}")
    assert registry.versions(fs, root, registry.parse_name("lab/brainage")) == ["1"]
