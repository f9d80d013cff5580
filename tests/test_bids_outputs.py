"""The study's predictions and explanation maps as a BIDS derivative dataset (issue #29, item 4):
fold-mean maps with BIDS entities, predictions per participant and per image (scans tables) with
their data dictionaries, a description with GeneratedBy and SourceDatasets, and no validator error.

Two tiny folds of maps written by hand (4³ voxels, three images of two participants, one with two
sessions); the dataset of a real study is validated in tests/test_workflow.py."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from bids.layout import parse_file_entities

from conftest import stage_config
from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE, explanation_maps
from pipeline.intake import bidsvalidation
from pipeline.results import bidsout

IMAGES = [("sub-01", "sub-01", "sub-01"), ("sub-02_ses-1", "sub-02", "sub-02/ses-1"), ("sub-02_ses-2", "sub-02", "sub-02/ses-2")]
METHODS = ["occlusion", "integrated_gradients"]


def write_folds(root: Path) -> list[Path]:
    """Two folds' maps.tsv and maps: fold k's map of image i is filled with 10·i + k."""
    folds = []
    for k in (1, 2):
        fold, rows = root / "explain" / f"fold-{k}", []
        for i, (image_id, participant, subdir) in enumerate(IMAGES):
            for method in METHODS:
                paths = explanation_maps(str(fold / "maps"), subdir, image_id, method)
                Path(paths["template"]).parent.mkdir(parents=True, exist_ok=True)
                for space, shape in (("template", (4, 4, 4)), ("native", (5, 4, 3))):
                    data = np.full(shape, 10.0 * i + k, np.float32)
                    atomic.nib_save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), paths[space])
                rows.append({"image_id": image_id, "participant_id": participant, "subdir": subdir, "method": method,
                             **paths})
        pd.DataFrame(rows).to_csv(fold / "maps.tsv", sep="\t", index=False)
        folds.append(fold)
    return folds


def write_inputs(root: Path, task: str = "regression") -> tuple[Path, Path]:
    raw = root / "bids"
    manifest = pd.DataFrame([{"image_id": i, "participant_id": p, "subdir": s, "session": s.partition("/")[2],
                              "path": str(raw / s / "anat" / f"{i}_T1w.nii.gz")} for i, p, s in IMAGES])
    manifest.to_csv(root / "samples.tsv", sep="\t", index=False)
    predictions = manifest[["participant_id", "session", "image_id"]].assign(true=[30.0, 50.0, 52.0],
                                                                            predicted=[33.0, 48.0, 56.0])
    if task == "classification":  # a diagnosis that changed between sub-02's sessions
        predictions = predictions.assign(true=["cn", "cn", "ad"], predicted=["cn", "ad", "ad"], p_cn=[0.9, 0.4, 0.2],
                                         p_ad=[0.1, 0.6, 0.8])
    predictions.to_csv(root / "predictions.tsv", sep="\t", index=False)
    return root / "samples.tsv", root / "predictions.tsv"


def build(root: Path, task: str = "regression") -> Path:
    folds = write_folds(root)
    manifest, predictions = write_inputs(root, task)
    out = root / "results" / "derivatives" / "predictions"
    config = stage_config(bids_dir=str(root / "bids"), explain={"methods": METHODS}, task=task)
    bidsout.main([*map(str, folds), "--config", config, "--predictions", str(predictions), "--manifest",
                  str(manifest), "--preproc-dir", str(root / "results" / "derivatives" / "pipeline"),
                  "--out-dir", str(out)])
    return out


def test_maps_and_predictions_form_a_derivative_dataset(tmp_path):
    out = build(tmp_path)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative" and description["GeneratedBy"][0]["Name"] == "bids-deepstudy"
    assert [s["URL"] for s in description["SourceDatasets"]] == [
        (tmp_path / "bids").resolve().as_uri(), (tmp_path / "results" / "derivatives" / "pipeline").resolve().as_uri()]
    assert set(description["DatasetLinks"]) == {"raw", "preprocessed"}
    # Each image's map is the mean of its two folds' maps, in both spaces, named by its entities.
    for i, (image_id, participant, subdir) in enumerate(IMAGES):
        for method in METHODS:
            for space, shape in (("template", (4, 4, 4)), ("native", (5, 4, 3))):
                path = Path(explanation_maps(str(out), subdir, image_id, method)[space])
                data = nib.load(path).get_fdata()
                assert data.shape == shape and np.allclose(data, 10 * i + 1.5), path
                entities = parse_file_entities(str(path))
                assert entities["subject"] == participant[4:] and entities["desc"] == method.replace("_", "")
                assert entities["space"] == (SPACE if space == "template" else "T1w")
                assert entities.get("session") == (subdir.split("ses-")[1] if "ses-" in subdir else None)
                sidecar = json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())
                assert sidecar["Method"] == method and sidecar["Sources"][0] == f"bids:raw:{subdir}/anat/{image_id}_T1w.nii.gz"
                assert sidecar["Sources"][1].startswith(f"bids:preprocessed:{subdir}/anat/{image_id}_space-{SPACE}")
    scans = pd.read_csv(out / "sub-02" / "ses-2" / "sub-02_ses-2_scans.tsv", sep="\t")
    assert len(scans) == 2 * len(METHODS) and set(scans["image_id"]) == {"sub-02_ses-2"}
    assert (scans["predicted"] == 56.0).all() and all((out / "sub-02" / "ses-2" / f).exists() for f in scans["filename"])
    assert "Description" in json.loads((out / "sub-02" / "ses-2" / "sub-02_ses-2_scans.json").read_text())["filename"]
    people = pd.read_csv(out / "participants.tsv", sep="\t")
    assert list(people["participant_id"]) == ["sub-01", "sub-02"] and list(people["images"]) == [1, 2]
    assert people.set_index("participant_id").at["sub-02", "predicted"] == pytest.approx(52.0)
    assert "Description" in json.loads((out / "participants.json").read_text())["predicted"]


@pytest.mark.skipif(bidsvalidation.find_validator() is None, reason="bids-validator-deno is not installed")
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_the_derivative_dataset_passes_the_bids_validator(tmp_path, task):
    out = build(tmp_path, task)
    summary = bidsvalidation.summarise(bidsvalidation.run_validator(out, bidsvalidation.find_validator()))
    print("\n".join(bidsvalidation.lines({"dataset": str(out), **summary})))
    assert summary["errors"] == 0, {c: e for c, e in summary["codes"].items() if e["severity"] == "error"}
    (out / "sub-01" / "anat" / "sub-01_predictions.tsv").write_text("a\n1\n")  # the check can fail
    broken = bidsvalidation.summarise(bidsvalidation.run_validator(out, bidsvalidation.find_validator()))
    assert broken["errors"] >= 1


def test_classification_participants_have_one_row_and_unknown_images_are_refused(tmp_path):
    predictions = pd.DataFrame({"participant_id": ["sub-01", "sub-01", "sub-02"], "image_id": ["a", "b", "c"],
                                "true": ["ad", "cn", "cn"], "p_cn": [0.2, 0.6, 0.9], "p_ad": [0.8, 0.4, 0.1]})
    table = bidsout.per_participant(predictions)
    assert list(table["participant_id"]) == ["sub-01", "sub-02"] and list(table["true"]) == ["ad;cn", "cn"]
    assert list(table["predicted"]) == ["ad", "cn"] and table.at[0, "p_ad"] == pytest.approx(0.6)
    manifest = pd.DataFrame({"image_id": ["a", "b"], "subdir": ["sub-01/ses-1", "sub-01/ses-2"]})
    with pytest.raises(InputError, match="not in the manifest: c"):
        bidsout.write_predictions(tmp_path, predictions, manifest, {})
