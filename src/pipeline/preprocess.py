"""Fixed preprocessing of one T1w image into the study's template grid (antspyx).

reorient → N4 bias correction → rigid/affine registration to the template grid → template
brain mask → z-score normalisation inside the mask. Writes a BIDS-derivative NIfTI with a
JSON sidecar, the forward and inverse ANTs transforms, a QC PNG and a float32 ``.npy`` array
(memory-mappable, shape = grid shape, RAS+ voxel order of the template grid).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.errors import InputError
from pipeline.template import SPACE


def derivative_paths(out_dir: Path, subdir: str, image_id: str) -> dict[str, Path]:
    """Every file preprocessing writes for one image, by role (BIDS-derivative names)."""
    anat = Path(out_dir) / subdir / "anat"
    stem = anat / image_id
    return {
        "image": Path(f"{stem}_space-{SPACE}_desc-preproc_T1w.nii.gz"),
        "sidecar": Path(f"{stem}_space-{SPACE}_desc-preproc_T1w.json"),
        "array": Path(f"{stem}_space-{SPACE}_desc-preproc_T1w.npy"),
        "forward": Path(f"{stem}_from-T1w_to-{SPACE}_mode-image_xfm.mat"),
        "inverse": Path(f"{stem}_from-{SPACE}_to-T1w_mode-image_xfm.mat"),
        "qc": Path(f"{stem}_space-{SPACE}_desc-qc_T1w.png"),
    }


def load_native(path: Path):
    """Read a T1w image with ANTs, failing with a message that names the file."""
    import ants

    try:
        nib_img = nib.load(str(path))
        if len(nib_img.shape) not in (3, 4) or (len(nib_img.shape) == 4 and nib_img.shape[3] != 1):
            raise InputError(f"{path}: expected a 3D T1w image, got shape {nib_img.shape}.")
        return ants.image_read(str(path), dimension=3)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI ({type(exc).__name__}: {exc}). Replace or exclude it.") from exc


def normalise(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Z-score ``data`` with the mean and sd inside ``mask``; 0 outside the mask."""
    inside = data[mask > 0]
    sd = inside.std()
    if sd == 0:
        raise InputError("Image is constant inside the brain mask after registration; check the input image.")
    return np.where(mask > 0, (data - inside.mean()) / sd, 0.0).astype(np.float32)


def preprocess(source: Path, template: Path, mask: Path, out: dict[str, Path], transform: str = "Affine",
               n4: bool = True, n4_shrink: int = 4, seed: int = 0) -> dict:
    """Run the chain on ``source`` into the grid of ``template``; write all ``out`` files; return the sidecar."""
    import ants

    threads = os.environ.get("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    ants.config.set_ants_deterministic(True, seed)  # fixes the seed but also forces one thread:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = threads
    native = load_native(source)
    fixed = ants.image_read(str(template))
    mask_img = nib.load(str(mask))
    moving = ants.reorient_image2(native, ants.get_orientation(fixed))
    if n4:
        moving = ants.n4_bias_field_correction(moving, mask=ants.get_mask(moving), shrink_factor=n4_shrink,
                                               convergence={"iters": [50, 50, 30], "tol": 1e-6})
    moving = moving / float(np.percentile(moving.numpy(), 99))  # same intensity range as the template
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # ANTs writes its transforms under outprefix
        reg = ants.registration(fixed=fixed, moving=moving, type_of_transform=transform,
                                outprefix=f"{tmp}/", aff_random_sampling_rate=0.25,
                                aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0),
                                aff_iterations=(100, 50, 25))
        warped = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], interpolator="linear")
        shutil.copyfile(reg["fwdtransforms"][0], out["forward"])
        ants.write_transform(ants.read_transform(reg["fwdtransforms"][0]).invert(), str(out["inverse"]))
    data = normalise(warped.numpy(), mask_img.get_fdata())
    # The template grid's own RAS+ affine: the saved map is exactly on the study grid.
    nib.save(nib.Nifti1Image(data, mask_img.affine), out["image"])
    np.save(out["array"], data)
    brain = mask_img.get_fdata() > 0
    similarity = float(np.corrcoef(data[brain], fixed.numpy()[brain])[0, 1])
    sidecar = {
        "Sources": [str(source)],
        "SpatialReference": {"space": SPACE, "grid": str(template)},
        "Steps": ["reorient", *(["N4BiasFieldCorrection"] if n4 else []), f"ants.registration:{transform}",
                  "template brain mask", "z-score inside mask"],
        "Parameters": {"transform": transform, "n4": n4, "n4_shrink_factor": n4_shrink, "seed": seed},
        "QC": {"correlation_with_template": round(similarity, 4)},
        "Transforms": {"forward": out["forward"].name, "inverse": out["inverse"].name},
        "SoftwareVersions": _versions(),
    }
    out["sidecar"].write_text(json.dumps(sidecar, indent=2))
    write_qc(out["image"], mask, out["qc"], f"{Path(source).name}  r(template)={similarity:.2f}")
    return sidecar


def to_native(map_img: nib.Nifti1Image, native_path: Path, inverse: Path, interpolator: str = "linear") -> nib.Nifti1Image:
    """Resample a template-grid map onto the subject's native T1w grid with the inverse transform."""
    import ants

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "map.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(map_img.dataobj, dtype=np.float32), map_img.affine), src)
        moving = ants.image_read(str(src))
        native = ants.image_read(str(native_path), dimension=3)
        warped = ants.apply_transforms(native, moving, [str(inverse)], interpolator=interpolator)
        out = Path(tmp) / "native.nii.gz"
        ants.image_write(warped, str(out))
        img = nib.load(str(out))
        return nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), nib.load(str(native_path)).affine)


def write_qc(image: Path, mask: Path, png: Path, title: str) -> None:
    """Orthogonal slices of the preprocessed image with the template brain outline."""
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    display = plotting.plot_anat(str(image), title=title, display_mode="ortho", cut_coords=(0, -17, 6),
                                 draw_cross=False, vmin=-2, vmax=3)
    display.add_contours(str(mask), levels=[0.5], colors="r", linewidths=0.8)
    display.savefig(str(png), dpi=80)
    display.close()


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("antspyx", "nibabel", "numpy", "pipeline")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path, help="native T1w NIfTI")
    parser.add_argument("--template", type=Path, required=True, help="template on the study grid (NIfTI)")
    parser.add_argument("--mask", type=Path, required=True, help="brain mask on the study grid (NIfTI)")
    parser.add_argument("--out-dir", type=Path, required=True, help="derivatives root")
    parser.add_argument("--subdir", required=True, help="sub-X[/ses-Y]")
    parser.add_argument("--image-id", required=True, help="sub-X[_ses-Y]")
    parser.add_argument("--transform", default="Affine", choices=["Rigid", "Affine"])
    parser.add_argument("--no-n4", action="store_true")
    parser.add_argument("--n4-shrink", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    out = derivative_paths(args.out_dir, args.subdir, args.image_id)
    with InputError.exit_cleanly():
        sidecar = preprocess(args.source, args.template, args.mask, out, args.transform, not args.no_n4,
                             args.n4_shrink, args.seed)
    print(json.dumps(sidecar["QC"]), file=sys.stderr)


if __name__ == "__main__":
    main()
