"""Header and data checks of NIfTI files, on small real and deliberately broken files."""

import gzip
import json
import pickle

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_nifti

from pipeline.intake import imagecheck


def broken(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def raw_sform(tmp_path, name, srow_x):
    """A NIfTI whose sform (code 1, qform 0) has ``srow_x`` as its first row."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((3, 3, 3)).astype(np.float32), None)
    img.header["sform_code"], img.header["qform_code"] = 1, 0
    img.header["srow_x"], img.header["srow_y"], img.header["srow_z"] = srow_x, [0, 1, 0, 0], [0, 0, 1, 0]
    img.to_filename(tmp_path / name)
    return str(tmp_path / name)


@pytest.mark.parametrize("name", ["ok.nii", "ok.nii.gz"])
def test_small_real_images_pass_both_checks(tmp_path, name):
    path = str(tiny_nifti(tmp_path / name))
    assert imagecheck.header_problem(path) == "" and imagecheck.data_problem(path) == ""


def test_nifti2_and_single_volume_4d_pass(tmp_path):
    nib.save(nib.Nifti2Image(np.random.default_rng(0).random((3, 3, 3)).astype(np.float32), np.eye(4)), tmp_path / "n2.nii.gz")
    assert imagecheck.header_problem(str(tmp_path / "n2.nii.gz")) == ""
    assert imagecheck.header_problem(str(tiny_nifti(tmp_path / "v.nii.gz", shape=(3, 3, 3, 1)))) == ""


def test_header_extensions_are_not_needed(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(0).random((3, 3, 3)).astype(np.float32), np.eye(4))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 5000))  # as AFNI writes
    nib.save(img, tmp_path / "ext.nii.gz")
    assert imagecheck.header_problem(str(tmp_path / "ext.nii.gz")) == ""


def test_header_problems_name_the_defect(tmp_path):
    good = tiny_nifti(tmp_path / "good.nii", shape=(8, 8, 8)).read_bytes()
    gz = gzip.compress(good)
    cases = {
        broken(tmp_path, "empty.nii.gz", b""): "zero-byte file",
        broken(tmp_path, "text.nii.gz", b"participant_id\tage\n" * 20): "named .gz but not gzip-compressed",
        broken(tmp_path, "text.nii", b"participant_id\tage\n" * 20): "not a NIfTI file",
        broken(tmp_path, "head.nii", good[:200]): "truncated NIfTI header (200 of 348 bytes)",
        broken(tmp_path, "head.nii.gz", gz[:60]): "truncated or corrupt gzip stream",
        broken(tmp_path, "data.nii", good[:-100]): f"the header describes {len(good)} bytes, the file has {len(good) - 100}",
        str(tiny_nifti(tmp_path / "4d.nii.gz", shape=(3, 3, 3, 5))): "4D image (shape (3, 3, 3, 5)); expected one 3D volume",
        str(tiny_nifti(tmp_path / "2d.nii.gz", shape=(3, 3))): "2D image",
        raw_sform(tmp_path, "singular.nii.gz", [0, 0, 0, 0]): "singular affine",
        raw_sform(tmp_path, "nan.nii.gz", [1, 0, 0, np.nan]): "non-finite values in the affine",
        str(tmp_path / "missing.nii.gz"): "file content is missing",
    }
    for path, expected in cases.items():
        assert expected in imagecheck.header_problem(path), path


def test_data_problems_need_the_full_read(tmp_path):
    nan = np.random.default_rng(0).random((3, 3, 3)).astype(np.float32)
    nan[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), tmp_path / "zeros.nii.gz")
    big = tiny_nifti(tmp_path / "big.nii.gz", shape=(30, 30, 30)).read_bytes()
    cut = broken(tmp_path, "cut.nii.gz", big[: len(big) // 2])
    for path, expected in {str(tmp_path / "nan.nii.gz"): "NaN or infinite", str(tmp_path / "zeros.nii.gz"): "constant",
                           cut: "unreadable image data (EOFError"}.items():
        assert imagecheck.header_problem(path) == ""  # the header alone looks fine
        assert expected in imagecheck.data_problem(path)


def test_results_are_cached_per_file_stamp(tmp_path, monkeypatch):
    good, bad = str(tiny_nifti(tmp_path / "a.nii.gz")), broken(tmp_path, "b.nii.gz", b"")
    assert imagecheck.image_problems([good, bad], True, tmp_path / "cache") == {good: "", bad: f"zero-byte file; {imagecheck.REPLACE}"}
    monkeypatch.setattr(imagecheck, "header_problem", lambda *a: pytest.fail("read a cached file"))
    monkeypatch.setattr(imagecheck, "data_problem", lambda *a: pytest.fail("read a cached file"))
    assert imagecheck.image_problems([good, bad], True, tmp_path / "cache")[bad].startswith("zero-byte file")
    monkeypatch.undo()
    tiny_nifti(tmp_path / "b.nii.gz")  # repaired: a new size and mtime
    assert imagecheck.image_problems([good, bad], True, tmp_path / "cache") == {good: "", bad: ""}


class CreatesMarker:
    """Unpickling it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("content", ["pickle", b"{not json", "files not a mapping", "entries of the wrong shape"])
def test_an_unreadable_or_hostile_cache_is_rebuilt_and_never_unpickled(tmp_path, content):
    good, bad = str(tiny_nifti(tmp_path / "a.nii.gz")), broken(tmp_path, "b.nii.gz", b"")
    expected = imagecheck.image_problems([good, bad], True, tmp_path / "cache")
    cache, marker = tmp_path / "cache" / "checks.json", tmp_path / "unpickled"
    if content == "pickle":
        content = pickle.dumps(CreatesMarker(marker))
        (tmp_path / "cache" / "checks.pkl").write_bytes(content)  # where version 2 kept it
    elif isinstance(content, str):  # the right version and limits, files of the wrong shape
        stored = json.loads(cache.read_text())
        stored["files"] = [] if content == "files not a mapping" else {good: "ok", bad: [stored["files"][bad][0], 7, None]}
        content = json.dumps(stored).encode()
    cache.write_bytes(content)
    assert imagecheck.image_problems([good, bad], True, tmp_path / "cache") == expected
    assert not marker.exists()
    pickle.loads(pickle.dumps(CreatesMarker(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the payload would have worked


def test_data_check_runs_only_when_asked(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), tmp_path / "zeros.nii.gz")
    path = str(tmp_path / "zeros.nii.gz")
    assert imagecheck.image_problems([path], False, tmp_path / "cache") == {path: ""}
    assert "constant" in imagecheck.image_problems([path], True, tmp_path / "cache")[path]
    assert imagecheck.image_problems([path], False, tmp_path / "cache") == {path: ""}
