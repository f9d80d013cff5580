"""The template on the simulation grid and the known effects added to it: ventricle enlargement and
cortical grey-matter loss with age, the patients' lesion; tissue labels and the effects' ground-truth masks."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pipeline.common.errors import InputError
from pipeline.demo.lesion import Lesion, Sphere
from pipeline.intake.template import load_template, resample_to_grid

AGE_RANGE = (20.0, 80.0)
VENTRICLE_BOX_MM = ((-30.0, 30.0), (-45.0, 25.0), (0.0, 35.0))
VENTRICLE_SIGMA_MM = 5.0  # smoothing of the ventricle mask whose gradient drives the warp
VENTRICLE_GAIN_MM2 = 70.0  # displacement (mm) = gain * age_fraction * |grad smoothed mask| (1/mm)
GM_LOSS_AT_80 = 0.35  # fraction of grey-matter intensity lost in the cortical sphere at 80 years
TISSUES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}  # labels of the tissue segmentation
TISSUE_INSIDE = 0.5  # a voxel is labelled (CSF, GM or WM, the most probable) where its brain fraction ≥ this
MASK_THRESHOLD = 0.05  # a voxel belongs to an effect mask where |change| > this * mean brain intensity

CORTEX = Sphere("left superior parietal / precuneus", (-20.0, -65.0, 50.0), 20.0, 3.0)


@dataclass(frozen=True, eq=False)
class Anatomy:
    """The template on the isotropic simulation grid, with what the effects need precomputed.

    All arrays have the grid's shape (X, Y, Z) in RAS+ voxel order, float32, except where noted.
    """

    affine: np.ndarray  # (4, 4) grid affine, diag(res) with the template's origin
    t1: np.ndarray  # template T1w intensity in [0, 1], 0 outside the brain
    gm: np.ndarray  # grey-matter probability
    wm: np.ndarray  # white-matter probability
    ventricles: np.ndarray  # lateral-ventricle fraction per voxel in [0, 1]
    crop: tuple[slice, slice, slice]  # the box around the ventricles where the warp acts
    push: np.ndarray  # (3, *crop shape) backward-warp displacement in voxels at age 80
    cortex_weight: np.ndarray  # GM probability * smooth cortical sphere, in [0, 1]
    coordinates: list[np.ndarray]  # open-grid world coordinates x, y, z (mm), broadcastable to the grid

    @property
    def resolution(self) -> float:
        return float(self.affine[0, 0])


# ----------------------------------------------------------------------------- geometry

def sim_grid(resolution: float, template_shape, template_affine: np.ndarray) -> tuple[np.ndarray, tuple]:
    """(affine, shape) of an isotropic ``resolution`` mm RAS+ grid spanning the template's extent."""
    if not 0.5 <= resolution <= 6:
        raise InputError(f"--sim-resolution must be between 0.5 and 6 mm, got {resolution}.")
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = template_affine[:3, 3]
    spacing = np.abs(np.diag(template_affine)[:3])
    shape = tuple(int(np.floor((n - 1) * s / resolution + 1e-6)) + 1 for n, s in zip(template_shape, spacing))
    return affine, shape


def world_coordinates(affine: np.ndarray, shape) -> list[np.ndarray]:
    """Open-grid world coordinates (x, y, z), broadcastable to ``shape``, of an axis-aligned grid."""
    axes = np.ogrid[tuple(slice(0, n) for n in shape)]
    return [(affine[d, d] * axes[d] + affine[d, 3]).astype(np.float32) for d in range(3)]


def sphere_weight(distance_mm: np.ndarray, radius_mm: float, edge_mm: float) -> np.ndarray:
    """Smooth indicator of a ball: 1 inside, 0.5 at ``radius_mm``, 0 outside (tanh edge of ``edge_mm``)."""
    return (0.5 * (1.0 - np.tanh((distance_mm - radius_mm) / edge_mm))).astype(np.float32)


def to_template_grid(volume: np.ndarray, resolution: float, template_shape) -> np.ndarray:
    """Trilinear resample of a simulation-grid ``volume`` onto the 1 mm template grid (same origin)."""
    return ndi.affine_transform(volume.astype(np.float32), np.diag(np.full(3, 1.0 / resolution)), 0.0,
                                output_shape=tuple(template_shape), order=1, mode="nearest", prefilter=False)


# ----------------------------------------------------------------------------- anatomy

def ventricle_mask_1mm(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Boolean lateral-ventricle mask on the 1 mm template grid (same shape as the inputs).

    CSF-like (1 - GM - WM > 0.5) and dark (T1 < 0.4) voxels in ``VENTRICLE_BOX_MM``; the largest
    connected components (each at least a quarter of the biggest: the two lateral ventricles).
    """
    lo = np.floor(np.linalg.solve(affine[:3, :3], [b[0] for b in VENTRICLE_BOX_MM] - affine[:3, 3])).astype(int)
    hi = np.ceil(np.linalg.solve(affine[:3, :3], [b[1] for b in VENTRICLE_BOX_MM] - affine[:3, 3])).astype(int)
    box = tuple(slice(max(a, 0), min(b + 1, n)) for a, b, n in zip(lo, hi, t1.shape))
    candidate = (1.0 - gm[box] - wm[box] > 0.5) & (t1[box] < 0.4)
    labels, n = ndi.label(candidate)
    if n == 0:
        raise RuntimeError("No CSF-like voxel in the ventricle box of the template; the template looks wrong.")
    sizes = ndi.sum(candidate, labels, np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.25 * sizes.max()) + 1
    mask = np.zeros(t1.shape, dtype=bool)
    mask[box] = np.isin(labels, keep)
    volume_ml = mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
    if not 3 < volume_ml < 60:
        raise RuntimeError(f"Lateral-ventricle mask of the template has {volume_ml:.1f} ml; expected 3-60 ml.")
    return mask


def load_anatomy(resolution: float = 1.5) -> Anatomy:
    """The template on the ``resolution`` mm simulation grid with the effects' fields precomputed."""
    images = {kind: load_template(kind) for kind in ("T1w", "GM", "WM")}
    t_affine, t_shape = images["T1w"].affine, images["T1w"].shape
    affine, shape = sim_grid(resolution, t_shape, t_affine)
    t1, gm, wm = (resample_to_grid(images[k], affine, shape) for k in ("T1w", "GM", "WM"))
    fine = [np.asarray(images[k].dataobj, dtype=np.float32) for k in ("T1w", "GM", "WM")]
    vent_1mm = ventricle_mask_1mm(*fine, t_affine).astype(np.float32)
    ventricles = resample_to_grid(nib.Nifti1Image(vent_1mm, t_affine), affine, shape)

    # Box around the ventricles where the displacement is not negligible.
    margin = int(np.ceil((4 * VENTRICLE_SIGMA_MM + 8) / resolution))
    nonzero = np.argwhere(ventricles > 0)
    crop = tuple(slice(max(a - margin, 0), min(b + margin + 1, n))
                 for a, b, n in zip(nonzero.min(0), nonzero.max(0), shape))
    smooth = ndi.gaussian_filter(ventricles[crop], VENTRICLE_SIGMA_MM / resolution, mode="constant")
    push = np.stack(np.gradient(smooth, resolution)) * (VENTRICLE_GAIN_MM2 / resolution)

    x, y, z = world_coordinates(affine, shape)
    cortex_distance = np.sqrt((x - CORTEX.centre_mm[0]) ** 2 + (y - CORTEX.centre_mm[1]) ** 2
                              + (z - CORTEX.centre_mm[2]) ** 2)
    cortex_weight = gm * sphere_weight(cortex_distance, CORTEX.radius_mm, CORTEX.edge_mm)
    return Anatomy(affine=affine, t1=t1, gm=gm, wm=wm, ventricles=ventricles, crop=crop,
                   push=push.astype(np.float32), cortex_weight=cortex_weight.astype(np.float32),
                   coordinates=[x, y, z])


def age_fraction(age: float) -> float:
    """(age - 20) / 60: 0 at 20 years, 1 at 80 years."""
    return (float(age) - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])


def warp_ventricles(anatomy: Anatomy, volume: np.ndarray, age: float, order: int = 1) -> np.ndarray:
    """``volume`` (simulation grid) with the ventricles enlarged for ``age`` (backward warp, a copy)."""
    out = volume.copy()
    fraction = age_fraction(age)
    if fraction == 0:
        return out
    crop = anatomy.crop
    grid = np.indices(anatomy.push.shape[1:], dtype=np.float32)
    starts = np.array([s.start for s in crop], dtype=np.float32).reshape(3, 1, 1, 1)
    coords = grid + starts + fraction * anatomy.push
    out[crop] = ndi.map_coordinates(volume, coords, order=order, mode="nearest", prefilter=False)
    return out


def simulate_anatomy(anatomy: Anatomy, age: float, lesion: dict | None = None, edge_mm: float = 1.5) -> np.ndarray:
    """Noise-free T1w intensity in template space (simulation grid, [0, 1]) of one subject.

    ``lesion`` ({radius_mm, multiplier, centre_mm}, ``Lesion.draw``) for patients, None for controls;
    ``edge_mm``: the width of the lesion's smooth edge.
    """
    image = anatomy.t1 * (1.0 - GM_LOSS_AT_80 * age_fraction(age) * anatomy.cortex_weight)
    if lesion is not None:
        distance = np.sqrt(sum((c - m) ** 2 for c, m in zip(anatomy.coordinates, lesion["centre_mm"])))
        weight = sphere_weight(distance.astype(np.float32), lesion["radius_mm"], edge_mm)
        image *= 1.0 - (1.0 - lesion["multiplier"]) * weight
    return warp_ventricles(anatomy, image.astype(np.float32), age)


def tissue_labels(anatomy: Anatomy, age: float) -> np.ndarray:
    """uint8 tissue segmentation (``TISSUES``) of one subject on the simulation grid.

    The template's GM and WM probabilities and its brain (T1w > 0) are warped for ``age`` like
    the image (``warp_ventricles``); CSF = brain − GM − WM. A voxel whose brain fraction is at least
    ``TISSUE_INSIDE`` gets the most probable of CSF, GM and WM, every other voxel 0.
    """
    inside = warp_ventricles(anatomy, (anatomy.t1 > 0).astype(np.float32), age)
    gm, wm = (warp_ventricles(anatomy, p, age) for p in (anatomy.gm, anatomy.wm))
    csf = np.clip(inside - gm - wm, 0.0, None)
    labels = np.argmax(np.stack([csf, gm, wm]), axis=0).astype(np.uint8) + 1
    return np.where(inside >= TISSUE_INSIDE, labels, 0).astype(np.uint8)


def ventricle_volume_mm3(anatomy: Anatomy, age: float) -> float:
    """Volume (mm^3) of the lateral ventricles at ``age`` (the template's mask, warped)."""
    warped = warp_ventricles(anatomy, anatomy.ventricles, age)
    return float(warped.sum() * anatomy.resolution ** 3)


def mean_brain_intensity(anatomy: Anatomy) -> float:
    """Mean template T1w intensity where GM + WM > 0.5."""
    return float(anatomy.t1[anatomy.gm + anatomy.wm > 0.5].mean())


def effect_masks(anatomy: Anatomy, template_shape, lesion: Lesion = Lesion()) -> dict[str, np.ndarray]:
    """uint8 masks on the 1 mm template grid of where the age and group effects change the image.

    Age: noise-free 80- vs 20-year-old control; group: ``lesion.largest()`` vs none.
    A voxel is in a mask where |change| > ``MASK_THRESHOLD`` * mean brain intensity.
    """
    threshold = MASK_THRESHOLD * mean_brain_intensity(anatomy)
    young = simulate_anatomy(anatomy, AGE_RANGE[0])
    changes = {
        "age": np.abs(simulate_anatomy(anatomy, AGE_RANGE[1]) - young),
        "group": np.abs(simulate_anatomy(anatomy, AGE_RANGE[0], lesion.largest(), lesion.site.edge_mm) - young),
    }
    masks = {}
    for name, change in changes.items():
        mask = to_template_grid(change, anatomy.resolution, template_shape) > threshold
        if not mask.any():
            raise RuntimeError(f"The {name} effect changes no voxel; the simulation settings are broken.")
        masks[name] = mask.astype(np.uint8)
    return masks
