"""Segmentation end to end: the demo's tissue labels, their preprocessing, Dice/HD95, the trainer's
refusals, the workflow's plan (an export job, no explanation jobs; the package itself:
test_segmentation_package.py) and, marked slow, a small unet
trained on the demo cohort reaching Dice ≥ 0.8 for GM and WM on the test split."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.intake.study import study_table
from pipeline.learning.coder import TargetCoder
from pipeline.demo.anatomy import TISSUES
from pipeline.demo.cohort import make_demo
from pipeline.common.errors import InputError
from pipeline.intake.grid import write_grid
from pipeline.common.paths import derivative_paths
from pipeline.intake.preprocess import PreprocessSettings, preprocess, write_label
from pipeline.results.segmentation import label_scores, majority
from pipeline.intake.template import template_on_grid
from pipeline.learning.process import Process
from pipeline.learning.settings import TrainSettings
from pipeline.learning.trainer import build_trainer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def tissue_path(bids: Path, t1w: Path) -> Path:
    """The tissue segmentation of a demo T1w (same entities, under derivatives/tissue)."""
    stem = t1w.name.split("_T1w")[0]
    return bids / "derivatives" / "tissue" / t1w.parent.relative_to(bids) / f"{stem}_desc-tissue_dseg.nii.gz"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("segdemo") / "bids", n_subjects=3, seed=1, sim_resolution=3.0)


def test_demo_writes_a_tissue_segmentation_aligned_with_each_image(demo):
    t1ws = sorted(demo.glob("sub-*/**/*_T1w.nii*"))
    assert len(t1ws) >= 3
    table = (demo / "derivatives" / "tissue" / "desc-tissue_dseg.tsv").read_text().splitlines()
    assert table == ["index\tname", *(f"{k}\t{v}" for k, v in TISSUES.items())]
    for t1w in t1ws:
        image, labels = nib.load(t1w), nib.load(tissue_path(demo, t1w))
        assert labels.shape == image.shape and np.allclose(labels.affine, image.affine)
        assert labels.get_data_dtype() == np.uint8
        data, lab = image.get_fdata(), np.asarray(labels.dataobj)
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        means = [data[lab == k].mean() for k in range(4)]
        # T1w contrast: background < CSF < GM < WM, and WM voxels are the bright ones.
        assert means[0] < means[1] < means[2] < means[3]
        assert np.median(data[lab == 3]) > np.percentile(data[lab > 0], 60)


def test_preprocessing_carries_labels_to_the_grid_as_integers_aligned_with_the_image(demo, tmp_path):
    template, mask = tmp_path / "grid" / "template.nii.gz", tmp_path / "grid" / "mask.nii.gz"
    shape = (32, 32, 32)
    write_grid(6, shape, template, mask)
    t1w = sorted(demo.glob("sub-*/**/*_T1w.nii*"))[0]
    out = derivative_paths(tmp_path / "derivatives", "sub-001", "sub-001", ["T1w"], label=True)
    settings = PreprocessSettings.of({"n4": False, "brain_extraction": "none", "registration_resolution": None})
    preprocess([t1w], template, mask, out, ["T1w"], settings, label=tissue_path(demo, t1w))
    labels = np.load(out["label_array"])
    image = np.load(out["array"])
    assert labels.dtype == np.uint8 and labels.shape == (1, *shape) and set(np.unique(labels)) <= {0, 1, 2, 3}
    nifti = nib.load(out["label_image"])
    assert np.array_equal(np.asarray(nifti.dataobj), labels[0])
    assert np.allclose(nifti.affine, nib.load(template).affine)
    means = [image[0][labels[0] == k].mean() for k in (1, 2, 3)]
    assert means[0] < means[1] < means[2]  # CSF < GM < WM in the preprocessed image
    # On the template grid the subject's WM label lies on the template's WM.
    wm = template_on_grid(6, shape, "WM").get_fdata() > 0.5
    overlap = 2 * (wm & (labels[0] == 3)).sum() / (wm.sum() + (labels[0] == 3).sum())
    assert overlap > 0.7


def test_a_label_image_with_non_integer_values_is_refused(tmp_path):
    path = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 1.5, np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match="integer labels 0-255"):
        write_label(path, None, np.eye(4), tmp_path / "unused.mat", tmp_path / "o.nii.gz", tmp_path / "o.npy")


def test_dice_and_hd95_against_hand_computed_values():
    true = np.zeros((12, 12, 12), np.uint8)
    true[2:6, 2:6, 2:6] = 1  # a 4-voxel cube
    shifted = np.zeros_like(true)
    shifted[3:7, 2:6, 2:6] = 1  # the same cube one voxel along x: 48 of 64 voxels shared
    scores = label_scores(shifted, true, ["background", "a", "b"], (2.0, 2.0, 2.0))
    assert scores["dice_a"] == pytest.approx(2 * 48 / 128)
    # Boundary voxels are at most one voxel (2 mm along x) from the other boundary.
    assert scores["hd95_a"] == pytest.approx(2.0)
    assert np.isnan(scores["dice_b"]) and np.isnan(scores["hd95_b"])  # in neither map: undefined
    assert scores["dice_mean"] == pytest.approx(0.75)
    assert label_scores(shifted, true, ["background", "a"], (3.0, 1.0, 1.0))["hd95_a"] == pytest.approx(3.0)
    identical = label_scores(true, true, ["background", "a"], (1.0, 1.0, 1.0))
    assert identical["dice_a"] == 1.0 and identical["hd95_a"] == 0.0
    missed = label_scores(np.zeros_like(true), true, ["background", "a"], (1.0, 1.0, 1.0))
    assert missed["dice_a"] == 0.0 and np.isnan(missed["hd95_a"])


def test_majority_vote_of_label_maps():
    maps = [np.array([0, 1, 2, 2]), np.array([1, 1, 2, 0]), np.array([2, 1, 0, 1])]
    assert majority(maps, 3).tolist() == [0, 1, 2, 0]  # ties go to the lowest label


@pytest.mark.parametrize("task, model, key", [("segmentation", "simple_cnn", "train.model"),
                                              ("regression", "unet", "train.model")])
def test_trainer_refuses_a_network_of_the_other_kind(task, model, key):
    coder = TargetCoder(task, classes=["background", "tissue"] if task == "segmentation" else None)
    with pytest.raises(InputError, match=key.replace(".", r"\.")):
        build_trainer(TrainSettings.of({"model": model}), 1, coder, Process())


def test_segmentation_without_label_images_is_refused_naming_label_image(tmp_path):
    from test_train import write_study

    manifest, splits, preproc = write_study(tmp_path)
    with pytest.raises(InputError, match="label_image"):
        study_table(manifest, splits, preproc, "fold-1", label=True)


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"),
                           "--configfile", str(REPO / "config" / "segmentation.yaml"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_segmentation_config_plans_a_complete_study_and_its_package_without_explanation_jobs(demo, tmp_path):
    overrides = ["--config", f"bids_dir={demo}", f"results_dir={tmp_path / 'results'}"]
    ingest = snakemake(*overrides, "--cores", "1", str(tmp_path / "results" / "manifest.tsv"), cwd=REPO)
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    plan = snakemake(*overrides, "-n", "--quiet", "rules", cwd=REPO)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = dict(line.split()[:2] for line in plan.stdout.splitlines()
                if len(line.split()) == 2 and line.split()[1].isdigit())
    n_images = len(list(demo.glob("sub-*/**/*_T1w.nii*")))
    assert jobs["preprocess"] == str(n_images)
    assert {"grid", "split", "train", "evaluate", "evaluate_summary", "report", "export", "all"} <= set(jobs)
    assert jobs["export"] == "1"
    assert not {"explain", "explain_group"} & set(jobs)


@pytest.mark.slow
def test_small_unet_segments_gm_and_wm_of_the_demo_test_split(tmp_path):
    """A real small study: demo cohort → ingest → 6 mm grid → ANTs preprocessing with labels →
    split → 2D unet on slices → evaluation. GM and WM Dice ≥ 0.8 on the test split."""
    import segstudy

    from pipeline.results.evaluate import evaluate_fold
    from pipeline.learning.train import train

    start = time.perf_counter()
    study = segstudy.build(tmp_path)
    table = study_table(study["manifest"], study["splits"], study["preproc"], "fold-1", ["T1w"], label=True)
    train(table, "label", "segmentation", TrainSettings.of(segstudy.HYPER), tmp_path / "train", threads=2,
          classes=segstudy.LABEL_IMAGE["labels"], channels=["T1w"])
    metrics = evaluate_fold(table, tmp_path / "train" / "model.pt", tmp_path / "evaluate", study["preproc"], ["T1w"])
    seconds = time.perf_counter() - start
    print(f"segmentation study in {seconds:.0f} s: " + ", ".join(
        f"{k} {metrics[k]:.3f}" for k in ("dice_CSF", "dice_GM", "dice_WM", "hd95_CSF", "hd95_GM", "hd95_WM")))
    assert metrics["n"] == int((table["split"] == "test").sum()) >= 2
    assert metrics["dice_GM"] >= 0.8 and metrics["dice_WM"] >= 0.8
    assert metrics["dice_GM_ci"][0] <= metrics["dice_GM"] <= metrics["dice_GM_ci"][1]
    assert np.isfinite(metrics["hd95_GM"]) and np.isfinite(metrics["hd95_WM"])
    import pandas as pd

    predictions = pd.read_csv(tmp_path / "evaluate" / "predictions.tsv", sep="\t", keep_default_na=False)
    row = predictions[predictions["split"] == "test"].iloc[0]
    template_map = nib.load(row["predicted_labels"])
    assert np.allclose(template_map.affine, nib.load(study["template"]).affine)
    native_map = nib.load(row["predicted_labels_native"])
    native_image = nib.load(table.set_index("image_id").loc[row["image_id"], "path"])
    assert native_map.shape == native_image.shape and np.allclose(native_map.affine, native_image.affine)
    assert set(np.unique(np.asarray(native_map.dataobj))) <= {0, 1, 2, 3}
    # The native-space prediction matches the demo's native tissue labels too.
    truth = np.asarray(nib.load(tissue_path(study["bids"], Path(native_image.get_filename()))).dataobj)
    by_hand = label_scores(np.asarray(native_map.dataobj), truth, segstudy.LABEL_IMAGE["labels"],
                           native_image.header.get_zooms())
    assert by_hand["dice_WM"] > 0.7
    # ... and evaluation scores it there itself, against the dataset's label image.
    assert row["native_dice_WM"] == pytest.approx(by_hand["dice_WM"]) and metrics["native_dice_WM"] > 0.7
    assert np.isfinite(metrics["native_hd95_GM"]) and "native_dice_GM_ci" in metrics
    # The ensemble (here of one fold) votes on the native grid too: the fold's native map comes back.
    from pipeline.results.segmentation import summarise

    summarise([tmp_path / "evaluate"], tmp_path / "summary")
    ensemble = pd.read_csv(tmp_path / "summary" / "predictions.tsv", sep="\t", keep_default_na=False)
    voted = nib.load(ensemble.set_index("image_id").loc[row["image_id"], "predicted_labels_native"])
    assert np.allclose(voted.affine, native_map.affine)
    np.testing.assert_array_equal(np.asarray(voted.dataobj), np.asarray(native_map.dataobj))
    assert ensemble.set_index("image_id").loc[row["image_id"], "native_dice_WM"] == pytest.approx(by_hand["dice_WM"])
    assert torch.load(tmp_path / "train" / "model.pt", weights_only=True)["coder"]["classes"] == ["background", "CSF",
                                                                                                    "GM", "WM"]


def test_summary_tables_per_fold_mean_sd_and_majority_vote_ensemble(tmp_path):
    """Three folds' label maps of two test images: per-fold rows, mean and sd, and the ensemble
    (majority vote) scored against the true labels, with bootstrap intervals."""
    import json

    import pandas as pd

    from pipeline.results.segmentation import summarise

    names = ["background", "a"]
    true = np.zeros((1, 8, 8, 8), np.uint8)
    true[0, 2:6, 2:6, 2:6] = 1
    np.save(tmp_path / "true.npy", true)
    shifts = {"fold-1": 1, "fold-2": 0, "fold-3": 2}  # fold-2 is exact; the vote of 1, 0, 2 shifts is 1 shift
    fold_dirs = []
    for fold, shift in shifts.items():
        rows = []
        for pid in ("sub-01", "sub-02"):
            predicted = np.roll(true[0], shift, axis=0)
            path = tmp_path / fold / "labels" / pid / "anat" / f"{pid}_dseg.nii.gz"
            path.parent.mkdir(parents=True)
            nib.save(nib.Nifti1Image(predicted, np.diag([2.0, 2.0, 2.0, 1.0])), path)
            native = path.with_name(f"{pid}_space-T1w_dseg.nii.gz")  # a native grid: other shape and affine
            nib.save(nib.Nifti1Image(np.roll(np.pad(true[0], 1), shift, axis=1), np.diag([1.0, 1.5, 1.0, 1.0])), native)
            rows.append({"participant_id": pid, "session": "", "image_id": pid, "subdir": pid, "split": "test",
                         **label_scores(predicted, true[0], names, (2, 2, 2)),
                         "true_labels": str(tmp_path / "true.npy"), "predicted_labels": str(path),
                         "predicted_labels_native": str(native)})
        predictions = pd.DataFrame(rows)
        predictions.to_csv(tmp_path / fold / "predictions.tsv", sep="\t", index=False)
        metrics = {"task": "segmentation", "target": "label", "classes": names, "best_epoch": 1,
                   "spacing_mm": [2.0, 2.0, 2.0], "n": 2, "dice_a": float(predictions["dice_a"].mean()),
                   "hd95_a": float(predictions["hd95_a"].mean())}
        (tmp_path / fold / "metrics.json").write_text(json.dumps(metrics))
        fold_dirs.append(tmp_path / fold)
    result = summarise(fold_dirs, tmp_path / "summary")
    table = pd.read_csv(tmp_path / "summary" / "metrics.tsv", sep="\t", index_col="model")
    assert list(table.index) == ["fold-1", "fold-2", "fold-3", "mean", "sd", "ensemble"]
    dice = {1: 0.75, 0: 1.0, 2: 0.5}  # a 4-voxel cube shifted by 0, 1, 2 voxels
    assert table.loc["fold-3", "dice_a"] == pytest.approx(dice[2])
    assert table.loc["mean", "dice_a"] == pytest.approx(0.75)
    assert table.loc["sd", "dice_a"] == pytest.approx(0.25)
    assert table.loc["ensemble", "dice_a"] == pytest.approx(dice[1])  # the voxel-wise vote: the 1-voxel shift
    assert table.loc["ensemble", "hd95_a"] == pytest.approx(2.0)
    assert result["ensemble"]["dice_a_ci"] == pytest.approx([0.75, 0.75])
    ensemble = pd.read_csv(tmp_path / "summary" / "predictions.tsv", sep="\t").set_index("image_id")
    native = nib.load(ensemble.loc["sub-01", "predicted_labels_native"])  # the vote on the native grid
    np.testing.assert_array_equal(native.affine, np.diag([1.0, 1.5, 1.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(native.dataobj), np.roll(np.pad(true[0], 1), 1, axis=1))
    template = nib.load(ensemble.loc["sub-01", "predicted_labels"])
    np.testing.assert_array_equal(np.asarray(template.dataobj), np.roll(true[0], 1, axis=0))
    assert (tmp_path / "summary" / "performance.png").stat().st_size > 0


@pytest.mark.parametrize("sampler", [{"kind": "image"}, {"kind": "slices", "axis": 0}, {"kind": "slices", "axis": 2},
                                     {"kind": "patches", "size": [4, 4, 4]}])
def test_segmentation_model_reassembles_whole_label_maps_from_views(sampler):
    from pipeline.learning.sampler import SegmentationModel, build_sampler

    class TwoClasses(torch.nn.Module):  # logits (x, -x): a voxel-wise network on any view
        def forward(self, x):
            return torch.cat([x, -x], 1)

    x = torch.randn(2, 1, 6, 7, 8)
    out = SegmentationModel(TwoClasses(), build_sampler(sampler))(x)
    assert out.shape == (2, 2, 6, 7, 8)
    assert torch.allclose(out[:, :1], x, atol=1e-6)


@pytest.mark.parametrize("sampler", [{"kind": "patches", "size": [32, 32, 32], "per_image": 2},
                                     {"kind": "slices", "axis": 1, "per_image": 4}])
def test_segmentation_trains_on_patches_and_slices_with_augmented_labels(tmp_path, sampler):
    """Two epochs on synthetic images whose label is their bright box: labels cut and augmented like
    the images, whole-image validation Dice recorded, the model rebuilt for whole images."""
    import pandas as pd

    from pipeline.learning.saved import load_model
    from pipeline.learning.train import train

    rng = np.random.default_rng(0)
    rows = []
    for k in range(5):
        pid = f"sub-{k}"
        paths = derivative_paths(tmp_path, pid, pid, ["T1w"], label=True)
        paths["array"].parent.mkdir(parents=True, exist_ok=True)
        label = np.zeros((1, 32, 36, 32), np.uint8)
        label[0, 8:24, 10 + k:26, 8:24] = 1
        np.save(paths["array"], (label + rng.normal(0, 0.2, label.shape)).astype(np.float32))
        np.save(paths["label_array"], label)
        rows.append({"image_id": pid, "participant_id": pid, "session": "", "subdir": pid, "path": "",
                     "split": "val" if k == 4 else "train", "array": str(paths["array"]),
                     "label_array": str(paths["label_array"])})
    hyper = {"model": "unet", "model_args": {"features": [4, 4, 4, 4, 4, 4]}, "epochs": 2, "batch_size": 2,
             "sampler": sampler, "augmentation": {"rotation": 10, "translation": 2}}
    best = train(pd.DataFrame(rows), "label", "segmentation", TrainSettings.of(hyper), tmp_path / "train")
    history = pd.read_csv(tmp_path / "train" / "history.tsv", sep="\t")
    assert {"train_dice", "val_dice"} <= set(history.columns) and history["val_dice"].between(0, 1).all()
    assert best["epoch"] == int(history["val_dice"].idxmax()) + 1  # the best validation Dice is kept
    model, coder, _ = load_model(tmp_path / "train" / "model.pt")
    assert coder.task == "segmentation" and coder.classes == ["0", "1"]
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 36, 32)).shape == (1, 2, 32, 36, 32)
