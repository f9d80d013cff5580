"""A random scanner: the rigid pose and grid of each image, resampling onto it, bias field, Rician noise,
intensity scale; the NIfTI files."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pipeline.common import atomic
from pipeline.intake.template import BRAIN_CENTRE_MM

ORIENTATIONS = {"RAS": (1.0, 1.0, 1.0), "LAS": (-1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}
FOV_MM = (180.0, 216.0, 180.0)  # scanner field of view, centred on the posed brain centre


# ----------------------------------------------------------------------------- pose and grid

def rotation_matrix(rotation_deg) -> np.ndarray:
    """(3, 3) rotation Rz @ Ry @ Rx for angles (about x, y, z) in degrees, RAS+ axes."""
    ax, ay, az = np.radians(np.asarray(rotation_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def rigid_pose(rotation_deg, translation_mm, centre_mm=BRAIN_CENTRE_MM) -> np.ndarray:
    """(4, 4) A with x_s = A @ [x_t, 1]: rotate about ``centre_mm``, then translate (mm, RAS+)."""
    rot = rotation_matrix(rotation_deg)
    centre = np.asarray(centre_mm, dtype=float)
    pose = np.eye(4)
    pose[:3, :3] = rot
    pose[:3, 3] = centre - rot @ centre + np.asarray(translation_mm, dtype=float)
    return pose


def scanner_grid(pose: np.ndarray, voxel_mm: float, orientation: str, fov_mm=FOV_MM,
                 centre_mm=BRAIN_CENTRE_MM) -> tuple[np.ndarray, tuple]:
    """(affine, shape) of the scanner image: a ``fov_mm`` box around the posed ``centre_mm``
    (template space; by default the brain's centre).

    Voxel axes follow ``orientation`` (RAS, LAS or LPS: the direction each axis increases to).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"Unknown orientation {orientation!r}; choose one of {sorted(ORIENTATIONS)}")
    shape = tuple(int(np.ceil(f / voxel_mm)) for f in fov_mm)
    centre = pose[:3, :3] @ np.asarray(centre_mm) + pose[:3, 3]
    affine = np.diag([*(np.array(ORIENTATIONS[orientation]) * voxel_mm), 1.0])
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine, shape


def resample_to_scanner(volume: np.ndarray, volume_affine: np.ndarray, pose: np.ndarray,
                        affine: np.ndarray, shape) -> np.ndarray:
    """Trilinear sample of a template-space ``volume`` at template point A^-1 x_s of every scanner voxel.

    One combined affine resampling: scanner voxel → scanner world → template world → volume voxel.
    """
    m = np.linalg.inv(volume_affine) @ np.linalg.inv(pose) @ affine
    return ndi.affine_transform(volume, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=1,
                                mode="constant", cval=0.0, prefilter=False).astype(np.float32)


# ----------------------------------------------------------------------------- scanner

def draw_scan(rng: np.random.Generator, voxel_range_mm=(1.5, 2.5)) -> dict:
    """Random scanner nuisance of one image: pose, voxel size (uniform in ``voxel_range_mm``),
    orientation, bias, noise, scale. Any range draws the same random numbers."""
    return {
        "rotation_deg": [round(float(v), 3) for v in rng.uniform(-10, 10, 3)],
        "translation_mm": [round(float(v), 3) for v in rng.uniform(-10, 10, 3)],
        "voxel_mm": round(float(rng.uniform(*voxel_range_mm)), 3),
        "orientation": str(rng.choice(list(ORIENTATIONS))),
        "bias_coefficients": [round(float(v), 4) for v in rng.uniform(-1, 1, 9)],
        "bias_amplitude": round(float(rng.uniform(0.1, 0.2)), 4),
        "noise_fraction_of_wm": round(float(rng.uniform(0.02, 0.04)), 4),
        "intensity_scale": round(float(rng.uniform(0.7, 1.4) * 1000), 2),
        "noise_seed": int(rng.integers(2**32)),
    }


def bias_field(shape, coefficients, amplitude: float) -> np.ndarray:
    """Smooth multiplicative field exp(p) over a scanner grid; p is a quadratic polynomial of the
    voxel coordinates scaled to [-1, 1], normalised so that max |p| = ``amplitude``."""
    u, v, w = (np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if d == i else 1 for i in range(3)])
               for d, n in enumerate(shape))
    terms = (u, v, w, u * u - 1 / 3, v * v - 1 / 3, w * w - 1 / 3, u * v, u * w, v * w)
    poly = np.zeros(shape, dtype=np.float32)
    for c, term in zip(coefficients, terms):
        poly += np.float32(c) * term
    peak = float(np.abs(poly).max())
    return np.exp(poly * np.float32(amplitude / peak if peak > 0 else 0.0))


def scan_grid(scan: dict) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(pose A, affine, shape) of ``scan``: its field of view is ``scan["fov_mm"]`` around
    ``scan["fov_centre_mm"]`` where given (the whole-head phantom), else ``FOV_MM`` around the brain."""
    pose = rigid_pose(scan["rotation_deg"], scan["translation_mm"])
    affine, shape = scanner_grid(pose, scan["voxel_mm"], scan["orientation"], scan.get("fov_mm", FOV_MM),
                                 scan.get("fov_centre_mm", BRAIN_CENTRE_MM))
    return pose, affine, shape


def render_scan(volume: np.ndarray, volume_affine: np.ndarray, scan: dict, wm_level: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 data, affine, pose A) of the scanner image of template-space ``volume`` under ``scan``.

    ``wm_level`` is the template white-matter intensity (noise sd = fraction * scale * wm_level).
    """
    pose, affine, shape = scan_grid(scan)
    image = resample_to_scanner(volume, volume_affine, pose, affine, shape)
    image *= bias_field(shape, scan["bias_coefficients"], scan["bias_amplitude"])
    image *= np.float32(scan["intensity_scale"])
    noise_rng = np.random.default_rng(scan["noise_seed"])
    sd = np.float32(scan["noise_fraction_of_wm"] * scan["intensity_scale"] * wm_level)
    real = image + sd * noise_rng.standard_normal(shape, dtype=np.float32)
    imag = sd * noise_rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)  # Rician, like a magnitude MR image
    return np.clip(np.rint(magnitude), 0, np.iinfo(np.int16).max).astype(np.int16), affine, pose


def render_labels(labels: np.ndarray, volume_affine: np.ndarray, scan: dict) -> np.ndarray:
    """The simulation-grid ``labels`` on the scanner grid of ``scan`` (``render_scan``'s pose and
    grid), nearest neighbour: the segmentation of that image, voxel for voxel."""
    pose, affine, shape = scan_grid(scan)
    m = np.linalg.inv(volume_affine) @ np.linalg.inv(pose) @ affine
    return ndi.affine_transform(labels, m[:3, :3], m[:3, 3], output_shape=tuple(shape), order=0,
                                mode="constant", cval=0, prefilter=False).astype(np.uint8)


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write a NIfTI-1 with qform and sform both set to ``affine`` (code 1, scanner), units mm."""
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header.set_data_dtype(data.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.nib_save(img, str(path))
