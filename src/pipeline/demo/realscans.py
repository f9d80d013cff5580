"""A real-anatomy test cohort: real whole-head T1w scans, variants of them a study must accept, and
induced failures it must flag (issue 27).

The scans are the two T1w sessions of one person that the npm package ``brainbrowser`` 2.3.0 ships
(``package/examples/models/structural{1,2}.mnc.{header,raw}.gz``, AGPL-3.0; ``make real-scans``
fetches them into ``data/real/brainbrowser`` beside their licence: they are never committed). Each
is a JSON header and raw uint8 voxels (``read_brainbrowser``). ``make_cohort`` writes a BIDS dataset:

* ``sub-A`` ``ses-1`` and ``ses-2``: the two scans as they are (1 mm, oblique, face and neck);
* ``sub-vNN``: variants (``draw_variant``): a random rigid pose, field of view (the whole brain kept),
  voxel sizes 0.8-3 mm (anisotropic), orientation code, bias field, noise and storage (uint8,
  int16 scaled by ``scl_slope``, float32; some with a trailing singleton axis or a qform only);
* ``sub-fNN``: induced failures (``FAILURES``): header rotated 90°, two axes swapped in the header,
  voxel size off 2×, a translation of a metre, the top of the brain cut off by the field of view,
  mostly noise, a non-brain image (a phantom) of the scan's size and grid. The translation is
  expected to pass (``RECOVERED``): registration starts from the images' centres of mass.

``participants.tsv`` has ``expected`` (``good`` or ``failure``), ``what`` (the variant's drawn
parameters or the failure) and ``age`` (the person's is unknown: a placeholder target, so the
dataset runs through ingest as it is). A left-right flip is not among the failures: registration
to a symmetric template cannot see it (docs/benchmarks.md, *Real scans*).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from pipeline.common import atomic
from pipeline.demo.scanner import rotation_matrix

SCANS = ("structural1", "structural2")
LICENCE = "LICENSE"  # brainbrowser's AGPL-3.0 text, kept beside the scans
AXES = ("xspace", "yspace", "zspace")
ORIENTATIONS = ("RAS", "LPS", "LAS", "PIR", "ASL", "RSA", "IPL")  # axis codes of the stored voxel order


def read_brainbrowser(header_gz: Path, raw_gz: Path) -> nib.Nifti1Image:
    """A brainbrowser volume (JSON header: ``order``, and per axis ``space_length``, ``step``,
    ``start``, ``direction_cosines``; raw uint8 voxels, the first axis of ``order`` slowest) as a
    uint8 NIfTI in (x, y, z) voxel order. MINC's rule: world = Σ_axis (start + i·step)·cosines,
    world being RAS+ mm, so the affine's columns are step·cosines and its offset Σ start·cosines."""
    header = json.loads(gzip.decompress(Path(header_gz).read_bytes()))
    order = header["order"]
    if sorted(order) != sorted(AXES):
        raise ValueError(f"{header_gz}: expected a 3D volume with axes {AXES}, got order {order}")
    shape = [int(header[a]["space_length"]) for a in order]
    raw = np.frombuffer(gzip.decompress(Path(raw_gz).read_bytes()), dtype=np.uint8)
    if raw.size != np.prod(shape):
        raise ValueError(f"{raw_gz}: {raw.size} voxels, the header {header_gz} says {shape}")
    data = raw.reshape(shape).transpose([order.index(a) for a in AXES])
    affine = np.eye(4)
    for i, axis in enumerate(AXES):
        cosines = np.asarray(header[axis].get("direction_cosines", np.eye(3)[i]), dtype=float)
        affine[:3, i] = float(header[axis]["step"]) * cosines
        affine[:3, 3] += float(header[axis]["start"]) * cosines
    return nib.Nifti1Image(np.ascontiguousarray(data), affine)


def load_scans(scans_dir: Path) -> dict[str, nib.Nifti1Image]:
    """The fetched scans of ``scans_dir`` (``make real-scans``) by name; FileNotFoundError saying
    how to fetch them when one is missing."""
    found = {}
    for name in SCANS:
        header, raw = (Path(scans_dir) / f"{name}.mnc.{part}.gz" for part in ("header", "raw"))
        if not (header.exists() and raw.exists()):
            raise FileNotFoundError(f"{header} or {raw} is missing: run `make real-scans` (it fetches the npm "
                                    "package brainbrowser 2.3.0 and keeps its scans and licence there).")
        found[name] = read_brainbrowser(header, raw)
    return found


# ----------------------------------------------------------------------------- geometry

def head_mask(data: np.ndarray) -> np.ndarray:
    """The head (scalp inward) of a scan: above a tenth of the 99th percentile, largest component, filled."""
    above = data > 0.1 * np.percentile(data, 99)
    labels, n = ndi.label(ndi.binary_opening(above, iterations=2))
    if n == 0:
        return above
    largest = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndi.binary_fill_holes(largest)


def world_box(img: nib.Nifti1Image, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) corners (mm, world) of the voxels of ``mask``."""
    ijk = np.argwhere(mask)
    corners = np.array([ijk.min(0), ijk.max(0)])
    world = nib.affines.apply_affine(img.affine, np.array(np.meshgrid(*corners.T, indexing="ij")).reshape(3, -1).T)
    return world.min(0), world.max(0)


def orientation_axes(code: str) -> np.ndarray:
    """(3, 3) direction of each stored voxel axis (columns) in RAS+ for a three-letter code
    (the direction each axis points to: ``LPS`` = x towards left, y posterior, z superior)."""
    letters = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    out = np.zeros((3, 3))
    for column, letter in enumerate(code):
        axis, sign = letters[letter]
        out[axis, column] = sign
    return out


def resample(img: nib.Nifti1Image, affine: np.ndarray, shape, order: int = 1) -> np.ndarray:
    """``img`` sampled on the grid (``affine``, ``shape``), smoothed first where that grid is
    coarser than the image (anti-aliasing); 0 outside the image."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    source_mm = np.linalg.norm(img.affine[:3, :3], axis=0)
    target_mm = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    sigma = np.sqrt(np.clip(target_mm ** 2 - source_mm ** 2, 0, None)) / 2.355 / source_mm
    if sigma.max() > 0.3:
        data = ndi.gaussian_filter(data, sigma)
    to_source = np.linalg.inv(img.affine) @ affine
    return ndi.affine_transform(data, to_source[:3, :3], to_source[:3, 3], output_shape=tuple(shape), order=order,
                                mode="constant", cval=0.0, prefilter=False)


def posed_grid(low: np.ndarray, high: np.ndarray, pose: np.ndarray, voxel_mm, code: str,
               margin_mm) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The (affine, shape) of a scanner grid of ``voxel_mm`` (3 values) in orientation ``code``
    that covers the world box (``low``, ``high``) grown by ``margin_mm`` (per axis) after ``pose``
    (4 × 4, world to posed world)."""
    corners = np.array(np.meshgrid(*np.array([low, high]).T, indexing="ij")).reshape(3, -1).T
    posed = nib.affines.apply_affine(pose, corners)
    lo, hi = posed.min(0) - margin_mm, posed.max(0) + margin_mm
    axes = orientation_axes(code)  # column c: the RAS direction of stored axis c
    voxel = np.asarray(voxel_mm, dtype=float)
    extent = np.abs(axes.T) @ (hi - lo)  # mm along each stored axis
    shape = tuple(int(np.ceil(e / v)) + 1 for e, v in zip(extent, voxel))
    affine = np.eye(4)
    affine[:3, :3] = axes * voxel
    start = np.where(axes.sum(1) > 0, lo, hi)  # the corner each axis starts from, per RAS axis
    affine[:3, 3] = start
    return affine, shape


# ----------------------------------------------------------------------------- variants

def draw_variant(rng: np.random.Generator) -> dict:
    """The parameters of one good variant: rotation (degrees about x, y, z), translation (mm),
    voxel sizes (mm), orientation code, field-of-view margin (mm, per axis; negative crops the
    neck only), bias-field amplitude, noise (fraction of the 99th percentile), storage."""
    return {
        "rotation_deg": [round(float(v), 1) for v in rng.uniform(-15, 15, 3)],
        "translation_mm": [round(float(v), 1) for v in rng.uniform(-40, 40, 3)],
        "voxel_mm": [round(float(v), 2) for v in rng.uniform(0.8, 3.0, 3)],
        "orientation": str(rng.choice(ORIENTATIONS)),
        "margin_mm": [round(float(v), 1) for v in rng.uniform(0, 25, 3)],
        "neck_crop_mm": round(float(rng.uniform(0, 50)), 1),
        "bias": round(float(rng.uniform(0.0, 0.4)), 2),
        "noise": round(float(rng.uniform(0.0, 0.05)), 3),
        "storage": str(rng.choice(["uint8", "int16", "float32"])),
        "singleton": bool(rng.random() < 0.2),
        "qform_only": bool(rng.random() < 0.2),
        "seed": int(rng.integers(2**31)),
    }


def bias_field(shape, amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field exp(a·f) over the grid, f a random second-order polynomial
    of the normalised coordinates scaled to [-1, 1]: a ratio of about e^(2a) from dark to bright."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    terms = [*grids, *(g * h for i, g in enumerate(grids) for h in grids[i:])]
    field = sum(float(c) * t for c, t in zip(rng.normal(0, 1, len(terms)), terms))
    field = field / max(float(np.abs(field).max()), 1e-6)
    return np.exp(amplitude * field).astype(np.float32)


def variant(img: nib.Nifti1Image, params: dict) -> nib.Nifti1Image:
    """``img`` under the variant ``params`` (``draw_variant``): posed rigidly about the head's
    centre, resampled onto the new grid (the whole head kept, the neck cropped by up to
    ``neck_crop_mm``), bias field, Rician-like noise, stored as asked."""
    rng = np.random.default_rng(params["seed"])
    data = np.asarray(img.dataobj, dtype=np.float32)
    low, high = world_box(img, head_mask(data))
    low = low + np.array([0, 0, params["neck_crop_mm"]])  # the neck, never the brain (its top is at high)
    centre = (low + high) / 2
    pose = np.eye(4)
    pose[:3, :3] = rotation_matrix(params["rotation_deg"])
    pose[:3, 3] = centre - pose[:3, :3] @ centre + np.asarray(params["translation_mm"])
    affine, shape = posed_grid(low, high, pose, params["voxel_mm"], params["orientation"], params["margin_mm"])
    out = resample(img, np.linalg.inv(pose) @ affine, shape)  # the posed image's voxel to original world
    out = out * bias_field(shape, params["bias"], rng)
    scale = float(np.percentile(out, 99))
    sd = params["noise"] * scale
    out = np.sqrt((out + rng.normal(0, sd, shape)) ** 2 + rng.normal(0, sd, shape) ** 2) if sd > 0 else out
    return stored(out.astype(np.float32), affine, params["storage"], params["singleton"], params["qform_only"])


def stored(data: np.ndarray, affine: np.ndarray, storage: str, singleton: bool = False,
           qform_only: bool = False) -> nib.Nifti1Image:
    """``data`` as a NIfTI of ``storage`` (uint8 scaled to 0-255, int16 with an ``scl_slope``,
    float32), optionally with a trailing singleton axis and the affine in the qform only."""
    if storage == "uint8":
        array = np.clip(np.rint(data / max(float(data.max()), 1e-6) * 255), 0, 255).astype(np.uint8)
    elif storage == "int16":
        slope = max(float(data.max()), 1e-6) / 32000
        array = np.rint(data / slope).astype(np.int16)
    else:
        array = data.astype(np.float32)
    img = nib.Nifti1Image(array[..., None] if singleton else array, affine)
    if storage == "int16":
        img.header.set_slope_inter(slope, 0.0)
    if qform_only:
        img.set_sform(None, code=0)
        img.set_qform(affine, code=1)
    return img


# ----------------------------------------------------------------------------- induced failures

def about_centre(img: nib.Nifti1Image, matrix: np.ndarray) -> np.ndarray:
    """``img``'s affine changed by the (3, 3) ``matrix`` about the image's centre (world)."""
    centre = nib.affines.apply_affine(img.affine, (np.asarray(img.shape[:3]) - 1) / 2)
    change = np.eye(4)
    change[:3, :3] = matrix
    change[:3, 3] = centre - matrix @ centre
    return change @ img.affine


def failure(kind: str, img: nib.Nifti1Image, rng: np.random.Generator) -> nib.Nifti1Image:
    """The induced failure ``kind`` (``FAILURES``) of the scan ``img``."""
    data = np.asarray(img.dataobj)
    if kind == "header_rotated_90":  # the data as they are, the header turned 90° about left-right
        return nib.Nifti1Image(data, about_centre(img, rotation_matrix([90, 0, 0])))
    if kind == "header_axes_swapped":  # the second and third voxel axes exchanged in the header only
        affine = img.affine.copy()
        affine[:, [1, 2]] = affine[:, [2, 1]]
        return nib.Nifti1Image(data, affine)
    if kind == "voxel_size_2x":  # the header's voxels twice their size, about the centre
        return nib.Nifti1Image(data, about_centre(img, 2 * np.eye(3)))
    if kind == "translated_1m":  # a metre out: recovered, registration starts from the centres of mass
        affine = img.affine.copy()
        affine[:3, 3] += [0.0, 600.0, 800.0]
        return nib.Nifti1Image(data, affine)
    if kind == "top_cut":  # the field of view ends 45 mm below the top of the head: the top of the brain is gone
        head = head_mask(data.astype(np.float32))
        top = world_box(img, head)[1][2]
        axis = int(np.argmax(np.abs(img.affine[2, :3])))  # the voxel axis closest to superior
        z = img.affine[2, axis] * np.arange(data.shape[axis]) + img.affine[2, 3]  # near enough along that axis
        keep = np.flatnonzero(z <= top - 45.0)
        cropped = np.take(data, keep, axis=axis)
        return nib.Nifti1Image(cropped, img.affine @ nib.affines.from_matvec(np.eye(3), np.eye(3)[axis] * keep[0]))
    if kind == "mostly_noise":  # the scan at a tenth of its contrast under noise of twice its brightness
        scale = float(np.percentile(data, 99))
        noisy = 0.1 * data + np.abs(rng.normal(0, 2 * scale, data.shape))
        return nib.Nifti1Image(noisy.astype(np.float32), img.affine)
    if kind == "non_brain":  # a phantom: an ellipsoid with inserts, the scan's size, grid and contrast
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in data.shape], indexing="ij"))
        body = (grid ** 2).sum(0) < 0.7
        inserts = sum(((grid - np.asarray(c)[:, None, None, None]) ** 2).sum(0) < 0.02
                      for c in rng.uniform(-0.4, 0.4, (6, 3)))
        phantom = np.where(body, 0.6, 0.0) + 0.3 * (inserts > 0) * body + rng.normal(0, 0.02, data.shape)
        phantom = ndi.gaussian_filter(np.clip(phantom, 0, None), 1.0) * float(np.percentile(data, 99))
        return nib.Nifti1Image(phantom.astype(np.float32), img.affine)
    raise KeyError(f"unknown failure {kind!r}; choose one of {FAILURES}")


FAILURES = ("header_rotated_90", "header_axes_swapped", "voxel_size_2x", "translated_1m", "top_cut",
            "mostly_noise", "non_brain")
# Induced, but not a failure of this pipeline: registration starts rigid from the images' centres of
# mass, so a header translated by a metre registers as well as the scan itself (docs/benchmarks.md).
RECOVERED = {"translated_1m"}


# ----------------------------------------------------------------------------- the dataset

def make_cohort(scans_dir: Path, out_dir: Path, n_variants: int = 20, seed: int = 0, failures=FAILURES,
                overwrite: bool = False, extension: str = ".nii.gz") -> Path:
    """Write the BIDS cohort (module docstring) from the scans in ``scans_dir`` to ``out_dir``;
    ``extension`` ``.nii`` writes uncompressed files (faster to write and read, 3× the disk)."""
    scans = load_scans(scans_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not overwrite:
            raise FileExistsError(f"{out_dir} exists; pass overwrite (--overwrite) to replace it")
        shutil.rmtree(out_dir)
    rng = np.random.default_rng(seed)
    rows = []

    def save(img: nib.Nifti1Image, participant: str, session: str | None, expected: str, what: str, source: str):
        folder = out_dir / participant / (session or "") / "anat"
        folder.mkdir(parents=True, exist_ok=True)
        name = "_".join([participant, *([session] if session else []), f"T1w{extension}"])
        atomic.nib_save(img, folder / name)
        rows.append({"participant_id": participant, "session": session or "", "expected": expected,
                     "source": source, "what": what, "age": 40})

    for i, name in enumerate(SCANS):
        save(scans[name], "sub-A", f"ses-{i + 1}", "good", "the scan as shipped (1 mm, oblique, whole head)", name)
    for i in range(n_variants):
        params = draw_variant(rng)
        name = SCANS[i % len(SCANS)]
        save(variant(scans[name], params), f"sub-v{i + 1:02d}", None, "good", json.dumps(params), name)
    for i, kind in enumerate(failures):
        save(failure(kind, scans[SCANS[0]], np.random.default_rng([seed, i])), f"sub-f{i + 1:02d}", None,
             "good" if kind in RECOVERED else "failure", kind, SCANS[0])
    atomic.write_text(out_dir / "dataset_description.json", json.dumps(
        {"Name": "real-anatomy QC cohort (brainbrowser 2.3.0 scans, variants and induced failures)",
         "BIDSVersion": "1.9.0", "DatasetType": "raw", "License": "AGPL-3.0 (brainbrowser 2.3.0; see LICENSE)",
         "GeneratedBy": [{"Name": "pipeline.demo.realscans"}]}, indent=2) + "\n")
    licence = Path(scans_dir) / LICENCE
    if licence.exists():
        atomic.copyfile(licence, out_dir / "LICENSE")
    participants = {}
    for row in rows:
        participants.setdefault(row["participant_id"], row)
    lines = ["participant_id\tage\texpected\tsource\twhat"]
    lines += [f"{p}\t{r['age']}\t{r['expected']}\t{r['source']}\t{r['what']}" for p, r in participants.items()]
    atomic.write_text(out_dir / "participants.tsv", "\n".join(lines) + "\n")
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scans_dir", type=Path, help="the fetched scans (make real-scans): data/real/brainbrowser")
    parser.add_argument("out_dir", type=Path, help="the BIDS cohort to write")
    parser.add_argument("--variants", type=int, default=20, help="good variants to draw (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failures", nargs="*", default=list(FAILURES), choices=FAILURES)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = make_cohort(args.scans_dir, args.out_dir, args.variants, args.seed, args.failures, args.overwrite)
    print(f"real-anatomy cohort: {out}")


if __name__ == "__main__":
    main()
