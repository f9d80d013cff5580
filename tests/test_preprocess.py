"""Preprocessing geometry on images with a known pose: template → subject world transform A."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import center_of_mass
from scipy.spatial.transform import Rotation

from pipeline.intake import grid
from pipeline.intake import preprocess
from pipeline.intake.preprocess import PreprocessSettings
from pipeline.intake.geometry import to_native
from pipeline.intake.template import BRAIN_CENTRE_MM, load_template, resample_to_grid

RES, SHAPE = 6.0, (26, 32, 28)
# Brain-only images (tests/test_brain_extraction.py); registration at 3 mm, finer than the 6 mm grid.
SETTINGS = {"transform": "Affine", "brain_extraction": "none", "registration_resolution": 3}
LANDMARKS_MM = [(0, -17, 6), (40, -60, 30), (-30, 20, -10)]  # template world, RAS+


def posed_subject(path, rotation_deg, translation_mm, voxel=3.0, axes=(-1, 1, 1), contrast=None, oblique_deg=(0, 0, 0)):
    """Write the template as a subject scan: world pose A, voxel size ``voxel``, axis flips ``axes``
    (-1, 1, 1 = LAS), voxel axes rotated by ``oblique_deg`` (an oblique acquisition); ``contrast``
    maps template intensities (default: T1w as is). Returns A (4, 4) with x_subject = A @ x_template."""
    rot = Rotation.from_euler("xyz", rotation_deg, degrees=True).as_matrix()
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = BRAIN_CENTRE_MM - rot @ BRAIN_CENTRE_MM + np.asarray(translation_mm)
    shape = (60, 72, 60)
    affine = np.diag([voxel * a for a in axes] + [1.0])
    affine[:3, :3] = Rotation.from_euler("xyz", oblique_deg, degrees=True).as_matrix() @ affine[:3, :3]
    centre = pose[:3, :3] @ BRAIN_CENTRE_MM + pose[:3, 3]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    bias = np.linspace(0.8, 1.2, shape[1])[None, :, None]
    data = resample_to_grid(load_template(), np.linalg.inv(pose) @ affine, shape)
    data = (contrast(data) if contrast else data) * 800 * bias
    nib.save(nib.Nifti1Image(data.astype(np.float32), affine), path)
    return pose


@pytest.fixture(scope="module")
def study_grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    grid.write_grid(RES, SHAPE, d / "tpl.nii.gz", d / "mask.nii.gz")
    return d / "tpl.nii.gz", d / "mask.nii.gz"


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory, study_grid):
    d = tmp_path_factory.mktemp("pre")
    pose = posed_subject(d / "sub-01_T1w.nii", rotation_deg=(8, -6, 5), translation_mm=(7, -5, 9))
    out = preprocess.derivative_paths(d / "out", "sub-01", "sub-01")
    sidecar = preprocess.preprocess([d / "sub-01_T1w.nii"], *study_grid, out, settings=PreprocessSettings.of(SETTINGS))
    return d / "sub-01_T1w.nii", pose, out, sidecar


def test_all_outputs_are_written(preprocessed):
    _, _, out, sidecar = preprocessed
    assert all(p.exists() and p.stat().st_size > 0 for p in out.values())
    assert json.loads(out["sidecar_T1w"].read_text())["Parameters"]["transform"] == "Affine"
    array = np.load(out["array"], mmap_mode="r")
    assert array.shape == (1, *SHAPE) and array.dtype == np.float32


def test_output_is_on_the_template_grid_and_normalised(preprocessed, study_grid):
    _, _, out, sidecar = preprocessed
    img, mask = nib.load(out["image_T1w"]), nib.load(study_grid[1])
    np.testing.assert_allclose(img.affine, mask.affine)
    brain = mask.get_fdata() > 0
    data = img.get_fdata()
    assert abs(data[brain].mean()) < 1e-3 and data[brain].std() == pytest.approx(1, abs=1e-3)
    assert (data[~brain] == 0).all()
    assert sidecar["QC"]["correlation_with_template"] > 0.85  # 0.88-0.92 over seeds; a misregistration < 0.6


def test_forward_transform_recovers_the_known_pose(preprocessed):
    import ants

    _, pose, out, _ = preprocessed
    assert landmark_error_mm(out["forward"], pose) < 3.0  # mm, at 6 mm grid resolution


def landmark_error_mm(forward, pose) -> float:
    """The largest distance (mm) between where the ``forward`` transform (ANTs, LPS) and the known
    ``pose`` put the template landmarks."""
    import ants

    transform = ants.read_transform(str(forward))
    lps = np.array([-1, -1, 1])
    errors = [np.linalg.norm(np.array(transform.apply_to_point(list(np.array(p) * lps))) * lps - (pose @ [*p, 1])[:3])
              for p in LANDMARKS_MM]
    return float(max(errors))


def test_registration_at_a_working_resolution_beats_the_coarse_grid(preprocessed, study_grid, tmp_path):
    """The same scan registered on the 6 mm grid itself (``registration_resolution: null``) and at 3 mm."""
    source, pose, out, sidecar = preprocessed
    assert sidecar["Parameters"]["registration_resolution"] == 3
    on_grid = preprocess.derivative_paths(tmp_path / "grid", "sub-01", "sub-01")
    coarse = preprocess.preprocess([source], *study_grid, on_grid,
                                   settings=PreprocessSettings.of({**SETTINGS, "registration_resolution": None}))
    fine_error, coarse_error = landmark_error_mm(out["forward"], pose), landmark_error_mm(on_grid["forward"], pose)
    print(f"landmark error {fine_error:.2f} mm at 3 mm, {coarse_error:.2f} mm on the 6 mm grid")
    assert fine_error < 1.5 and fine_error < coarse_error, (fine_error, coarse_error)
    assert sidecar["QC"]["correlation_with_template"] >= coarse["QC"]["correlation_with_template"]


def test_oblique_and_disagreeing_headers_follow_one_rule(tmp_path, study_grid):
    """An oblique acquisition registers as well as a straight one; where qform and sform disagree
    (here by 10 mm) the sform places the image, and the sidecar says so."""
    source = tmp_path / "sub-02_T1w.nii.gz"
    pose = posed_subject(source, rotation_deg=(8, -6, 5), translation_mm=(7, -5, 9), oblique_deg=(20, 0, -15))
    img = nib.load(source)
    shifted = img.affine.copy()
    shifted[:3, 3] += [10.0, 0.0, 0.0]
    img.set_qform(shifted, code=1)  # the sform (code 1 too) keeps the true placement
    nib.save(img, source)
    out = preprocess.derivative_paths(tmp_path / "out", "sub-02", "sub-02")
    sidecar = preprocess.preprocess([source], *study_grid, out, settings=PreprocessSettings.of(SETTINGS))
    assert sidecar["Geometry"] == {"affine_from": "sform", "qform_sform_mm": pytest.approx(10.0, abs=0.01)}
    assert landmark_error_mm(out["forward"], pose) < 1.5


def test_a_sheared_sform_is_refused_naming_the_file(tmp_path, study_grid):
    from pipeline.intake.imagecheck import header_problem

    source = tmp_path / "sub-03_T1w.nii.gz"
    posed_subject(source, rotation_deg=(0, 0, 0), translation_mm=(0, 0, 0))
    img = nib.load(source)
    sheared = img.affine.copy()
    sheared[0, 1] = 0.5  # gantry tilt: the y axis leans into x
    img.set_sform(sheared, code=1)
    nib.save(img, source)
    assert "sheared sform" in header_problem(str(source))
    out = preprocess.derivative_paths(tmp_path / "out", "sub-03", "sub-03")
    with pytest.raises(preprocess.InputError, match=r"sub-03_T1w\.nii\.gz: its sform is sheared"):
        preprocess.preprocess([source], *study_grid, out, settings=PreprocessSettings.of(SETTINGS))


def test_native_map_lands_where_the_pose_puts_it(preprocessed, study_grid):
    """A blob in template space, mapped to native space, sits at A @ blob centre in scanner world."""
    source, pose, out, _ = preprocessed
    mask_img = nib.load(study_grid[1])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    world = ijk @ mask_img.affine[:3, :3].T + mask_img.affine[:3, 3]
    centre = np.array([35.0, -40.0, 20.0])  # right parietal
    blob = np.exp(-np.sum((world - centre) ** 2, -1) / (2 * 8.0**2)).astype(np.float32)
    native = to_native(nib.Nifti1Image(blob, mask_img.affine), source, out["inverse"])
    assert native.shape == nib.load(source).shape
    np.testing.assert_allclose(native.affine, nib.load(source).affine)
    com_vox = np.array(center_of_mass(native.get_fdata()))
    com_world = native.affine[:3, :3] @ com_vox + native.affine[:3, 3]
    assert np.linalg.norm(com_world - (pose @ [*centre, 1])[:3]) < 3.0


def test_unreadable_image_names_the_file(tmp_path, study_grid):
    bad = tmp_path / "sub-09_T1w.nii.gz"
    bad.write_bytes(b"not a nifti")
    out = preprocess.derivative_paths(tmp_path / "out", "sub-09", "sub-09")
    with pytest.raises(preprocess.InputError, match="sub-09_T1w.nii.gz"):
        preprocess.preprocess([bad], *study_grid, out, settings=PreprocessSettings.of(SETTINGS))


def t2_like(t1: np.ndarray) -> np.ndarray:
    """A T2-like contrast of the template: CSF bright, white matter dark, background black."""
    return np.where(t1 > 0.05, 1.1 - t1, 0.0)


def test_second_channel_is_coregistered_through_the_reference(tmp_path, study_grid):
    """T1w and a T2-like image of one subject under different poses: the T2 channel lands on the
    template grid (matches the template's T2-like contrast) and its coregistration transform
    maps T2 scanner points to where the poses put them in the T1w scanner."""
    import ants

    pose_t1 = posed_subject(tmp_path / "t1.nii.gz", (8, -6, 5), (7, -5, 9))
    pose_t2 = posed_subject(tmp_path / "t2.nii.gz", (-5, 4, -7), (-6, 8, -4), voxel=3.5, axes=(1, -1, 1),
                            contrast=t2_like)
    out = preprocess.derivative_paths(tmp_path / "out", "sub-01", "sub-01", ["T1w", "T2w"])
    preprocess.preprocess([tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"], *study_grid, out, ["T1w", "T2w"],
                          PreprocessSettings.of(SETTINGS))
    array = np.load(out["array"])
    assert array.shape == (2, *SHAPE)
    mask = nib.load(study_grid[1]).get_fdata() > 0
    template = nib.load(study_grid[0]).get_fdata()
    assert np.corrcoef(array[0][mask], template[mask])[0, 1] > 0.85
    assert np.corrcoef(array[1][mask], t2_like(template)[mask])[0, 1] > 0.75
    np.testing.assert_array_equal(array[1], nib.load(out["image_T2w"]).get_fdata().astype(np.float32))
    sidecar = json.loads(out["sidecar_T2w"].read_text())
    assert sidecar["Transforms"]["to_reference"] == out["coreg_T2w"].name
    coreg = ants.read_transform(str(out["coreg_T2w"]))  # maps reference (T1w) points to T2w points
    lps = np.array([-1, -1, 1])
    for point in [(0, -17, 6), (40, -60, 30), (-30, 20, -10)]:
        in_t1 = (pose_t1 @ [*point, 1])[:3]
        mapped = np.array(coreg.apply_to_point(list(in_t1 * lps))) * lps
        assert np.linalg.norm(mapped - (pose_t2 @ [*point, 1])[:3]) < 3.0


def test_preprocessing_is_reproducible(preprocessed, study_grid, tmp_path):
    """Same image, same seed, one ITK thread (set in conftest): identical arrays and transforms."""
    source, _, out, _ = preprocessed
    again = preprocess.derivative_paths(tmp_path / "again", "sub-01", "sub-01")
    preprocess.preprocess([source], *study_grid, again, settings=PreprocessSettings.of(SETTINGS))
    np.testing.assert_array_equal(np.load(again["array"]), np.load(out["array"]))
    assert again["forward"].read_bytes() == out["forward"].read_bytes()


def test_a_step_added_to_the_list_runs_and_is_recorded(tmp_path, study_grid, monkeypatch):
    """One ``Step`` in ``steps.STEPS`` is all a step needs: it runs at its place in the chain (here a
    clip of the scaled intensities, between scaling and registration), its words are in the
    recipe and its entry in the sidecar's ``Steps``, at that place; a step its key switches off
    neither runs nor appears. The recipe's words are those of the steps that ran."""
    from pipeline.common import config
    from pipeline.intake import recipe, steps

    source = tmp_path / "sub-05_T1w.nii.gz"
    posed_subject(source, rotation_deg=(4, -3, 2), translation_mm=(3, -2, 4))
    settings = {**SETTINGS, "registration_resolution": None, "antialias": False}
    plain = preprocess.derivative_paths(tmp_path / "plain", "sub-05", "sub-05")
    preprocess.preprocess([source], *study_grid, plain, settings=PreprocessSettings.of(settings))

    seen = []

    def clip(c):
        image = c.images[c.reference]
        seen.append(float(image.max()))
        c.images[c.reference] = image.new_image_like(np.minimum(image.numpy(), 0.5).astype(np.float32))

    def never(c):
        raise AssertionError("a step switched off ran")

    added = [steps.Step("clip", "clip {reference} at 0.5 (seed {seed})", ("clip at 0.5",), run=clip),
             steps.Step("never", "never said", ("never recorded",), key="antialias", run=never)]
    at = [s.name for s in steps.STEPS].index("register")
    monkeypatch.setattr(steps, "STEPS", (*steps.STEPS[:at], *added, *steps.STEPS[at:]))
    out = preprocess.derivative_paths(tmp_path / "out", "sub-05", "sub-05")
    sidecar = preprocess.preprocess([source], *study_grid, out, settings=PreprocessSettings.of(settings))

    assert len(seen) == 1 and seen[0] > 0.5  # it ran once, on the scaled image (99th percentile 1)
    assert not np.array_equal(np.load(out["array"]), np.load(plain["array"]))
    plain_steps = json.loads(plain["sidecar_T1w"].read_text())["Steps"]
    written = json.loads(out["sidecar_T1w"].read_text())["Steps"]
    assert written == sidecar["Steps"]
    registration = plain_steps.index("ants.registration:Affine to template")
    assert written == [*plain_steps[:registration], "clip at 0.5", *plain_steps[registration:]]
    resolved = config.resolved(["preprocess"], settings)
    words = recipe.from_config(resolved, {"T1w": {"suffix": "T1w"}}, {})["steps"]
    assert "clip T1w at 0.5 (seed 1)" in words and "never said" not in words
    assert words == recipe.words(recipe.active(resolved), resolved, ["T1w"])
    assert [s.name for s in recipe.active(resolved)] == ["reorient", "n4", "scale", "coregister", "clip", "register",
                                                       "resample", "normalise", "stack"]
