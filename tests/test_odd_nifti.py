"""Odd but valid NIfTI files (issue 27 item 4): a trailing singleton axis (X×Y×Z×1, as some
converters write), scl_slope/scl_inter, qform only, sform only are accepted and preprocess like a
plain file; a true 4D image and zero or negative voxel sizes (pixdim) are refused at ingest,
naming the file. Real files written here; the preprocessing check runs at 4 mm without N4."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import ingested
from pipeline.common.errors import InputError
from pipeline.demo.cohort import make_demo
from pipeline.demo.head import WholeHead
from pipeline.intake import geometry, grid, preprocess

RES, SHAPE = 4.0, (40, 48, 40)
AFFINE = np.array([[0.0, 0.0, 2.0, -60.0], [-2.0, 0.0, 0.0, 70.0], [0.0, 2.0, 0.0, -50.0], [0, 0, 0, 1]])  # PIR-ish


def odd(path: Path, data: np.ndarray, affine=AFFINE, *, form: str = "both", singleton: bool = False,
        slope: float | None = None, inter: float = 0.0, pixdim: float | None = None) -> Path:
    """Write ``data`` to ``path`` with the header oddity asked for: ``form`` qform/sform/both,
    a trailing singleton axis, int16 storage scaled by ``slope``/``inter``, or ``pixdim[1]``
    overwritten in the file's bytes (nibabel would repair it on save)."""
    if slope is not None:
        stored = np.rint((data - inter) / slope).astype(np.int16)
        img = nib.Nifti1Image(stored[..., None] if singleton else stored, affine)
        img.header.set_slope_inter(slope, inter)
    else:
        img = nib.Nifti1Image((data[..., None] if singleton else data).astype(np.float32), affine)
    if form == "qform":
        img.set_sform(None, code=0)
        img.set_qform(affine, code=1)
    elif form == "sform":
        img.set_qform(None, code=0)
        img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    if pixdim is None:
        img.to_filename(path)
        return path
    assert path.suffix == ".nii"
    img.to_filename(path)
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", pixdim)  # pixdim[1]: the header's byte 76 + 4
    path.write_bytes(bytes(raw))
    return path


def test_ingest_accepts_odd_headers_and_refuses_4d_and_bad_voxel_sizes(tmp_path):
    root = tmp_path / "bids"
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (10, 12, 10)).astype(np.float32)
    files = {
        "sub-01": odd(root / "sub-01/anat/sub-01_T1w.nii.gz", data, singleton=True),
        "sub-02": odd(root / "sub-02/anat/sub-02_T1w.nii.gz", data, form="qform", slope=0.5, inter=20.0),
        "sub-03": odd(root / "sub-03/anat/sub-03_T1w.nii.gz", data, form="sform"),
        "sub-04": root / "sub-04/anat/sub-04_T1w.nii.gz",
        "sub-05": odd(root / "sub-05/anat/sub-05_T1w.nii", data, pixdim=0.0),
        "sub-06": odd(root / "sub-06/anat/sub-06_T1w.nii", data, form="qform", pixdim=-2.0),
    }
    files["sub-04"].parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(rng.normal(100, 10, (10, 12, 10, 3)).astype(np.float32), AFFINE), files["sub-04"])
    (root / "dataset_description.json").write_text(json.dumps({"Name": "odd", "BIDSVersion": "1.9.0"}))
    (root / "participants.tsv").write_text("participant_id\tage\n" + "".join(f"{p}\t{30 + i}\n" for i, p in enumerate(files)))
    result = ingested(root, "age", "regression")
    assert list(result.manifest["participant_id"]) == ["sub-01", "sub-02", "sub-03"]
    reasons = {row.participant_id: (row.path, row.reason) for row in result.report.itertuples()}
    assert set(reasons) == {"sub-04", "sub-05", "sub-06"}
    assert reasons["sub-04"][0] == str(files["sub-04"]) and "4D image (shape (10, 12, 10, 3))" in reasons["sub-04"][1]
    for pid, shown in (("sub-05", "(0.0, 2.0, 2.0)"), ("sub-06", "(-2.0, 2.0, 2.0)")):
        assert reasons[pid][0] == str(files[pid]) and f"voxel sizes pixdim[1:4] = {shown}" in reasons[pid][1], reasons[pid]
    with pytest.raises(InputError, match=r"sub-04_T1w\.nii\.gz \(sub-04\): 4D image \(shape \(10, 12, 10, 3\)\)"):
        ingested(root, "age", "regression", on_error="stop")
    # Each reader gets one 3D volume, scaled as the header says, placed by its qform or sform.
    for pid in ("sub-01", "sub-02", "sub-03"):
        img = geometry.load_3d(files[pid])
        assert img.shape == data.shape and np.allclose(img.affine, AFFINE)
        assert np.allclose(np.asarray(img.dataobj, dtype=np.float32), data, atol=0.26), pid
    with pytest.raises(InputError, match=r"sub-04_T1w\.nii\.gz: expected one 3D volume, got shape \(10, 12, 10, 3\)"):
        preprocess.load_native(files["sub-04"])


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A whole-head phantom (demo), and a grid at 4 mm."""
    d = tmp_path_factory.mktemp("odd")
    cohort = make_demo(d / "heads", n_subjects=2, seed=6, sim_resolution=2.0, head=WholeHead(voxel_mm=(1.5, 2.0)))
    grid.write_grid(RES, SHAPE, d / "tpl.nii.gz", d / "mask.nii.gz")
    return next((cohort / "sub-001" / "anat").glob("*_T1w.nii*")), (d / "tpl.nii.gz", d / "mask.nii.gz")


def test_a_trailing_singleton_axis_preprocesses_with_brain_extraction(head, tmp_path):
    """Before the fix deepbet's 4D mask reached ANTs: ``ValueError: must give a origin value for
    each dimension (4)``. Scaled int16 storage and a qform-only header ride along; the plain
    file scores r 0.95 with the template at this grid."""
    source, study_grid = head
    img = nib.load(source)
    data = img.get_fdata(dtype=np.float32)
    slope = float(data.max()) / 30000
    singleton = odd(tmp_path / "sub-001_T1w.nii.gz", data, img.affine, form="qform", singleton=True, slope=slope,
                    inter=-1.0)
    assert nib.load(singleton).shape == (*data.shape, 1)
    settings = preprocess.PreprocessSettings.of({"resolution": RES, "shape": list(SHAPE), "n4": False,
                                                 "brain_extraction": "deepbet"})
    out = preprocess.derivative_paths(tmp_path, "sub-001", "sub-001")
    sidecar = preprocess.preprocess([singleton], *study_grid, out, settings=settings, threads=2)
    assert sidecar["QC"]["correlation_with_template"] > 0.9, sidecar["QC"]  # the plain image scores 0.95
    assert sidecar["Geometry"]["affine_from"] == "qform"
    assert nib.load(out["brain_mask"]).shape == data.shape  # the native 3D grid
    assert np.load(out["array"]).shape == (1, *SHAPE)
