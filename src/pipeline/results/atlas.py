"""A coarse anatomical atlas of the study grid, derived from the bundled template (no download).

No labelled volumetric atlas ships inside the installed packages, so regions are built from the
template's grey- and white-matter probability maps and MNI coordinates: tissue (grey matter,
white matter, CSF) × hemisphere × lobe (frontal, parietal, temporal, occipital, deep/subcortical,
cerebellum) by coordinate boxes, and the lateral ventricles (CSF in a box around them). Coarse by
design: it ranks where an attribution lies ("right temporal white matter"), it does not delineate
gyri.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from pipeline.intake.template import template_on_grid

TISSUES = ("grey matter", "white matter", "CSF")
VENTRICLE_BOX_MM = ((-30.0, 30.0), (-45.0, 25.0), (0.0, 35.0))  # (x, y, z) ranges, MNI mm


def lobe(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Lobe name per point (MNI mm, RAS+), by coordinate boxes checked in order."""
    names = np.full(x.shape, "frontal", dtype=object)
    names[(y < -20) & (z > 15)] = "parietal"
    names[(z <= 15) & (np.abs(x) > 25) & (y > -75) & (y < 15)] = "temporal"
    names[y < -75] = "occipital"
    names[(np.abs(x) <= 25) & (y > -40) & (y < 20) & (z > -15) & (z <= 15)] = "deep"
    names[(z < -20) & (y < -40)] = "cerebellum"
    return names


def atlas_on_grid(mask: nib.Nifti1Image) -> tuple[np.ndarray, list[str]]:
    """(labels (X, Y, Z) int, names) on the grid of the brain ``mask``; label 0 is outside the brain,
    label i > 0 is ``names[i - 1]`` (e.g. "left parietal grey matter")."""
    affine, shape = mask.affine, mask.shape
    resolution = float(abs(affine[0, 0]))
    gm = template_on_grid(resolution, shape, "GM").get_fdata()
    wm = template_on_grid(resolution, shape, "WM").get_fdata()
    tissue = np.where(gm >= wm, 0, 1)
    tissue[gm + wm < 0.5] = 2
    ijk = np.indices(shape).reshape(3, -1)
    x, y, z = (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)
    side = np.where(x < 0, "left", "right")
    lobes = lobe(x, y, z)
    brain = np.asarray(mask.dataobj) > 0
    ventricle = (tissue == 2) & np.logical_and.reduce(
        [(c > lo) & (c < hi) for c, (lo, hi) in zip((x, y, z), VENTRICLE_BOX_MM)])
    full = np.array([f"{s} lateral ventricle" if v else f"{s} {l} {TISSUES[t]}"
                     for s, l, t, v in zip(side[brain], lobes[brain], tissue[brain], ventricle[brain])])
    names = sorted(set(full))
    labels = np.zeros(shape, dtype=np.int16)
    labels[brain] = np.searchsorted(names, full) + 1
    return labels, names
