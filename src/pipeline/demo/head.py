"""A whole-head phantom around the simulated brain (``python -m pipeline.demo --whole-head``).

Real T1w scans hold the whole head: CSF around the brain, the skull (dark cortical tables around
brighter marrow), the scalp (skin, bright subcutaneous fat, muscle), the face with the eyes, and
the neck. The phantom builds these in template space (mm, RAS+) on the simulation grid padded to
take the face and the neck, from distances to the template brain:

* CSF: a ``csf_mm`` rim outside the brain (smoothed outline: it fills the sulci' mouths);
* skull: ``skull_mm`` beyond it: outer and inner tables (cortical bone, dark) and diploë between;
* soft tissue: the rest of the head: the scalp over the skull, a face block in front of and below
  the brain with two eyes (dark vitreous in bright orbital fat), and a neck cylinder with the
  spinal cord; skin, then ``fat_mm`` of subcutaneous fat, then muscle marbled with fat;
* a smooth multiplicative texture (±10 %) on every non-brain tissue.

The head's outline is the same for every subject; the layer thicknesses and the texture are drawn
per subject (``draw_head``) from their own random stream, so the brain-only cohort's draws are
untouched. Defacing (``--deface``) zeros the face: every point beyond the plane, normal
anterior-inferior, that touches the brain grown by ``DEFACE_MARGIN_MM``, as pydeface-like tools do.
Intensities are on the template's scale (white matter about 0.87).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from pipeline.demo.anatomy import Anatomy, world_coordinates

PAD_MM = {"y_front": 40.0, "z_below": 60.0}  # the template box lacks the nose and the neck
FOV_MM = (176.0, 256.0, 256.0)  # a sagittal whole-head T1w: 176 x 256 x 256 at 1 mm
FOV_CENTRE_MM = np.array([0.0, -6.0, -17.0])  # in template space: the head's centre, neck included
SCALP_MM = 9.0  # skin to skull over the vault
EYES_MM = ((-33.0, 62.0, -38.0), (33.0, 62.0, -38.0))
EYE_RADIUS_MM, ORBIT_FAT_MM = 11.0, 4.0
FACE = {"centre_mm": (0.0, 55.0, -52.0), "radii_mm": (58.0, 48.0, 45.0)}
NECK = {"centre_mm": (0.0, -30.0), "radii_mm": (52.0, 58.0), "top_mm": -30.0}
CORD = {"centre_mm": (0.0, -45.0), "radius_mm": 4.5, "csf_mm": 3.0}  # under the template's cut brainstem
DEFACE_NORMAL = np.array([0.0, 1.0, -1.0]) / np.sqrt(2.0)  # anterior-inferior
DEFACE_MARGIN_MM = 8.0
INTENSITY = {"csf": 0.15, "bone": 0.04, "marrow": 0.55, "skin": 0.5, "fat": 0.95, "muscle": 0.42,
             "vitreous": 0.1, "cord": 0.7}


@dataclass(frozen=True, eq=False)
class Head:
    """The head's fixed geometry on the padded simulation grid (X, Y, Z), RAS+.

    ``affine``: the padded grid's (4, 4) affine; ``pad``: voxels added before the anatomy's grid
    per axis; ``brain``: the template brain (T1w > 0); ``from_brain``: distance (mm) to the brain's
    smoothed outline, 0 inside; ``depth``: distance (mm) inside the head from the skin, 0 outside;
    ``eyes``/``orbit``: vitreous and orbital fat; ``cord``/``cord_csf``: the spinal cord and its CSF;
    ``face``: the defaced region."""

    affine: np.ndarray
    pad: tuple[int, int, int]
    brain: np.ndarray
    from_brain: np.ndarray
    depth: np.ndarray
    eyes: np.ndarray
    orbit: np.ndarray
    cord: np.ndarray
    cord_csf: np.ndarray
    face: np.ndarray


def ellipsoid(coordinates, centre, radii) -> np.ndarray:
    """Boolean ellipsoid on the open grid ``coordinates`` (mm)."""
    return sum(((c - m) / r) ** 2 for c, m, r in zip(coordinates, centre, radii)) <= 1.0


def build_head(anatomy: Anatomy) -> Head:
    """The fixed geometry of the phantom's head around ``anatomy``'s template brain."""
    res = anatomy.resolution
    pad = (0, int(np.ceil(PAD_MM["y_front"] / res)), int(np.ceil(PAD_MM["z_below"] / res)))
    widths = ((0, 0), (0, pad[1]), (pad[2], 0))
    brain = np.pad(anatomy.t1 > 0, widths)
    affine = anatomy.affine.copy()
    affine[2, 3] -= pad[2] * res
    xyz = world_coordinates(affine, brain.shape)
    outline = ndi.gaussian_filter(brain.astype(np.float32), 4.0 / res) > 0.3
    from_brain = ndi.distance_transform_edt(~outline, sampling=res).astype(np.float32)
    cranium = from_brain <= 3.5 + 8.0 + SCALP_MM  # the widest CSF and skull a subject draws, plus scalp
    eyes = sum(ellipsoid(xyz, c, (EYE_RADIUS_MM,) * 3) for c in EYES_MM) > 0
    orbit = sum(ellipsoid(xyz, c, (EYE_RADIUS_MM + ORBIT_FAT_MM,) * 3) for c in EYES_MM) > 0
    x, y, z = xyz
    neck = (((x - NECK["centre_mm"][0]) / NECK["radii_mm"][0]) ** 2
            + ((y - NECK["centre_mm"][1]) / NECK["radii_mm"][1]) ** 2 <= 1.0) & (z <= NECK["top_mm"])
    head = cranium | ellipsoid(xyz, FACE["centre_mm"], FACE["radii_mm"]) | orbit | neck
    head = ndi.gaussian_filter(head.astype(np.float32), 3.0 / res) > 0.5  # one smooth skin
    depth = ndi.distance_transform_edt(head, sampling=res).astype(np.float32)
    bottom = float(np.min(np.where(brain.any(axis=(0, 1)), z.ravel(), np.inf)))
    axis = np.sqrt((x - CORD["centre_mm"][0]) ** 2 + (y - CORD["centre_mm"][1]) ** 2)
    below = z < bottom + res
    cord = (axis <= CORD["radius_mm"]) & below
    cord_csf = (axis <= CORD["radius_mm"] + CORD["csf_mm"]) & below & ~cord
    reach = float(np.max(np.where(from_brain <= DEFACE_MARGIN_MM, sum(n * c for n, c in zip(DEFACE_NORMAL, xyz)),
                                  -np.inf)))
    face = (sum(n * c for n, c in zip(DEFACE_NORMAL, xyz)) > reach) & head
    return Head(affine=affine, pad=pad, brain=brain, from_brain=from_brain, depth=depth, eyes=eyes & head,
                orbit=orbit & head & ~eyes, cord=cord & head, cord_csf=cord_csf & head, face=face)


def draw_head(rng: np.random.Generator) -> dict:
    """One subject's layer thicknesses (mm) and texture seed."""
    return {"csf_mm": round(float(rng.uniform(1.5, 3.5)), 2), "skull_mm": round(float(rng.uniform(5.0, 8.0)), 2),
            "fat_mm": round(float(rng.uniform(2.5, 5.0)), 2), "texture_seed": int(rng.integers(2**32))}


def head_intensity(head: Head, drawn: dict, resolution: float) -> np.ndarray:
    """Non-brain intensity of one subject's head on the padded grid (0 outside the head and in the brain)."""
    d, depth = head.from_brain, head.depth
    csf_end, skull_end = drawn["csf_mm"], drawn["csf_mm"] + drawn["skull_mm"]
    inside = depth > 0
    texture_rng = np.random.default_rng(drawn["texture_seed"])
    marbling = ndi.gaussian_filter(texture_rng.standard_normal(d.shape, dtype=np.float32), 3.0 / resolution)
    marbling /= float(marbling.std()) or 1.0
    soft = np.where(depth < 1.5, INTENSITY["skin"],
                    np.where(depth < 1.5 + drawn["fat_mm"], INTENSITY["fat"],
                             np.where(marbling > 1.0, INTENSITY["fat"], INTENSITY["muscle"])))
    table = drawn["skull_mm"] / 3.0
    skull = np.where((d < csf_end + table) | (d >= skull_end - table), INTENSITY["bone"], INTENSITY["marrow"])
    out = np.where(d < csf_end, INTENSITY["csf"], np.where(d < skull_end, skull, soft)).astype(np.float32)
    out = np.where(head.orbit, INTENSITY["fat"], out)
    out = np.where(head.eyes, INTENSITY["vitreous"], out)
    out = np.where(head.cord_csf, INTENSITY["csf"], np.where(head.cord, INTENSITY["cord"], out))
    smooth = ndi.gaussian_filter(texture_rng.standard_normal(d.shape, dtype=np.float32), 6.0 / resolution)
    out *= 1.0 + 0.1 * smooth / (float(smooth.std()) or 1.0)
    return np.where(inside & ~head.brain, out, 0.0).astype(np.float32)


def whole_head(head: Head, brain_volume: np.ndarray, drawn: dict, resolution: float) -> np.ndarray:
    """The subject's head: its simulated brain (``brain_volume``, the anatomy's grid) inside the
    template brain, ``head_intensity`` around it, on the padded grid."""
    widths = tuple((p, 0) if axis == 2 else (0, p) for axis, p in enumerate(head.pad))
    brain = np.pad(brain_volume, widths)
    return np.where(head.brain, brain, head_intensity(head, drawn, resolution)).astype(np.float32)


@dataclass(frozen=True)
class WholeHead:
    """The ``--whole-head`` options: ``deface`` zeros the face; each image's voxel size is drawn
    uniform in ``voxel_mm`` (mm, isotropic; real scans: about 0.8-1.2, tests: coarser)."""

    deface: bool = False
    voxel_mm: tuple[float, float] = (0.9, 1.2)

    def scan_fields(self) -> dict:
        """The entries a scan (``pipeline.demo.scanner.scan_grid``) needs for the whole-head field of view."""
        return {"fov_mm": list(FOV_MM), "fov_centre_mm": [float(v) for v in FOV_CENTRE_MM]}
