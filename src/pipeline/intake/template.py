"""The MNI ICBM152 2009a symmetric template bundled inside nilearn (no download).

All template-space images are world-aligned RAS+ grids in millimetres; the grid used for a
study is an isotropic ``resolution`` mm grid of a fixed ``shape`` centred on the brain.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common.paths import SPACE  # noqa: F401  (re-exported)

_FILES = {
    "T1w": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

# Centre of the brain's bounding box in template world coordinates (mm, RAS+).
BRAIN_CENTRE_MM = np.array([0.0, -17.0, 6.0])


def template_path(kind: str = "T1w") -> Path:
    """Path of a bundled 1 mm template file: ``kind`` is ``T1w``, ``GM`` or ``WM``."""
    import nilearn

    if kind not in _FILES:
        raise KeyError(f"Unknown template image {kind!r}; choose one of {sorted(_FILES)}")
    path = Path(nilearn.__file__).parent / "datasets" / "data" / _FILES[kind]
    if not path.exists():
        raise FileNotFoundError(f"nilearn's bundled template is missing: {path}. Reinstall nilearn.")
    return path


def load_template(kind: str = "T1w") -> nib.Nifti1Image:
    """The 1 mm template image as float32 in [0, 1] (T1w intensity or tissue probability)."""
    img = nib.load(template_path(kind))
    data = np.asarray(img.dataobj, dtype=np.float32) / 255.0
    return nib.Nifti1Image(data, img.affine)


def grid_affine(resolution: float, shape: tuple[int, int, int]) -> np.ndarray:
    """(4, 4) RAS+ affine of an isotropic ``resolution`` mm grid of ``shape`` centred on the brain."""
    affine = np.diag([resolution, resolution, resolution, 1.0])
    centre_vox = (np.asarray(shape, dtype=float) - 1) / 2
    affine[:3, 3] = BRAIN_CENTRE_MM - resolution * centre_vox
    return affine


def resample_to_grid(img: nib.Nifti1Image, affine: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """Sample ``img`` on the grid (``affine``, ``shape``); outside the image is 0."""
    from scipy.ndimage import map_coordinates

    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ affine[:3, :3].T + affine[:3, 3]
    src = np.linalg.inv(img.affine)
    vox = world @ src[:3, :3].T + src[:3, 3]
    data = np.asarray(img.dataobj, dtype=np.float32)
    out = map_coordinates(data, vox.T, order=order, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(shape).astype(np.float32)


def template_on_grid(resolution: float, shape, kind: str = "T1w") -> nib.Nifti1Image:
    """The template (``kind``) resampled onto the study grid, smoothed to the grid's resolution."""
    from scipy.ndimage import gaussian_filter

    img = load_template(kind)
    data = np.asarray(img.dataobj, dtype=np.float32)
    sigma = max(resolution - 1.0, 0.0) / 2.355  # FWHM of the coarser grid, in 1 mm voxels
    if sigma > 0:
        data = gaussian_filter(data, sigma)
    affine = grid_affine(resolution, tuple(shape))
    return nib.Nifti1Image(resample_to_grid(nib.Nifti1Image(data, img.affine), affine, shape), affine)


def brain_mask_on_grid(resolution: float, shape) -> nib.Nifti1Image:
    """Binary brain mask (GM + WM probability > 0.5, plus the ventricles' CSF) on the study grid."""
    from scipy.ndimage import binary_closing, binary_fill_holes

    gm = template_on_grid(resolution, shape, "GM").get_fdata()
    wm = template_on_grid(resolution, shape, "WM").get_fdata()
    mask = binary_fill_holes(binary_closing(gm + wm > 0.5, iterations=2))
    return nib.Nifti1Image(mask.astype(np.uint8), grid_affine(resolution, tuple(shape)))
