"""Segmentation model packages on real files: a tiny study (tests/segminipackage.py, ~1 min)
exported, loaded, its ONNX networks against PyTorch, and applied to the study's test image, which
reproduces the study's evaluation label maps exactly; apply mode's plan with such a package."""

from __future__ import annotations

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
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from pipeline.common.errors import InputError  # noqa: E402
from pipeline.common.tables import read_tsv  # noqa: E402
from pipeline.learning.loader import load_batch  # noqa: E402
from pipeline.learning.saved import load_model, package_model  # noqa: E402
from pipeline.results.segmentation import majority  # noqa: E402
from pipeline.common import package  # noqa: E402
from pipeline.sharing import tarball  # noqa: E402
from pipeline.sharing.apply import SNAKEFILE, apply_config  # noqa: E402
from pipeline.sharing.onnxcheck import TOLERANCE  # noqa: E402
from pipeline.sharing.segpredict import label_table, predict_labels  # noqa: E402


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    import segminipackage

    return segminipackage.build(tmp_path_factory.mktemp("segpackage"))


def test_export_writes_a_segmentation_package(study):
    import segminipackage

    folder = study["package"]
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert written == sorted(package.files(segminipackage.FOLDS))
    pkg = package.load(folder)  # checksums and safetensors verified
    spec = pkg.spec
    assert spec["task"] == "segmentation" and spec["classes"] == ["background", "CSF", "GM", "WM"]
    assert spec["labels"] == {"0": "background", "1": "CSF", "2": "GM", "3": "WM"}  # index = label value
    assert spec["sampler"]["kind"] == "slices" and spec["explain"] is None
    assert spec["inference"]["views"] == "slices" and spec["inference"]["axis"] == 2
    assert "majority vote" in spec["ensemble"] and "lowest label" in spec["ensemble"]
    assert spec["onnx"]["output"] == "logits" and spec["onnx"]["max_abs_difference"] <= TOLERANCE
    assert spec["onnx"]["constant_views"] > 0  # the blank slices outside the brain mask, recorded apart
    assert pkg.normalisation["target"]["fold-1"]["task"] == "segmentation"
    assert pkg.metrics["test"]["ensemble"]["dice_mean"] == pytest.approx(
        json.loads(study["summary"].read_text())["ensemble"]["dice_mean"])
    card = (folder / package.CARD).read_text()
    assert "segmentation of label maps (0 background, 1 CSF, 2 GM, 3 WM)" in card and "| dice_GM |" in card
    top, _ = tarball.check_members(__import__("tarfile").open(study["archive"]), study["archive"])
    assert top == "model"


def test_the_packages_folds_are_the_studys_networks(study):
    pkg = package.load(study["package"])
    x = load_batch([str(next(study["preproc"].rglob("sub-001_*desc-preproc_T1w.npy")))])
    with torch.no_grad():
        for fold, train_dir in zip(pkg.folds, study["train"]):
            assert torch.equal(package_model(pkg, fold)(x), load_model(train_dir / "model.pt")[0](x))


def test_onnx_networks_reassembled_by_the_spec_give_the_ensembles_label_map(study):
    """ONNX Runtime's logits of every slice, stacked back along the spec's axis, argmax per fold
    and voted as the spec says: the evaluation's ensemble map, but for the blank slices."""
    import onnxruntime

    pkg = package.load(study["package"])
    evaluation = read_tsv(study["root"] / "evaluate" / "predictions.tsv").iloc[0]
    x = load_batch([str(next(study["preproc"].rglob(f"{evaluation['image_id']}_*desc-preproc_T1w.npy")))])
    slices = x[0].movedim(1 + pkg.spec["inference"]["axis"], 0)  # (S, C, X, Y)
    session = onnxruntime.InferenceSession(str(pkg.folder / package.ONNX), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": slices.numpy()})[0]  # (folds, S, K, X, Y)
    networks = torch.stack([package_model(pkg, fold).network(slices) for fold in pkg.folds]).detach().numpy()
    varying = (slices.flatten(1).amax(1) != slices.flatten(1).amin(1)).numpy()
    assert np.abs(logits - networks)[:, varying].max() <= TOLERANCE
    maps = [np.moveaxis(fold.argmax(1), 0, pkg.spec["inference"]["axis"]) for fold in logits]
    voted = majority(maps, len(pkg.spec["classes"]))
    study_map = np.asarray(nib.load(evaluation["predicted_labels"]).dataobj)
    blank = ~varying
    assert np.array_equal(np.moveaxis(voted, 2, 0)[varying], np.moveaxis(study_map, 2, 0)[varying])
    assert (np.moveaxis(voted, 2, 0)[blank] == np.moveaxis(study_map, 2, 0)[blank]).mean() > 0.99


@pytest.mark.parametrize("sampler", [{"kind": "patches", "size": [32, 32, 32]}, {"kind": "image"}])
def test_onnx_of_3d_networks_on_patches_or_whole_images(tmp_path, sampler):
    """Untrained 3D unets (two folds) on patches or whole images: the ONNX graph takes their views and
    matches PyTorch; the spec's inference names the sliding window or the whole image."""
    from pipeline.learning.models import build_model
    from pipeline.learning.sampler import SegmentationModel, build_sampler
    from pipeline.sharing.segexport import network_onnx, spec_entries

    torch.manual_seed(0)
    models = [SegmentationModel(build_model("unet", 1, 3, 3, features=[4, 4, 4, 4, 4, 4]), build_sampler(sampler)).eval()
              for _ in range(2)]
    array = tmp_path / "image.npy"
    np.save(array, np.random.default_rng(0).normal(size=(1, 48, 32, 32)).astype(np.float32))
    checked = network_onnx(models, {}, [str(array)], tmp_path / "model.onnx")
    assert checked["max_abs_difference"] <= TOLERANCE and checked["constant_views"] == 0
    inference = spec_entries(models, ["background", "a", "b"])["inference"]
    assert inference["views"] == sampler["kind"]
    if sampler["kind"] == "patches":
        assert inference["size"] == [32, 32, 32] and inference["overlap"] == 0.5


def test_applying_the_package_reproduces_the_evaluations_label_maps(study, tmp_path):
    """The package applied to the study's test image: the same template-grid map bit for bit, the
    same native-grid map, and (its label image given) the same Dice and HD95 as the evaluation."""
    pkg = package.load(study["package"])
    evaluation = read_tsv(study["root"] / "evaluate" / "predictions.tsv").set_index("image_id")
    table = label_table(study["manifest"], study["preproc"], ["T1w"], pkg, None)
    table = table[table["image_id"].isin(evaluation.index)].reset_index(drop=True)
    out = tmp_path / "apply"
    result = predict_labels(pkg, table, study["preproc"], ["T1w"], out / "predict", out / "predictions.tsv")
    assert list(result["image_id"]) == list(evaluation.index)
    for row in read_tsv(out / "predictions.tsv").itertuples():
        theirs = evaluation.loc[row.image_id]
        ours_map, their_map = nib.load(row.predicted_labels), nib.load(theirs["predicted_labels"])
        assert Path(row.predicted_labels).is_relative_to(out / "labels")
        assert ours_map.get_data_dtype() == np.uint8 and np.array_equal(ours_map.affine, their_map.affine)
        assert np.array_equal(np.asarray(ours_map.dataobj), np.asarray(their_map.dataobj))
        assert len(np.unique(np.asarray(ours_map.dataobj))) > 1  # a real map, not all background
        native, their_native = nib.load(row.predicted_labels_native), nib.load(theirs["predicted_labels_native"])
        assert np.array_equal(native.affine, their_native.affine)
        assert np.array_equal(np.asarray(native.dataobj), np.asarray(their_native.dataobj))
        for column in ("dice_mean", "dice_WM", "hd95_WM", "native_dice_WM"):
            assert getattr(row, column) == pytest.approx(theirs[column], nan_ok=True)
    for fold in pkg.folds:
        assert (out / "predict" / fold / "predictions.tsv").is_file()

    # Without label images: the same maps, no scores.
    unlabelled = table.drop(columns=["label", "label_array"])
    plain = predict_labels(pkg, unlabelled, study["preproc"], ["T1w"], tmp_path / "plain" / "predict",
                           tmp_path / "plain" / "predictions.tsv")
    assert not [c for c in plain.columns if c.startswith(("dice_", "hd95_", "native_", "true_"))]
    assert np.array_equal(np.asarray(nib.load(plain["predicted_labels"][0]).dataobj),
                          np.asarray(nib.load(result["predicted_labels"][0]).dataobj))


def test_apply_report_says_it_is_a_segmentation(study, tmp_path):
    from pipeline.sharing.predict import build_report

    pkg = package.load(study["package"])
    table = pd.DataFrame([{"participant_id": "sub-001", "session": "", "image_id": "sub-001",
                           "predicted_labels": "a.nii.gz", "predicted_labels_native": "b.nii.gz"}])
    table.to_csv(tmp_path / "predictions.tsv", sep="\t", index=False)
    page = build_report(pkg, "lab/tissue:1", tmp_path / "predictions.tsv", None, ["occlusion"], [], {"task": "x"},
                        tmp_path / "report.html").read_text()
    assert "Segmentation into 0 background, 1 CSF, 2 GM, 3 WM by lab/tissue:1" in page
    assert "test-set dice_mean" in page and "Explanation maps" not in page


def test_apply_command_passes_the_label_image_with_the_packages_labels(study, tmp_path, monkeypatch):
    from pipeline.sharing import apply as apply_cli

    monkeypatch.setattr(apply_cli.launch, "snakemake", lambda args, readable=False: 0)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as done:
        apply_cli.main([str(study["bids"]), str(out), "participant", "--model", str(study["archive"]),
                        "--work-dir", str(tmp_path / "work"),
                        "--label-image", '{"derivatives": "derivatives/tissue", "filters": {"suffix": "dseg"}}'])
    assert done.value.code == 0
    config = yaml.safe_load((tmp_path / "work" / "config.yaml").read_text())
    assert config["task"] == "segmentation" and config["explain"] == {"groundtruth": None}
    assert config["label_image"] == {"labels": ["background", "CSF", "GM", "WM"], "derivatives": "derivatives/tissue",
                                     "filters": {"suffix": "dseg"}}


def snakemake(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(out),
                          "--configfile", str(out / "config.yaml"), "--cores", "1", *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.parametrize("label_image", [None, {"derivatives": "derivatives/tissue",
                                                "filters": {"suffix": "dseg", "desc": "tissue"}}])
def test_apply_mode_with_a_segmentation_package_plans_label_maps_not_explanations(study, tmp_path, label_image):
    """Ingestion run for real (it only indexes the dataset), then the dry run of the rest."""
    pkg = package.load(study["package"])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no explanation maps"):
        apply_config(study["bids"], out, pkg, "lab/tissue:1", [], ["gradient"])
    config = apply_config(study["bids"], out, pkg, "lab/tissue:1", [], None, label_image=label_image)
    assert config["task"] == "segmentation"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(out, str(out / "manifest.tsv"))
    run = snakemake(out, "-n", "-p")
    table = run.stdout.split("Job stats:")[1].split("\n\n")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}
    n_images = len(read_tsv(out / "manifest.tsv"))
    assert jobs == {"exclusions": 1, "grid": 1, "preprocess": n_images, "predict_labels": 1, "predict_report": 1,
                    "bidsvalidation": 1, "all": 1, "qc": 1,  # qc: the preprocessing test-retest in the report
                    "applyout": 1}  # the output folder as a BIDS derivative dataset (label maps)
    command = next(line for line in run.stdout.splitlines() if "python -m pipeline.sharing.predict labels" in line)
    assert f"{out}/predictions.tsv" in command
    preprocess = next(line for line in run.stdout.splitlines() if "python -m pipeline.intake.preprocess" in line)
    assert ("desc-tissue_dseg" in preprocess) == bool(label_image)  # the label image goes to the grid when given
    if label_image:
        assert config["label_image"]["labels"] == ["background", "CSF", "GM", "WM"]
        assert "label" in read_tsv(out / "manifest.tsv").columns


@pytest.mark.slow
def test_apply_workflow_on_the_studys_test_participant_reproduces_its_label_maps(study, tmp_path):
    """The real apply workflow (ingest → preprocessing again → predict_labels → report) on the
    study's test participant, with its label image: the same maps on both grids and the same Dice
    as the study's evaluation (~1 min on 2 cores). With a work folder (as ``apply`` runs it), the
    output folder is a BIDS derivative dataset of the label maps the validator finds no error in."""
    from pipeline.common.paths import predicted_labels
    from pipeline.intake import bidsvalidation

    pkg = package.load(study["package"])
    evaluation = read_tsv(study["root"] / "evaluate" / "predictions.tsv").set_index("image_id")
    participants = sorted({evaluation.loc[i, "participant_id"] for i in evaluation.index})
    out, work = tmp_path / "out", tmp_path / "work"
    label_image = {"derivatives": "derivatives/tissue", "filters": {"suffix": "dseg", "desc": "tissue"}}
    config = apply_config(study["bids"], out, pkg, "lab/tissue:1", participants, None, label_image=label_image,
                          work_dir=work)
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(work)
    applied = read_tsv(work / "predictions.tsv").set_index("image_id")
    assert sorted(applied.index) == sorted(evaluation.index)
    manifest = read_tsv(work / "manifest.tsv").set_index("image_id")
    for image_id, row in applied.iterrows():
        published = predicted_labels(str(out), manifest.at[image_id, "subdir"], image_id)
        for column, space in (("predicted_labels", "template"), ("predicted_labels_native", "native")):
            ours, theirs = nib.load(row[column]), nib.load(evaluation.loc[image_id, column])
            assert np.array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
            assert np.array_equal(np.asarray(nib.load(published[space]).dataobj), np.asarray(ours.dataobj))
        assert row["dice_mean"] == pytest.approx(evaluation.loc[image_id, "dice_mean"])
    assert "Segmentation into 0 background" in (out / "report.html").read_text()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".npy", ".yaml", ".log", ".mat"))], files
    scans = pd.concat([read_tsv(p) for p in out.rglob("*_scans.tsv")])
    assert scans["filename"].str.endswith("_desc-predicted_dseg.nii.gz").sum() == 2 * len(applied)
    validator = bidsvalidation.find_validator()
    if validator is not None:
        summary = bidsvalidation.summarise(bidsvalidation.run_validator(out, validator))
        print("\n".join(bidsvalidation.lines({"dataset": str(out), **summary})))
        assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}
