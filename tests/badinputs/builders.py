"""Broken inputs for the bad-input corpus, written at test time into a temp folder.

Every image case starts from the same small dataset (``good_dataset``: sub-01..sub-04, tiny
images, numeric ``age``) and breaks ``sub-04``'s image (``BAD``) one way; table cases break
participants.tsv; fatal cases break the dataset or the config as a whole. Archive cases are
package archives given to ``bids-deepstudy register``.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import write_bids

SHAPE = (12, 14, 12)
PARTICIPANTS = [{"participant_id": f"sub-0{i}", "age": str(20 + 10 * i)} for i in range(1, 5)]
BAD = "sub-04"
GOOD_IDS = ["sub-01", "sub-02", "sub-03"]


def good_dataset(root: Path, participants=PARTICIPANTS, images=None) -> Path:
    """Four participants, one T1w each (12 × 14 × 12 voxels of 2 mm)."""
    images = {p["participant_id"]: [""] for p in PARTICIPANTS} if images is None else images
    return write_bids(root, participants, images, shape=SHAPE)


def bad_image(root: Path) -> Path:
    return root / BAD / "anat" / f"{BAD}_T1w.nii.gz"


def save(path: Path, data: np.ndarray, affine=None, **header) -> None:
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, path)


def noise(shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(4).normal(100, 10, shape).astype(np.float32)


def raw_sform(path: Path, rows) -> None:
    """A NIfTI whose sform (code 1, qform 0) is ``rows`` (three rows of four) as written."""
    img = nib.Nifti1Image(noise(), None)
    img.header["sform_code"], img.header["qform_code"] = 1, 0
    img.header["srow_x"], img.header["srow_y"], img.header["srow_z"] = rows
    img.to_filename(path)


def with_voxel(data: np.ndarray, index, value) -> np.ndarray:
    data = data.copy()
    data[index] = value
    return data


# Image cases: name → (how sub-04's image is broken, text the reason must contain). Every reason
# also says what to do (``ADVICE`` or its own advice, checked by the test).
IMAGE_CASES = {
    "truncated_gz": (lambda p: p.write_bytes(p.read_bytes()[:300]), "truncated or corrupt gzip stream"),
    "zero_byte": (lambda p: p.write_bytes(b""), "zero-byte file"),
    "text_named_nii_gz": (lambda p: p.write_text("participant_id\tage\nsub-04\t60\n"), "not gzip-compressed"),
    "gzip_of_text": (lambda p: p.write_bytes(gzip.compress(b"hello\n" * 200)), "not a NIfTI file"),
    "4d_image": (lambda p: save(p, noise((*SHAPE, 3))), "4D image"),
    "all_zero": (lambda p: save(p, np.zeros(SHAPE, np.float32)), "image is constant (every voxel is 0.0)"),
    "nan_voxels": (lambda p: save(p, with_voxel(noise(), (3, 3, 3), np.nan)), "NaN or infinite"),
    "inf_voxels": (lambda p: save(p, with_voxel(noise(), (5, 5, 5), np.inf)), "NaN or infinite"),
    "singular_affine": (lambda p: raw_sform(p, [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]), "singular affine"),
    "nonfinite_affine": (lambda p: raw_sform(p, [[1, 0, 0, np.nan], [0, 1, 0, 0], [0, 0, 1, 0]]), "non-finite values in the affine"),
    "voxel_size_0mm": (lambda p: raw_sform(p, [[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]]), "zero voxel size"),
    "voxel_size_100mm": (lambda p: save(p, noise(), np.diag([100.0, 2.0, 2.0, 1.0])), "voxel size 100 mm is over image_limits.max_voxel_size"),
    "orientation_code": (lambda p: save(p, noise(), sform_code=9), "invalid orientation code (sform_code 9"),
    "over_voxel_limit": (lambda p: save(p, noise((20, 20, 20))), "over image_limits.max_voxels (3000)"),
    "unreadable_permissions": (lambda p: os.chmod(p, 0), "permission denied"),
}
LIMITS = {"max_voxels": 3000}  # the good images have 2016 voxels, the huge one 8000


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


# Table cases: participants.tsv rows of sub-04 (None: no row), reason text, file named.
TABLE_CASES = {
    "target_na": ({"participant_id": BAD, "age": "n/a"}, "target 'age' is missing (n/a)"),
    "target_empty": ({"participant_id": BAD, "age": ""}, "target 'age' is missing (empty)"),
    "target_not_numeric": ({"participant_id": BAD, "age": "sixty"}, "target 'age' is not a number ('sixty')"),
    "image_without_participants_row": (None, "participant not listed in participants.tsv"),
}


def package_archive(path: Path, extra: list[tuple[str, bytes | None]]) -> Path:
    """A .tar.gz of a package folder ``model`` (with ``spec.json``) plus ``extra`` members: (name,
    content, or None for a folder)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in [("model", None), ("model/spec.json", b"{}"), *extra]:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
            else:
                info.size = len(content)
            tar.addfile(info, None if content is None else io.BytesIO(content))
    return path


# Archive cases: extra members → text the message must contain (besides the archive's path).
ARCHIVE_CASES = {
    "dot_member": ([(".", None)], "holds a member named '.', which names no file or folder"),
    "dot_slash_member": ([("./", None)], "holds a member named '.', which names no file or folder"),
    "empty_name": ([("", b"owned\n")], "holds a member named '', which names no file or folder"),
    "oversized": ([("model/model.onnx", bytes(8 * 2**20))], "unpacks to at least 8.0 MiB (8388610 bytes)"),
}
ARCHIVE_LIMIT = 2**20  # $PIPELINE_MAX_UNPACKED_BYTES for the archive cases: the oversized one unpacks to 8 MiB
