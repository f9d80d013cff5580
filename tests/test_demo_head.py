"""The whole-head phantom of the demo generator (``python -m pipeline.demo --whole-head``), small and coarse."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.demo.__main__ import main
from pipeline.demo.cohort import make_demo
from pipeline.demo.head import WholeHead

TRUTH = Path("derivatives", "groundtruth")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("heads") / "bids", n_subjects=2, seed=4, sim_resolution=3.0,
                     head=WholeHead(deface=True, voxel_mm=(2.5, 3.0)))


def image_and_truth(root: Path, participant: str = "sub-001"):
    image = next((root / participant / "anat").glob("*_T1w.nii*"))
    truth = nib.load(root / TRUTH / participant / "anat" / f"{participant}_desc-brain_mask.nii.gz")
    return nib.load(image), np.asarray(truth.dataobj) > 0


def test_the_head_surrounds_the_brain_in_a_whole_head_field_of_view(heads):
    img, brain = image_and_truth(heads)
    data = np.asarray(img.dataobj, dtype=np.float32)
    extent_mm = np.array(img.shape) * np.asarray(img.header.get_zooms()[:3])
    assert np.all(extent_mm >= [176, 256, 256])
    wm = np.percentile(data[brain], 90)
    head = data > 0.3 * wm  # tissue, not air
    assert (head & ~brain).sum() > brain.sum()  # more head than brain
    assert (data[~brain] > wm).sum() > 0.02 * brain.sum()  # fat brighter than white matter
    pose = json.loads(next((heads / TRUTH / "sub-001" / "anat").glob("*_pose.json")).read_text())
    assert set(pose["simulation"]["head"]) >= {"csf_mm", "skull_mm", "fat_mm", "defaced"}


def test_defacing_zeroes_the_face_and_no_brain(heads):
    img, brain = image_and_truth(heads)
    data = np.asarray(img.dataobj)
    assert (data[brain] == 0).sum() == 0
    assert (data == 0).sum() > 0.02 * data.size  # the face (noise makes zeros rare elsewhere)


def test_whole_head_cohort_is_deterministic(heads, tmp_path):
    again = make_demo(tmp_path / "again", n_subjects=2, seed=4, sim_resolution=3.0,
                      head=WholeHead(deface=True, voxel_mm=(2.5, 3.0)))
    assert files(again) == files(heads)


def test_head_options_need_whole_head(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "x"), "--n-subjects", "2", "--deface"])
    assert "--whole-head" in capsys.readouterr().err
