"""Tests of the simulated BIDS brain-age cohort (pipeline.demo) on a small, coarse cohort."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from pipeline.demo.__main__ import main
from pipeline.demo.anatomy import load_anatomy, sim_grid, ventricle_volume_mm3, world_coordinates
from pipeline.demo.cohort import make_demo
from pipeline.demo.lesion import Lesion
from pipeline.demo.scanner import resample_to_scanner, rigid_pose
from pipeline.common.errors import InputError
from pipeline.intake.template import SPACE, load_template

N_SUBJECTS, SEED, RESOLUTION = 6, 3, 3.0
TRUTH = Path("derivatives", "groundtruth")
TISSUE = Path("derivatives", "tissue")


def all_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def images(root: Path) -> list[dict]:
    """One record per T1w image: path, participant, session, stem, its pose JSON and sidecar."""
    out = []
    for path in sorted(root.glob("sub-*/**/anat/*_T1w.nii*")):
        stem = path.name.split("_T1w")[0]
        subdir = path.parent.relative_to(root)
        out.append({"path": path, "participant_id": stem.split("_")[0], "stem": stem,
                    "session": stem.split("_")[1] if "_ses-" in stem else None,
                    "pose": json.loads((root / TRUTH / subdir / f"{stem}_from-{SPACE}_to-T1w_pose.json").read_text()),
                    "sidecar": json.loads((path.parent / f"{stem}_T1w.json").read_text())})
    return out


def coarse_template_grid(resolution: float = 3.0) -> tuple[np.ndarray, tuple]:
    """(affine, shape) of a coarse RAS+ grid with the template's origin."""
    template = load_template("T1w")
    return sim_grid(resolution, template.shape, template.affine)


def back_to_template(image: dict, affine: np.ndarray, shape) -> np.ndarray:
    """The scanner image resampled onto a template-space grid through its true pose A."""
    img = nib.load(image["path"])
    pose = np.array(image["pose"]["matrix"])
    m = np.linalg.inv(img.affine) @ pose @ affine  # template voxel -> template world -> scanner voxel
    data = np.asarray(img.dataobj, dtype=np.float32)
    return ndi.affine_transform(data, m[:3, :3], m[:3, 3], output_shape=shape, order=1, cval=0.0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_demo(tmp_path_factory.mktemp("demo") / "bids", n_subjects=N_SUBJECTS, seed=SEED,
                     sim_resolution=RESOLUTION)


@pytest.fixture(scope="module")
def coarse(dataset):
    """Template T1, brain mask, ground-truth masks and every image, all on a 3 mm template grid."""
    affine, shape = coarse_template_grid()
    template = load_anatomy(3.0)
    masks = {name: nib.load(dataset / TRUTH / f"space-{SPACE}_desc-{name}_mask.nii.gz") for name in ("age", "group")}
    on_grid = {name: resample_to_scanner(np.asarray(m.dataobj, dtype=np.float32), m.affine, np.eye(4),
                                         affine, shape) > 0.5 for name, m in masks.items()}
    recs = images(dataset)
    for rec in recs:
        rec["template_space"] = back_to_template(rec, affine, shape)
    return {"affine": affine, "shape": shape, "t1": template.t1, "brain": template.gm + template.wm > 0.5,
            "wm": template.wm > 0.9, "masks": on_grid, "images": recs}


def test_bids_tree(dataset):
    description = json.loads((dataset / "dataset_description.json").read_text())
    assert description["BIDSVersion"] == "1.9.0" and description["DatasetType"] == "raw"
    assert description["GeneratedBy"][0]["Name"] == "pipeline.demo"
    assert (dataset / "README").read_text().strip()
    truth = json.loads((dataset / TRUTH / "dataset_description.json").read_text())
    assert truth["DatasetType"] == "derivative"
    assert "never" in (dataset / TRUTH / "README").read_text().lower()

    participants = pd.read_csv(dataset / "participants.tsv", sep="\t", dtype=str)
    assert list(participants["participant_id"]) == [f"sub-{i:03d}" for i in range(1, N_SUBJECTS + 1)]
    expected = {"dataset_description.json", "README", "participants.tsv", "participants.json",
                f"{TRUTH}/dataset_description.json", f"{TRUTH}/README",
                f"{TRUTH}/space-{SPACE}_desc-age_mask.nii.gz", f"{TRUTH}/space-{SPACE}_desc-group_mask.nii.gz",
                f"{TRUTH}/space-{SPACE}_desc-effects.json",
                f"{TISSUE}/dataset_description.json", f"{TISSUE}/README", f"{TISSUE}/desc-tissue_dseg.tsv"}
    recs = images(dataset)
    for rec in recs:
        rel = rec["path"].parent.relative_to(dataset)
        expected |= {f"{rel}/{rec['path'].name}", f"{rel}/{rec['stem']}_T1w.json",
                     f"{TRUTH}/{rel}/{rec['stem']}_from-{SPACE}_to-T1w_pose.json",
                     f"{TISSUE}/{rel}/{rec['stem']}_desc-tissue_dseg.nii.gz"}
    assert set(all_files(dataset)) == expected
    assert {r["participant_id"] for r in recs} == set(participants["participant_id"])

    # At least one participant has two sessions; the others have no session level.
    by_subject = {}
    for rec in recs:
        by_subject.setdefault(rec["participant_id"], []).append(rec["session"])
    assert sorted(by_subject.values(), key=len)[-1] == ["ses-01", "ses-02"]
    assert sum(v == [None] for v in by_subject.values()) == N_SUBJECTS - 1
    suffixes = [r["path"].name.endswith(".nii.gz") for r in recs]
    assert 0 < suffixes.count(False) < suffixes.count(True)  # about a third uncompressed


def test_participants_table(dataset):
    table = pd.read_csv(dataset / "participants.tsv", sep="\t")
    assert list(table.columns) == ["participant_id", "age", "sex", "group"]
    assert table["age"].between(20, 80).all()
    assert (table["age"] == table["age"].round(1)).all()
    assert set(table["sex"]) <= {"M", "F"}
    assert table["group"].value_counts().to_dict() == {"patient": N_SUBJECTS // 2, "control": N_SUBJECTS // 2}
    sidecar = json.loads((dataset / "participants.json").read_text())
    assert sidecar["age"]["Units"] == "years"
    assert set(sidecar["group"]["Levels"]) == {"patient", "control"}
    assert set(sidecar) == set(table.columns)


def test_sessions_share_anatomy_not_scanner(dataset):
    recs = [r for r in images(dataset) if r["session"]]
    first, second = recs[0], recs[1]
    assert first["participant_id"] == second["participant_id"]
    for key in ("age", "group", "lesion_radius_mm", "lesion_core_multiplier"):
        assert first["pose"]["simulation"][key] == second["pose"]["simulation"][key]
    assert first["pose"]["rotation_deg"] != second["pose"]["rotation_deg"]
    assert first["pose"]["simulation"]["noise_seed"] != second["pose"]["simulation"]["noise_seed"]


def test_deterministic_and_overwrite(dataset, tmp_path):
    other = make_demo(tmp_path / "bids", n_subjects=N_SUBJECTS, seed=SEED + 1, sim_resolution=RESOLUTION)
    first, different = all_files(dataset), all_files(other)
    assert first["participants.tsv"] != different["participants.tsv"]
    changed = [k for k in first if k.endswith(("_T1w.nii", "_T1w.nii.gz")) and first[k] != different.get(k)]
    assert changed

    with pytest.raises(InputError, match="not empty"):
        make_demo(other, n_subjects=N_SUBJECTS, seed=SEED, sim_resolution=RESOLUTION)
    make_demo(other, n_subjects=N_SUBJECTS, seed=SEED, sim_resolution=RESOLUTION, overwrite=True)
    again = all_files(other)
    assert set(again) == set(first)
    assert [k for k in first if first[k] != again[k]] == []


def test_refuses_foreign_or_nonempty_dir(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path), "--n-subjects", "4", "--sim-resolution", "4"])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(InputError, match="not written by pipeline.demo"):
        make_demo(tmp_path, n_subjects=4, sim_resolution=4, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(InputError, match="at least 2"):
        make_demo(tmp_path / "new", n_subjects=1)
    assert not (tmp_path / "new").exists()


def test_headers_and_orientation(dataset):
    recs = images(dataset)
    assert {r["sidecar"]["Orientation"] for r in recs} - {"RAS"}  # some LAS/LPS images
    for rec in recs:
        img = nib.load(rec["path"])
        assert img.ndim == 3 and img.get_data_dtype() == np.int16
        assert "".join(nib.aff2axcodes(img.affine)) == rec["sidecar"]["Orientation"]
        qform, qcode = img.header.get_qform(coded=True)
        sform, scode = img.header.get_sform(coded=True)
        assert qcode == 1 and scode == 1
        np.testing.assert_allclose(qform, img.affine, atol=1e-4)
        np.testing.assert_allclose(sform, img.affine, atol=1e-4)
        voxel = rec["sidecar"]["VoxelSize"]
        np.testing.assert_allclose(img.header.get_zooms(), voxel, atol=1e-4)
        assert 1.5 <= voxel[0] <= 2.5 and rec["sidecar"]["Manufacturer"] == "Simulated"


def test_pose_matches_rotation_and_translation(dataset):
    for rec in images(dataset):
        pose = rec["pose"]
        matrix = np.array(pose["matrix"])
        expected = rigid_pose(pose["rotation_deg"], pose["translation_mm"], pose["rotation_centre_mm"])
        np.testing.assert_allclose(matrix, expected, atol=1e-8)
        np.testing.assert_allclose(matrix[:3, :3] @ matrix[:3, :3].T, np.eye(3), atol=1e-8)
        assert np.all(np.abs(pose["rotation_deg"]) <= 10) and np.all(np.abs(pose["translation_mm"]) <= 10)


def test_images_map_back_onto_the_template(coarse):
    """Through the true pose A every image matches the template; through A^-1 it does not."""
    brain = coarse["brain"]
    for rec in coarse["images"]:
        back = rec["template_space"]
        r = np.corrcoef(back[brain], coarse["t1"][brain])[0, 1]
        assert r > 0.8, (rec["stem"], r)
        img = nib.load(rec["path"])
        pose = np.array(rec["pose"]["matrix"])
        # The brain sits inside the field of view: the mapped brain centre is a voxel well inside.
        centre = np.linalg.inv(img.affine) @ pose @ np.array([0.0, -17.0, 6.0, 1.0])
        assert np.all(centre[:3] > 0.3 * np.array(img.shape)) and np.all(centre[:3] < 0.7 * np.array(img.shape))


def test_wrong_pose_does_not_match(coarse):
    brain = coarse["brain"]
    rec = max(coarse["images"], key=lambda r: np.abs(r["pose"]["rotation_deg"]).max())
    wrong = dict(rec, pose={"matrix": np.linalg.inv(np.array(rec["pose"]["matrix"])).tolist()})
    back = back_to_template(wrong, coarse["affine"], coarse["shape"])
    right = np.corrcoef(rec["template_space"][brain], coarse["t1"][brain])[0, 1]
    assert np.corrcoef(back[brain], coarse["t1"][brain])[0, 1] < right - 0.05


def normalised(rec: dict, coarse: dict) -> np.ndarray:
    """The image in template space divided by its median white-matter intensity."""
    back = rec["template_space"]
    return back / np.median(back[coarse["wm"]])


def test_lesion_in_native_space(dataset):
    """The voxel at A @ lesion centre is dark in patients only (contralateral point as reference)."""
    effects = json.loads((dataset / TRUTH / f"space-{SPACE}_desc-effects.json").read_text())
    centre = np.array(next(e for e in effects["Effects"] if e["effect"] == "group")["centre_mm"])
    mirror = centre * [-1, 1, 1]
    for rec in images(dataset):
        img = nib.load(rec["path"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        to_voxel = np.linalg.inv(img.affine) @ np.array(rec["pose"]["matrix"])

        def around(point):
            ijk = np.rint(to_voxel[:3, :3] @ point + to_voxel[:3, 3]).astype(int)
            return data[tuple(slice(i - 1, i + 2) for i in ijk)].mean()

        ratio = around(centre) / around(mirror)
        if rec["pose"]["simulation"]["group"] == "patient":
            assert ratio < 0.7, (rec["stem"], ratio)
        else:
            assert 0.8 < ratio < 1.25, (rec["stem"], ratio)  # bias field only


def test_patients_darker_in_group_mask(coarse):
    mask = coarse["masks"]["group"]
    values = {"patient": [], "control": []}
    for rec in coarse["images"]:
        values[rec["pose"]["simulation"]["group"]].append(normalised(rec, coarse)[mask].mean())
    assert max(values["patient"]) < min(values["control"]) - 0.05, values


def test_ventricles_grow_with_age(coarse):
    anatomy = load_anatomy(RESOLUTION)
    volumes = [ventricle_volume_mm3(anatomy, age) for age in (20, 50, 80)]
    assert volumes[0] < volumes[1] < volumes[2]
    assert 1.6 < volumes[2] / volumes[0] < 2.5
    # In the images: the ventricular part of the age mask darkens with age.
    x, y, z = world_coordinates(coarse["affine"], coarse["shape"])
    central = coarse["masks"]["age"] & (np.abs(x) < 30) & (y > -45) & (y < 25) & (z > 0) & (z < 35)
    assert central.sum() > 50
    ages = [rec["pose"]["simulation"]["age"] for rec in coarse["images"]]
    brightness = [normalised(rec, coarse)[central].mean() for rec in coarse["images"]]
    assert np.corrcoef(ages, brightness)[0, 1] < -0.8, list(zip(ages, brightness))


def test_ground_truth_masks(dataset):
    template = load_template("T1w")
    effects = json.loads((dataset / TRUTH / f"space-{SPACE}_desc-effects.json").read_text())
    regions = {e["name"]: e for e in effects["Effects"]}
    for name in ("age", "group"):
        img = nib.load(dataset / TRUTH / f"space-{SPACE}_desc-{name}_mask.nii.gz")
        assert img.get_data_dtype() == np.uint8 and img.shape == template.shape
        np.testing.assert_allclose(img.affine, template.affine)
        mask = np.asarray(img.dataobj) > 0
        assert mask.sum() == effects["Masks"][name]["volume_mm3"] > 1000
        assert mask.sum() < 0.1 * (np.asarray(template.dataobj) > 0.1).sum()  # clearly localised
    group = np.asarray(nib.load(dataset / TRUTH / f"space-{SPACE}_desc-group_mask.nii.gz").dataobj)
    centroid = template.affine[:3, :3] @ ndi.center_of_mass(group) + template.affine[:3, 3]
    np.testing.assert_allclose(centroid, regions["right temporal white matter"]["centre_mm"], atol=3)
    age = np.asarray(nib.load(dataset / TRUTH / f"space-{SPACE}_desc-age_mask.nii.gz").dataobj)

    def in_age_mask_near(point_mm, radius_mm):
        ijk = np.rint(np.linalg.solve(template.affine[:3, :3], np.subtract(point_mm, template.affine[:3, 3])))
        box = tuple(slice(int(i - radius_mm), int(i + radius_mm + 1)) for i in ijk)
        return age[box].sum()

    assert in_age_mask_near(regions["left superior parietal / precuneus"]["centre_mm"], 20) > 1000
    assert in_age_mask_near([20, -10, 18], 8) > 100  # the right lateral ventricle's wall
    assert in_age_mask_near([-38, -25, 0], 5) == 0  # nothing in the left temporal white matter
    vent = regions["lateral ventricles"]
    assert 1.6 < vent["volume_mm3_at_age_80"] / vent["volume_mm3_at_age_20"] < 2.5


def test_focal_lesion_option_puts_a_small_jittered_lesion_in_deep_grey_matter(tmp_path):
    """--lesion-site deep-gm: each patient's lesion, 25-40 % darker at its core, sits at its own
    jittered centre in the right putamen; controls are not darker there."""
    lesion = Lesion.from_options("deep-gm", 5.0, (0.25, 0.40), 3.0)
    dataset = make_demo(tmp_path / "bids", n_subjects=6, seed=SEED, sim_resolution=RESOLUTION, lesion=lesion)
    effects = json.loads((dataset / TRUTH / f"space-{SPACE}_desc-effects.json").read_text())
    group = next(e for e in effects["Effects"] if e["effect"] == "group")
    assert group["name"].startswith("right putamen") and group["centre_jitter_mm"] == 3.0
    assert group["core_intensity_multiplier_range"] == [0.6, 0.75] and group["radius_mm_range"] == [4.0, 6.0]
    template = load_template("GM")
    ijk = np.rint(np.linalg.solve(template.affine[:3, :3], np.array(group["centre_mm"]) - template.affine[:3, 3]))
    assert np.asarray(template.dataobj)[tuple(ijk.astype(int))] > 0.5  # grey matter at the nominal centre
    centres = {}
    for rec in images(dataset):
        simulation = rec["pose"]["simulation"]
        if simulation["group"] == "control":
            assert simulation["lesion_centre_mm"] is None
            continue
        centre = np.array(simulation["lesion_centre_mm"])
        assert np.all(np.abs(centre - group["centre_mm"]) <= 3.0) and 0.6 <= simulation["lesion_core_multiplier"] <= 0.75
        assert centres.setdefault(rec["participant_id"], tuple(centre)) == tuple(centre)  # sessions share it
        img = nib.load(rec["path"])
        data = np.asarray(img.dataobj, dtype=np.float32)
        to_voxel = np.linalg.inv(img.affine) @ np.array(rec["pose"]["matrix"])

        def at(point):
            return data[tuple(np.rint(to_voxel[:3, :3] @ point + to_voxel[:3, 3]).astype(int))]

        mirror = centre * [-1, 1, 1]  # the left putamen: the same tissue, no lesion
        assert at(centre) < 0.9 * at(mirror), rec["stem"]
    assert len(set(centres.values())) == len(centres) >= 2  # every patient's own centre
    with pytest.raises(InputError, match="--lesion-contrast"):
        Lesion.from_options("deep-gm", 5.0, (0.5, 0.2))
