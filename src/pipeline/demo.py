"""A simulated BIDS brain-age cohort built from the real MNI152 2009a template anatomy.

Every subject is the template brain (``pipeline.template``) with known effects added in
template space, then seen through a random scanner: rigid pose, bias field, Rician noise,
intensity scale, voxel size and orientation. The effects:

* age: the lateral ventricles enlarge (a smooth backward warp; volume about doubles from 20
  to 80 years) and grey matter darkens in one cortical sphere (left superior parietal /
  precuneus, up to 35 % at 80 years);
* group: patients carry a focal hypointense lesion, by default in the right temporal white
  matter (about 2 cm across, 45-65 % darker at its core); ``--lesion-site deep-gm
  --lesion-radius 5 --lesion-contrast 0.25 0.40 --lesion-jitter 3`` makes the hard case instead:
  a 1 cm lesion in the right putamen, 25-40 % darker, its centre jittered ±3 mm per patient.

The raw dataset (``participants.tsv``, ``sub-XXX/[ses-YY/]anat/*_T1w.nii[.gz]``) is what a
study reads. ``derivatives/groundtruth`` holds the answers (effect masks, effect parameters,
each image's pose) for validation and tests only: training must never read it.
``derivatives/tissue`` holds a tissue segmentation of every T1w on its own grid
(``*_desc-tissue_dseg.nii.gz``: 0 background, 1 CSF, 2 GM, 3 WM; ``desc-tissue_dseg.tsv``), the
target of a segmentation study: the subject's template anatomy, ventricles warped for age like
the image, seen through the same pose and grid (nearest neighbour).

Usage: ``python -m pipeline.demo OUT_DIR --n-subjects 100 --seed 0 [--sim-resolution 1.5]``.
The output is a deterministic function of the arguments (byte-identical files). Images are
int16 NIfTI-1 with qform = sform (code 1, scanner).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pipeline import __version__
from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.intake.template import BRAIN_CENTRE_MM, SPACE, load_template, resample_to_grid

BIDS_VERSION = "1.9.0"
GENERATOR = "pipeline.demo"
AGE_RANGE = (20.0, 80.0)
ORIENTATIONS = {"RAS": (1.0, 1.0, 1.0), "LAS": (-1.0, 1.0, 1.0), "LPS": (-1.0, -1.0, 1.0)}
FOV_MM = (180.0, 216.0, 180.0)  # scanner field of view, centred on the posed brain centre
VENTRICLE_BOX_MM = ((-30.0, 30.0), (-45.0, 25.0), (0.0, 35.0))
VENTRICLE_SIGMA_MM = 5.0  # smoothing of the ventricle mask whose gradient drives the warp
VENTRICLE_GAIN_MM2 = 70.0  # displacement (mm) = gain * age_fraction * |grad smoothed mask| (1/mm)
GM_LOSS_AT_80 = 0.35  # fraction of grey-matter intensity lost in the cortical sphere at 80 years
TISSUES = {0: "background", 1: "CSF", 2: "GM", 3: "WM"}  # labels of the tissue segmentation
TISSUE_INSIDE = 0.5  # a voxel is labelled (CSF, GM or WM, the most probable) where its brain fraction ≥ this
MASK_THRESHOLD = 0.05  # a voxel belongs to an effect mask where |change| > this * mean brain intensity


@dataclass(frozen=True)
class Sphere:
    """A named spherical region in template world coordinates (mm, RAS+) with a smooth edge."""

    name: str
    centre_mm: tuple[float, float, float]
    radius_mm: float
    edge_mm: float


CORTEX = Sphere("left superior parietal / precuneus", (-20.0, -65.0, 50.0), 20.0, 3.0)
LESION_SITES = {  # where patients' lesions sit (nominal centre and radius; --lesion-site)
    "temporal-wm": Sphere("right temporal white matter", (38.0, -25.0, 0.0), 10.0, 1.5),
    "deep-gm": Sphere("right putamen (deep grey matter)", (25.0, 2.0, 0.0), 5.0, 1.0),
}


@dataclass(frozen=True)
class Lesion:
    """The patients' lesion: its ``site`` (nominal centre, radius and edge), each patient's radius
    as the nominal one times uniform(``radius_scale``), the intensity ``multiplier`` at its core
    (uniform in the range: 0.6 is 40 % darker) and the centre's ``jitter_mm`` (uniform ±mm per axis)."""

    site: Sphere = LESION_SITES["temporal-wm"]
    radius_scale: tuple[float, float] = (0.8, 1.2)
    multiplier: tuple[float, float] = (0.35, 0.55)
    jitter_mm: float = 0.0

    @classmethod
    def from_options(cls, site: str = "temporal-wm", radius_mm: float | None = None,
                     contrast: tuple[float, float] | None = None, jitter_mm: float = 0.0) -> "Lesion":
        """The lesion of the command-line options; ``contrast`` is the range of the fraction of
        intensity lost at the core (e.g. (0.25, 0.40)); None keeps the default lesion's."""
        if site not in LESION_SITES:
            raise InputError(f"--lesion-site must be one of {sorted(LESION_SITES)}, not {site!r}.")
        sphere = LESION_SITES[site]
        if radius_mm is not None:
            if not 1 <= radius_mm <= 30:
                raise InputError(f"--lesion-radius must be between 1 and 30 mm, got {radius_mm}.")
            sphere = Sphere(sphere.name, sphere.centre_mm, float(radius_mm), sphere.edge_mm)
        multiplier = cls.multiplier
        if contrast is not None:
            low, high = contrast
            if not 0 < low <= high < 1:
                raise InputError(f"--lesion-contrast needs 0 < LOW <= HIGH < 1, got {low} {high}.")
            multiplier = (round(1.0 - high, 6), round(1.0 - low, 6))
        if not 0 <= jitter_mm <= 20:
            raise InputError(f"--lesion-jitter must be between 0 and 20 mm, got {jitter_mm}.")
        return cls(sphere, cls.radius_scale, multiplier, float(jitter_mm))

    def draw(self, rng: np.random.Generator) -> dict:
        """One patient's lesion: radius_mm, multiplier and centre_mm (jittered when jitter_mm > 0)."""
        radius = self.site.radius_mm * rng.uniform(*self.radius_scale)
        multiplier = rng.uniform(*self.multiplier)
        centre = np.asarray(self.site.centre_mm)
        if self.jitter_mm:  # drawn only then: the default cohort's random stream is unchanged
            centre = centre + rng.uniform(-self.jitter_mm, self.jitter_mm, 3)
        return {"radius_mm": float(round(radius, 2)), "multiplier": float(round(multiplier, 3)),
                "centre_mm": [round(float(v), 3) for v in centre]}

    def largest(self) -> dict:
        """The largest and strongest lesion at the nominal centre, its radius grown by the jitter's
        reach: its effect covers every patient's lesion (the ground-truth mask)."""
        reach = self.jitter_mm * np.sqrt(3)
        return {"radius_mm": self.site.radius_mm * self.radius_scale[1] + reach, "multiplier": self.multiplier[0],
                "centre_mm": list(self.site.centre_mm)}


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


def scanner_grid(pose: np.ndarray, voxel_mm: float, orientation: str) -> tuple[np.ndarray, tuple]:
    """(affine, shape) of the scanner image: ``FOV_MM`` box around the posed brain centre.

    Voxel axes follow ``orientation`` (RAS, LAS or LPS: the direction each axis increases to).
    """
    if orientation not in ORIENTATIONS:
        raise ValueError(f"Unknown orientation {orientation!r}; choose one of {sorted(ORIENTATIONS)}")
    shape = tuple(int(np.ceil(f / voxel_mm)) for f in FOV_MM)
    centre = pose[:3, :3] @ BRAIN_CENTRE_MM + pose[:3, 3]
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


# ----------------------------------------------------------------------------- scanner

def draw_scan(rng: np.random.Generator) -> dict:
    """Random scanner nuisance of one image: pose, voxel size, orientation, bias, noise, scale."""
    return {
        "rotation_deg": [round(float(v), 3) for v in rng.uniform(-10, 10, 3)],
        "translation_mm": [round(float(v), 3) for v in rng.uniform(-10, 10, 3)],
        "voxel_mm": round(float(rng.uniform(1.5, 2.5)), 3),
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


def render_scan(volume: np.ndarray, volume_affine: np.ndarray, scan: dict, wm_level: float
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int16 data, affine, pose A) of the scanner image of template-space ``volume`` under ``scan``.

    ``wm_level`` is the template white-matter intensity (noise sd = fraction * scale * wm_level).
    """
    pose = rigid_pose(scan["rotation_deg"], scan["translation_mm"])
    affine, shape = scanner_grid(pose, scan["voxel_mm"], scan["orientation"])
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
    pose = rigid_pose(scan["rotation_deg"], scan["translation_mm"])
    affine, shape = scanner_grid(pose, scan["voxel_mm"], scan["orientation"])
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


def write_json(path: Path, content: dict) -> None:
    """Write ``content`` as indented JSON with a trailing newline."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(content, indent=2) + "\n")


# ----------------------------------------------------------------------------- cohort

def draw_cohort(n_subjects: int, seed: int) -> list[dict]:
    """Per subject: id, age (20-80, 1 decimal), sex, group (balanced), sessions, file extensions."""
    if n_subjects < 2:
        raise InputError(f"--n-subjects must be at least 2 (one patient, one control), got {n_subjects}.")
    if n_subjects > 999:
        raise InputError(f"--n-subjects must be at most 999 (ids are sub-001 .. sub-999), got {n_subjects}.")
    if seed < 0:
        raise InputError(f"--seed must be a non-negative integer, got {seed}.")
    rng = np.random.default_rng(seed)
    ages = np.round(rng.uniform(*AGE_RANGE, n_subjects), 1)
    sexes = rng.choice(["M", "F"], n_subjects)
    groups = rng.permutation(["patient"] * (n_subjects // 2) + ["control"] * (n_subjects - n_subjects // 2))
    n_two = max(int(round(0.1 * n_subjects)), 1 if n_subjects >= 4 else 0)
    two = set(rng.choice(n_subjects, n_two, replace=False).tolist())
    sessions = [["ses-01", "ses-02"] if i in two else [None] for i in range(n_subjects)]
    n_images = sum(len(s) for s in sessions)
    uncompressed = set(rng.choice(n_images, int(round(n_images / 3)), replace=False).tolist())
    cohort, image = [], 0
    for i in range(n_subjects):
        extensions = []
        for _ in sessions[i]:
            extensions.append(".nii" if image in uncompressed else ".nii.gz")
            image += 1
        cohort.append({"participant_id": f"sub-{i + 1:03d}", "age": float(ages[i]), "sex": str(sexes[i]),
                       "group": str(groups[i]), "sessions": sessions[i], "extensions": extensions})
    return cohort


def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``; refuse a non-empty one unless ``overwrite`` and it is an earlier demo."""
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} exists and is not a directory; choose another OUT_DIR.")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise InputError(f"{out_dir} exists and is not empty; choose another OUT_DIR or pass --overwrite.")
        description = out_dir / "dataset_description.json"
        try:
            made_here = json.loads(description.read_text())["GeneratedBy"][0]["Name"] == GENERATOR
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            made_here = False
        if not made_here:
            raise InputError(f"{out_dir} is not empty and was not written by {GENERATOR} (no matching "
                             f"{description.name}); --overwrite only replaces an earlier demo. Remove it by hand.")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def dataset_files(out_dir: Path, cohort: list[dict], seed: int, resolution: float, lesion: Lesion) -> None:
    """Write the raw dataset's top-level files and the ground-truth derivative's description/README."""
    generated_by = [{"Name": GENERATOR, "Version": __version__,
                     "Description": f"Simulated from the {SPACE} template; seed {seed}, "
                                    f"simulation resolution {resolution} mm."}]
    write_json(out_dir / "dataset_description.json", {
        "Name": "Simulated brain-age demo cohort", "BIDSVersion": BIDS_VERSION, "DatasetType": "raw",
        "License": "CC0", "GeneratedBy": generated_by})
    atomic.write_text(out_dir / "README",
        f"Simulated T1w brain-age cohort ({len(cohort)} participants) generated by `python -m {GENERATOR}`.\n"
        f"Each image is the {SPACE} template with an age effect (ventricle enlargement, grey-matter loss in\n"
        f"the {CORTEX.name}) and, for patients, a lesion in the {lesion.site.name}, seen under a random\n"
        "rigid pose, bias field, Rician noise, intensity scale, voxel size and orientation.\n"
        "derivatives/groundtruth holds the true effect masks and poses: for validation only.\n")
    rows = ["participant_id\tage\tsex\tgroup"] + [
        f"{s['participant_id']}\t{s['age']:.1f}\t{s['sex']}\t{s['group']}" for s in cohort]
    atomic.write_text(out_dir / "participants.tsv", "\n".join(rows) + "\n")
    write_json(out_dir / "participants.json", {
        "participant_id": {"Description": "Participant identifier."},
        "age": {"Description": "Age at scan (all sessions of a participant share it).", "Units": "years"},
        "sex": {"Description": "Sex.", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "Diagnostic group.",
                  "Levels": {"patient": f"has a lesion in the {lesion.site.name}", "control": "healthy control"}}})
    truth = out_dir / "derivatives" / "groundtruth"
    write_json(truth / "dataset_description.json", {
        "Name": "Ground truth of the simulated brain-age demo cohort", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated_by})
    atomic.write_text(truth / "README",
        "GROUND TRUTH of the simulation, for validation and tests only. Training must NEVER read these files.\n\n"
        f"space-{SPACE}_desc-age_mask.nii.gz / desc-group_mask.nii.gz: uint8 masks on the 1 mm template\n"
        "  grid of where the age and group effects change the image.\n"
        f"space-{SPACE}_desc-effects.json: the regions, effect sizes and mask volumes.\n"
        f"sub-*/[ses-*/]anat/*_from-{SPACE}_to-T1w_pose.json: 'matrix' is the 4x4 RAS+ mm transform A with\n"
        "  x_scanner = A @ [x_template, 1]; 'simulation' lists the image's other nuisance and anatomy.\n")
    tissue = out_dir / "derivatives" / "tissue"
    write_json(tissue / "dataset_description.json", {
        "Name": "Tissue segmentation of the simulated brain-age demo cohort", "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative", "GeneratedBy": generated_by})
    atomic.write_text(tissue / "README",
        "Tissue segmentation of every T1w on its own grid: sub-*/[ses-*/]anat/*_desc-tissue_dseg.nii.gz (uint8,\n"
        "labels in desc-tissue_dseg.tsv). The template's GM and WM probabilities, with the subject's age warp,\n"
        f"argmax of CSF/GM/WM where the brain fraction is at least {TISSUE_INSIDE}, seen through the image's pose\n"
        "and grid (nearest neighbour). The target of a segmentation study (config/segmentation.yaml).\n")
    rows = ["index\tname"] + [f"{k}\t{v}" for k, v in TISSUES.items()]
    atomic.write_text(tissue / "desc-tissue_dseg.tsv", "\n".join(rows) + "\n")


def effects_description(anatomy: Anatomy, masks: dict[str, np.ndarray], resolution: float, lesion: Lesion) -> dict:
    """Content of the effects JSON: the regions, effect sizes and mask volumes (mm^3)."""
    centroid = ndi.center_of_mass(anatomy.ventricles)
    centroid_mm = anatomy.affine[:3, :3] @ np.array(centroid) + anatomy.affine[:3, 3]
    young, old = ventricle_volume_mm3(anatomy, AGE_RANGE[0]), ventricle_volume_mm3(anatomy, AGE_RANGE[1])
    return {
        "Space": SPACE,
        "SimulationResolutionMM": resolution,
        "AgeRangeYears": list(AGE_RANGE),
        "Effects": [
            {"effect": "age", "name": "lateral ventricles", "kind": "enlargement (smooth backward warp)",
             "centroid_mm": [round(float(v), 2) for v in centroid_mm],
             "volume_mm3_at_age_20": round(young, 1), "volume_mm3_at_age_80": round(old, 1),
             "displacement": f"{VENTRICLE_GAIN_MM2} mm^2 * (age-20)/60 * gradient of the ventricle mask "
                             f"smoothed with sigma {VENTRICLE_SIGMA_MM} mm"},
            {"effect": "age", "name": CORTEX.name, "kind": "grey-matter intensity loss",
             "centre_mm": list(CORTEX.centre_mm), "radius_mm": CORTEX.radius_mm, "edge_mm": CORTEX.edge_mm,
             "intensity_multiplier": f"1 - {GM_LOSS_AT_80} * (age-20)/60 * GM probability"},
            {"effect": "group", "name": lesion.site.name, "kind": "focal hypointense lesion (patients only)",
             "centre_mm": list(lesion.site.centre_mm), "radius_mm": lesion.site.radius_mm,
             "edge_mm": lesion.site.edge_mm,
             "radius_mm_range": [lesion.site.radius_mm * s for s in lesion.radius_scale],
             "core_intensity_multiplier_range": list(lesion.multiplier),
             **({"centre_jitter_mm": lesion.jitter_mm} if lesion.jitter_mm else {})},
        ],
        "Masks": {
            name: {"file": f"space-{SPACE}_desc-{name}_mask.nii.gz",
                   "volume_mm3": int(mask.sum()),
                   "threshold": f"|change| > {MASK_THRESHOLD} * mean brain intensity"}
            for name, mask in masks.items()},
    }


def make_demo(out_dir: Path, n_subjects: int = 100, seed: int = 0, sim_resolution: float = 1.5,
              overwrite: bool = False, lesion: Lesion = Lesion()) -> Path:
    """Write the simulated BIDS cohort (and its ground truth) to ``out_dir``; return ``out_dir``.
    ``lesion``: the patients' lesion (the default is the demo's temporal white-matter one)."""
    out_dir = Path(out_dir)
    cohort = draw_cohort(n_subjects, seed)
    anatomy = load_anatomy(sim_resolution)  # before touching out_dir: fail early
    prepare_out_dir(out_dir, overwrite)
    dataset_files(out_dir, cohort, seed, sim_resolution, lesion)

    template = load_template("T1w")
    masks = effect_masks(anatomy, template.shape, lesion)
    truth = out_dir / "derivatives" / "groundtruth"
    for name, mask in masks.items():
        save_nifti(mask, template.affine, truth / f"space-{SPACE}_desc-{name}_mask.nii.gz")
    write_json(truth / f"space-{SPACE}_desc-effects.json", effects_description(anatomy, masks, sim_resolution, lesion))

    wm_level = float(np.median(anatomy.t1[anatomy.wm > 0.9]))
    for i, subject in enumerate(cohort):
        rng = np.random.default_rng([seed, i])
        drawn = lesion.draw(rng) if subject["group"] == "patient" else None
        volume = simulate_anatomy(anatomy, subject["age"], drawn, lesion.site.edge_mm)
        labels = tissue_labels(anatomy, subject["age"])
        for session, extension in zip(subject["sessions"], subject["extensions"]):
            scan = draw_scan(rng)
            data, affine, pose = render_scan(volume, anatomy.affine, scan, wm_level)
            subdir = Path(subject["participant_id"], *([session] if session else []), "anat")
            stem = "_".join([subject["participant_id"], *([session] if session else [])])
            save_nifti(data, affine, out_dir / subdir / f"{stem}_T1w{extension}")
            save_nifti(render_labels(labels, anatomy.affine, scan), affine,
                       out_dir / "derivatives" / "tissue" / subdir / f"{stem}_desc-tissue_dseg.nii.gz")
            write_json(out_dir / subdir / f"{stem}_T1w.json", {
                "Manufacturer": "Simulated", "MagneticFieldStrength": 3,
                "VoxelSize": [scan["voxel_mm"]] * 3, "Orientation": scan["orientation"]})
            write_json(truth / subdir / f"{stem}_from-{SPACE}_to-T1w_pose.json", {
                "matrix": [[round(float(v), 10) for v in row] for row in pose],
                "rotation_deg": scan["rotation_deg"], "translation_mm": scan["translation_mm"],
                "rotation_centre_mm": [float(v) for v in BRAIN_CENTRE_MM],
                "convention": "x_scanner = matrix @ [x_template, 1] (RAS+ mm); rotation Rz @ Ry @ Rx about "
                              "rotation_centre_mm, then translation",
                "simulation": {"age": subject["age"], "group": subject["group"],
                               "lesion_radius_mm": drawn["radius_mm"] if drawn else None,
                               "lesion_core_multiplier": drawn["multiplier"] if drawn else None,
                               **({"lesion_centre_mm": drawn["centre_mm"] if drawn else None}
                                  if lesion.jitter_mm else {}),
                               **{k: v for k, v in scan.items() if k not in ("rotation_deg", "translation_mm")}},
            })
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where to write the BIDS dataset (must be empty or absent)")
    parser.add_argument("--n-subjects", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-resolution", type=float, default=1.5,
                        help="isotropic grid (mm) on which the anatomy is simulated")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT_DIR")
    lesion = parser.add_argument_group("patients' lesion (default: the temporal white-matter lesion)")
    lesion.add_argument("--lesion-site", choices=sorted(LESION_SITES), default="temporal-wm")
    lesion.add_argument("--lesion-radius", type=float, metavar="MM", help="nominal radius (each patient's: "
                        "x uniform(0.8, 1.2)); default: the site's (temporal-wm 10, deep-gm 5)")
    lesion.add_argument("--lesion-contrast", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of the fraction of intensity lost at the core (default 0.45 0.65)")
    lesion.add_argument("--lesion-jitter", type=float, default=0.0, metavar="MM",
                        help="each patient's lesion centre moves uniform(±MM) per axis (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with InputError.exit_cleanly():
        chosen = Lesion.from_options(args.lesion_site, args.lesion_radius, args.lesion_contrast, args.lesion_jitter)
        make_demo(args.out_dir, args.n_subjects, args.seed, args.sim_resolution, args.overwrite, chosen)
    print(f"wrote {args.n_subjects} simulated participants to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
