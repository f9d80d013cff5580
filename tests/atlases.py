"""A user atlas written with nibabel (no download): a 3 mm, x-flipped (LAS) label image of the MNI
box split at x = ±8 mm into left (1), midline (2) and right (3), and its labels table, which also
lists a label (9) that is not in the image."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

# 3 mm voxels, x flipped, covering x -93..96, y -130..95, z -80..109 mm: wider than every test grid.
AFFINE = np.array([[-3.0, 0, 0, 96], [0, 3, 0, -130], [0, 0, 3, -80], [0, 0, 0, 1]])
SHAPE = (64, 76, 64)
NAMES = {1: "left hemisphere", 2: "midline", 3: "right hemisphere", 9: "tiny nucleus"}
BOUNDARY_MM = 8.0


def hemisphere_labels(x: np.ndarray) -> np.ndarray:
    """The atlas's label at world x (mm): 1 left of -8, 3 right of 8, else 2."""
    return np.where(x < -BOUNDARY_MM, 1, np.where(x > BOUNDARY_MM, 3, 2))


def write_atlas(folder: Path, labels_text: str | None = None, data: np.ndarray | None = None,
                affine: np.ndarray = AFFINE) -> dict:
    """Write ``atlas.nii.gz`` and ``atlas.tsv`` under ``folder``; return config ``explain.atlas``."""
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        ijk = np.indices(SHAPE).reshape(3, -1)
        x = (affine[:3, :3] @ ijk + affine[:3, 3:4])[0].reshape(SHAPE)
        data = hemisphere_labels(x).astype(np.int16)
    if labels_text is None:
        labels_text = "index\tname\n0\tbackground\n" + "".join(f"{i}\t{n}\n" for i, n in NAMES.items())
    nib.save(nib.Nifti1Image(data, affine), folder / "atlas.nii.gz")
    (folder / "atlas.tsv").write_text(labels_text)
    return {"image": str(folder / "atlas.nii.gz"), "labels": str(folder / "atlas.tsv")}
