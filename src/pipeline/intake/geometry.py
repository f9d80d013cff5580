"""Where a native image's voxels lie: one rule for every reader (ingest, registration, brain masks,
maps carried back to native space).

The rule is NIfTI's as nibabel applies it (``img.affine``): the **sform** when its code is > 0,
else the **qform** when its code is > 0, else the voxel sizes alone (nibabel's base affine). Oblique
affines are kept as they are: registration works in world coordinates, so an oblique acquisition
needs no resampling before it. Two cases are decided here because readers disagree on them:

- qform and sform both set and **disagreeing**: the sform is used (ITK/ANTs choose it too), and
  ``placement`` reports how far apart the two put the image's corners, for the sidecar.
- an sform with **shear** (axes not orthogonal, e.g. a gantry-tilted CT): ITK silently falls back
  to the qform while nibabel keeps the sform, so the two would place the image differently. It is
  refused, with a message; resample the image onto an orthogonal grid first.

Native images are handed to ANTs through ``ants_native`` (nibabel's data and affine), never
through ITK's own reader, so every step sees the same geometry; ``to_native`` carries a map on the
study grid back onto an image's native grid (maps, label maps). ANTs is imported inside the
functions that use it, never with this module: the stages that only read geometry (evaluation,
explanation) do not load it. Every reader opens a native image
with ``load_3d``: a trailing singleton axis (X×Y×Z×1, as some converters write) is dropped, a true
4D image refused naming the file; nibabel applies ``scl_slope``/``scl_inter`` to the data.
"""

from __future__ import annotations

from itertools import product
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common.errors import InputError

SHEAR_TOLERANCE = 1e-3  # |cos| of the angle between two axes of the sform counted as orthogonal
DISAGREE_MM = 0.1  # qform and sform placing a corner further apart than this are reported


def load_3d(path: Path | str) -> nib.Nifti1Image:
    """The image at ``path`` as one 3D volume: trailing singleton axes (shape X×Y×Z×1[×1…]) are
    dropped (nibabel's ``squeeze_image``: data, affine and header kept); InputError naming the
    file and its shape for any other shape (a 4D image with several volumes, a 2D image)."""
    img = nib.load(str(path))
    shape = tuple(img.shape)
    if len(shape) > 3 and all(n == 1 for n in shape[3:]):
        img = nib.funcs.squeeze_image(img)
    if len(img.shape) != 3:
        raise InputError(f"{path}: expected one 3D volume, got shape {shape}; save the volume to use on its own "
                         "(e.g. nibabel's index_img), or leave the file out (bids_filters, participants.exclude).")
    return img


def shear(affine: np.ndarray) -> float:
    """The largest |cosine| between two voxel axes of ``affine`` (0 for orthogonal axes, and for a
    singular affine, which is refused for that)."""
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(norms > 0):
        return 0.0
    axes = affine[:3, :3] / norms
    cosines = axes.T @ axes - np.eye(3)
    return float(np.abs(cosines).max())


def corner_distance_mm(a: np.ndarray, b: np.ndarray, shape) -> float:
    """The largest distance (mm) between where ``a`` and ``b`` put the corners of a ``shape`` grid."""
    corners = np.array([[*c, 1.0] for c in product(*[(0, n - 1) for n in shape[:3]])])
    return float(np.linalg.norm((corners @ a.T - corners @ b.T)[:, :3], axis=1).max())


def placement(img: nib.Nifti1Image, path: Path | str) -> dict:
    """How ``img`` is placed by the rule: ``{"affine_from": "sform"|"qform"|"voxel sizes",
    "qform_sform_mm": distance or None}``; InputError (naming ``path``) for a sheared sform."""
    header = img.header
    sform, s_code = header.get_sform(coded=True)
    qform, q_code = header.get_qform(coded=True)
    if s_code:
        cosine = shear(sform)
        if cosine > SHEAR_TOLERANCE:
            raise InputError(f"{path}: its sform is sheared (voxel axes {np.degrees(np.arccos(1 - cosine)):.1f}° "
                             "from orthogonal), which ANTs/ITK and nibabel place differently; resample the image onto "
                             "an orthogonal grid (e.g. nibabel.processing.resample_from_to), or exclude it.")
        apart = corner_distance_mm(sform, qform, img.shape) if q_code else None
        return {"affine_from": "sform", "qform_sform_mm": None if apart is None else round(apart, 3)}
    return {"affine_from": "qform" if q_code else "voxel sizes", "qform_sform_mm": None}


def ants_image(data: np.ndarray, affine: np.ndarray):
    """An in-memory ANTs image (LPS physical space) of a 3D array with a (4, 4) RAS+ mm ``affine``."""
    import ants

    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    to_lps = np.diag([-1.0, -1.0, 1.0])
    return ants.from_numpy(np.asarray(data, dtype=np.float32), origin=list(to_lps @ affine[:3, 3]),
                           spacing=list(zooms), direction=to_lps @ (affine[:3, :3] / zooms))


def ants_native(path: Path, img: nib.Nifti1Image | None = None):
    """A native 3D image (``path``, or ``img`` already loaded from it) as an ANTs image placed by
    the rule (float32), and its ``placement``."""
    img = load_3d(path) if img is None else img
    where = placement(img, path)
    return ants_image(np.asarray(img.dataobj, dtype=np.float32), img.affine), where


def to_native(map_img: nib.Nifti1Image, native_path: Path, inverse: Path, interpolator: str = "linear") -> nib.Nifti1Image:
    """Resample a template-grid map onto the native grid of ``native_path`` (its header only is
    read) with the inverse transform; the result carries the native image's affine."""
    import ants

    native = load_3d(native_path)
    grid = ants_image(np.zeros(native.shape[:3], dtype=np.float32), native.affine)
    moving = ants_image(np.asarray(map_img.dataobj, dtype=np.float32), map_img.affine)
    warped = ants.apply_transforms(grid, moving, [str(inverse)], interpolator=interpolator)
    return nib.Nifti1Image(warped.numpy().astype(np.float32), native.affine)
