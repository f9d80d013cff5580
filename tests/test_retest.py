"""Test-retest of the model (pipeline.results.retest): the difference of two predictions of one
participant and the similarity of their explanation maps, in a study (fold maps) and in apply mode
(the package's fold-mean maps)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from pipeline.common.paths import derivative_paths
from pipeline.intake.study import study_table
from pipeline.learning.loader import load_batch
from pipeline.results import retest
from pipeline.results.attribution import Settings
from pipeline.results.maps import FoldMeanMaps
from pipeline.common import package
from pipeline.sharing import predict as predict_cli


def inside_r(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> tuple[float, float]:
    return float(np.corrcoef(a[brain], b[brain])[0, 1]), float(spearmanr(a[brain], b[brain])[0])


def test_study_pairs_a_participants_test_images_with_fold_mean_maps(tmp_path):
    """sub-1 has two sessions among the test images: one pair; its maps are each image's mean over
    the folds, compared inside the brain; sub-2 (one image) pairs with nobody."""
    rng = np.random.default_rng(0)
    affine, shape = np.diag([4.0, 4.0, 4.0, 1.0]), (6, 7, 5)
    brain = np.zeros(shape, bool)
    brain[1:5, 1:6, 1:4] = True
    base = rng.normal(0, 1, shape)
    maps = {("fold-1", "sub-1_ses-1"): base + rng.normal(0, 0.2, shape),
            ("fold-2", "sub-1_ses-1"): base + rng.normal(0, 0.2, shape),
            ("fold-1", "sub-1_ses-2"): base + rng.normal(0, 0.6, shape),
            ("fold-2", "sub-1_ses-2"): base + rng.normal(0, 0.6, shape),
            ("fold-1", "sub-2"): rng.normal(0, 1, shape), ("fold-2", "sub-2"): rng.normal(0, 1, shape)}
    for fold in ("fold-1", "fold-2"):
        rows = []
        for (f, image_id), data in maps.items():
            if f == fold:
                path = tmp_path / fold / f"{image_id}_occlusion.nii.gz"
                path.parent.mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
                rows.append({"image_id": image_id, "participant_id": image_id.split("_")[0], "method": "occlusion",
                             "template": str(path), "native": str(path)})
        pd.DataFrame(rows).to_csv(tmp_path / fold / "maps.tsv", sep="\t", index=False)
    predictions = pd.DataFrame({"participant_id": ["sub-1", "sub-1", "sub-2"], "session": ["ses-1", "ses-2", ""],
                                "image_id": ["sub-1_ses-1", "sub-1_ses-2", "sub-2"], "true": [50.0, 50.0, 30.0],
                                "predicted": [52.5, 49.25, 31.0]})
    template = {"occlusion": FoldMeanMaps([tmp_path / "fold-1", tmp_path / "fold-2"], "occlusion", "template")}
    table = retest.retest_table(predictions, template, brain)
    assert table[["participant_id", "image_a", "image_b"]].values.tolist() == [["sub-1", "sub-1_ses-1", "sub-1_ses-2"]]
    row = table.iloc[0]
    assert (row["predicted_a"], row["predicted_b"], row["prediction_difference"]) == (52.5, 49.25, 3.25)
    mean = {i: (maps["fold-1", i] + maps["fold-2", i]).astype(np.float32) / 2 for i in ("sub-1_ses-1", "sub-1_ses-2")}
    pearson, spearman = inside_r(mean["sub-1_ses-1"].astype(np.float64), mean["sub-1_ses-2"].astype(np.float64), brain)
    assert row["occlusion_map_pearson"] == pytest.approx(pearson, abs=1e-4) and 0.7 < pearson < 0.98
    assert row["occlusion_map_spearman"] == pytest.approx(spearman, abs=1e-4) and 0.7 < spearman < 0.98
    table.to_csv(tmp_path / retest.FILE, sep="\t", index=False)
    page = "".join(retest.paragraph(tmp_path / retest.FILE, "regression", "age"))
    assert ("1 pair(s) of images of one participant (1 participant(s)); their predictions' |difference| in units of "
            "<code>age</code>: median 3.25") in page
    assert f"occlusion Pearson r median {row['occlusion_map_pearson']:.3f}" in page


def test_classification_difference_is_the_largest_class_probability_gap():
    predictions = pd.DataFrame({"participant_id": ["sub-1"] * 3, "image_id": ["sub-1_run-1", "sub-1_run-2", "sub-1_run-3"],
                                "predicted": ["AD", "CN", "AD"], "p_AD": [0.7, 0.4, 0.9], "p_CN": [0.3, 0.6, 0.1]})
    table = retest.retest_table(predictions, {}, np.ones((2, 2, 2), bool))
    assert table[["image_a", "image_b"]].values.tolist() == [["sub-1_run-1", "sub-1_run-2"], ["sub-1_run-1", "sub-1_run-3"],
                                                             ["sub-1_run-2", "sub-1_run-3"]]
    assert table["prediction_difference"].tolist() == pytest.approx([0.3, 0.2, 0.5])
    assert retest.retest_table(predictions.iloc[:1], {}, np.ones((2, 2, 2), bool)).empty


def test_apply_writes_the_retest_of_a_participant_scanned_twice(mini_study, tmp_path):
    """The mini package applied to its test images and a second scan of sub-01 (its image plus
    noise): one pair, whose prediction difference and map correlations are those of the files the
    apply run wrote; and the apply report says so."""
    pkg = package.load(mini_study / "package" / "model")
    table = study_table(mini_study / "manifest.tsv", mini_study / "splits.tsv", mini_study / "derivatives", "fold-1",
                        ["T1w"])
    table = table[table["split"] == "test"].drop(columns="split")
    first = table[table["image_id"] == "sub-01"].iloc[0]
    rescan = derivative_paths(tmp_path / "derivatives", "sub-01/ses-2", "sub-01_ses-2", ["T1w"])["array"]
    rescan.parent.mkdir(parents=True)
    x = np.load(first["array"])
    np.save(rescan, (x + np.random.default_rng(1).normal(0, 0.5, x.shape)).astype(np.float32))
    second = first.copy()
    second[["image_id", "session", "subdir", "array"]] = ["sub-01_ses-2", "ses-2", "sub-01/ses-2", str(rescan)]
    table = pd.concat([table, second.to_frame().T], ignore_index=True)
    predict_cli.predict_folds(pkg, table, tmp_path / "predict", tmp_path / "predictions.tsv")
    # The maps as predict_maps computes them (fold_mean_maps), in template space, indexed in maps.tsv.
    mask = mini_study / "grid" / "mask.nii.gz"
    affine, brain = nib.load(mask).affine, np.asarray(nib.load(mask).dataobj) > 0
    settings = Settings.of({"window": 4, "stride": 4, "gradcam_layer": "features.1"})
    rows, arrays = [], {}
    for row in table.itertuples(index=False):
        maps = predict_cli.fold_mean_maps(pkg, load_batch([row.array]), ["occlusion", "gradient"], settings, None)
        for method, data in maps.items():
            path = tmp_path / "explain" / "maps" / f"{row.image_id}_{method}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), path)
            arrays[row.image_id, method] = data.astype(np.float64)
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "method": method,
                         "template": str(path), "native": str(path)})
    pd.DataFrame(rows).to_csv(tmp_path / "explain" / "maps.tsv", sep="\t", index=False)
    out = tmp_path / retest.FILE
    predict_cli.main(["retest", "--predictions", str(tmp_path / "predictions.tsv"), "--maps-dir",
                      str(tmp_path / "explain"), "--mask", str(mask), "--out", str(out)])
    written = pd.read_csv(out, sep="\t")
    assert written[["participant_id", "image_a", "image_b"]].values.tolist() == [["sub-01", "sub-01", "sub-01_ses-2"]]
    predicted = pd.read_csv(tmp_path / "predictions.tsv", sep="\t").set_index("image_id")["predicted"]
    gap = abs(predicted["sub-01"] - predicted["sub-01_ses-2"])
    assert written.at[0, "prediction_difference"] == pytest.approx(gap, abs=1e-4) and gap > 0
    for method in ("occlusion", "gradient"):
        pearson, spearman = inside_r(arrays["sub-01", method], arrays["sub-01_ses-2", method], brain)
        assert written.at[0, f"{method}_map_pearson"] == pytest.approx(pearson, abs=1e-4) and -1 < pearson < 1
        assert written.at[0, f"{method}_map_spearman"] == pytest.approx(spearman, abs=1e-4)
    assert "Test-retest prediction difference" in (out.with_suffix(".json")).read_text()  # its data dictionary
    # Predictions only (--maps none): the difference, no map columns.
    predict_cli.main(["retest", "--predictions", str(tmp_path / "predictions.tsv"), "--mask", str(mask),
                      "--out", str(tmp_path / "only.tsv")])
    assert list(pd.read_csv(tmp_path / "only.tsv", sep="\t").columns) == retest.COLUMNS
    # The apply report's sentence.
    predict_cli.build_report(pkg, "lab/mini", tmp_path / "predictions.tsv", None, ["occlusion", "gradient"], [],
                             {"apply": {}}, tmp_path / "report.html", retest=[out])
    page = (tmp_path / "report.html").read_text()
    assert f"their predictions' |difference| in units of <code>age</code>: median {gap:.3g}" in page
