"""Fixed preprocessing of one sample (one or more channels) into the study's template grid (antspyx).

Per channel: reorient → N4 bias correction. The reference channel (the first) is brain-extracted
(``preprocess.brain_extraction``, ``pipeline.intake.brainmask``: its mask is written on the
image's native grid) and registered
(rigid or affine) to the template grid; every further channel is rigidly co-registered to the
reference (mutual information) and carried to the template through both transforms, smoothed
first where the grid is coarser than the image (anti-aliasing: without it a 4 mm grid samples a
2 mm image's noise at every fourth voxel instead of averaging it). Then the template brain mask
and z-score normalisation inside it, per channel, with the mean and sd taken where the template
mask and the sample's own brain mask (carried to the grid) overlap. Writes per channel a
BIDS-derivative NIfTI with a JSON sidecar; for the sample the forward and inverse transforms of
the reference, a QC PNG and a float32 ``.npy`` array (C, X, Y, Z) in the template grid's RAS+
voxel order, memory-mappable for training. A label image (config ``label_image``, in the
reference image's space) is carried to the template grid by the reference's transform with
ANTs' ``genericLabel`` interpolation (labels stay labels), as a uint8 NIfTI and (1, X, Y, Z) ``.npy``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common import atomic, config
from pipeline.common.cli import add_config, channel_names
from pipeline.intake import brainmask, exclusions, qc
from pipeline.intake.derivatives import bids_uri
from pipeline.intake.geometry import DISAGREE_MM, ants_image, ants_native
from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE, derivative_paths
from pipeline.intake.recipe import sidecar_steps


def load_native(path: Path):
    """Read a 3D image into ANTs, placed by ``pipeline.intake.geometry``'s rule, failing with a
    message that names the file; returns the image and its placement."""
    try:
        nib_img = nib.load(str(path))
        if len(nib_img.shape) not in (3, 4) or (len(nib_img.shape) == 4 and nib_img.shape[3] != 1):
            raise InputError(f"{path}: expected a 3D image, got shape {nib_img.shape}.")
        return ants_native(path, nib_img)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI ({type(exc).__name__}: {exc}). Replace or exclude it.") from exc


def normalise(data: np.ndarray, mask: np.ndarray, source: Path, stats: np.ndarray | None = None) -> np.ndarray:
    """Z-score ``data`` with the mean and sd inside ``stats`` (default: ``mask``); 0 outside ``mask``."""
    inside = data[(mask > 0) if stats is None else (mask > 0) & (stats > 0)]
    sd = inside.std()
    if not np.isfinite(sd) or sd == 0:
        raise InputError(f"{source}: the image is constant or not finite inside the template brain mask after "
                         "registration; check the image (or its registration in the QC PNG) and exclude it.")
    return np.where(mask > 0, (data - inside.mean()) / sd, 0.0).astype(np.float32)


def prepared(source: Path, orientation: str, n4: bool, n4_shrink: int, brain=None):
    """A channel read (placed by ``pipeline.intake.geometry``'s rule), reoriented to the template's
    axes, bias-corrected and scaled to ~[0, 1], and its placement. With ``brain`` (its mask as an
    ANTs image, reoriented alike) N4 is fitted inside it, and the image is zeroed outside it and
    scaled by the brain's own 99th percentile."""
    import ants

    native, placement = load_native(source)
    if (placement["qform_sform_mm"] or 0) > DISAGREE_MM:
        print(f"warning: {source}: its qform and sform place it up to {placement['qform_sform_mm']} mm apart; "
              "the sform is used (pipeline.intake.geometry)", file=sys.stderr)
    image = ants.reorient_image2(native, orientation)
    if n4:
        # The bias field is fitted inside the brain mask when there is one (ANTs' own head mask,
        # get_mask, costs ~10 s at 1 mm and fits scalp and neck too).
        image = ants.n4_bias_field_correction(image, mask=brain if brain is not None else ants.get_mask(image),
                                              shrink_factor=n4_shrink,
                                              convergence={"iters": [50, 50, 30], "tol": 1e-6})
    if brain is not None:
        inside = brain.numpy() > 0
        image = image.new_image_like(np.where(inside, image.numpy(), 0.0).astype(np.float32))
    scale = float(np.percentile(image.numpy()[inside] if brain is not None else image.numpy(), 99))
    if not np.isfinite(scale) or scale <= 0:
        raise InputError(f"{source}: 99 % of its voxels are 0 or less after reorientation{' and N4' if n4 else ''} "
                         "(an empty or mostly-background image), so it cannot be scaled or registered; check the "
                         "image and replace it, or leave the participant out (participants.exclude).")
    return image / scale, placement  # the template's intensity range


def registration_template(fixed, resolution: float | None):
    """The image the reference is registered to: the study grid's template ``fixed`` when
    ``resolution`` (mm) is None or not finer than the grid, else the bundled template over the
    same extent (centred on the brain) at ``resolution`` mm, so registration sees the anatomy at a
    working resolution whatever the study grid."""
    from pipeline.intake.template import template_on_grid

    grid_mm = max(fixed.spacing)
    if resolution is None or resolution >= grid_mm - 1e-6:
        return fixed
    shape = tuple(int(n) for n in np.ceil(np.asarray(fixed.shape) * grid_mm / resolution))
    working = template_on_grid(resolution, shape)
    return ants_image(working.get_fdata(dtype=np.float32), working.affine)


def register(fixed, moving, transform: str, prefix: str) -> str:
    """Register ``moving`` to ``fixed`` (ANTs, mutual information): a rigid stage from the images'
    centres of mass, then (``transform: Affine``) an affine stage from the rigid result, so scaling
    and shear are fitted only once the brain is in place. Returns the forward transform's file
    (one affine, the stages composed)."""
    import ants

    levels = {"aff_random_sampling_rate": 0.25, "aff_shrink_factors": (4, 2, 1),
              "aff_smoothing_sigmas": (2, 1, 0), "aff_iterations": (100, 50, 25)}
    coarse = {"aff_random_sampling_rate": 0.25, "aff_shrink_factors": (4, 2),  # an initialiser: half the cost
              "aff_smoothing_sigmas": (2, 1), "aff_iterations": (100, 50)}
    rigid = ants.registration(fixed=fixed, moving=moving, type_of_transform="Rigid", outprefix=f"{prefix}rigid_",
                              **(levels if transform == "Rigid" else coarse))["fwdtransforms"][0]
    if transform == "Rigid":
        return rigid
    return ants.registration(fixed=fixed, moving=moving, type_of_transform=transform, initial_transform=[rigid],
                             outprefix=f"{prefix}affine_", **levels)["fwdtransforms"][0]


def antialias_sigmas(image_spacing, grid_spacing: float) -> list[float]:
    """Per-axis Gaussian sigma (mm) that smooths an image of ``image_spacing`` (mm) for sampling
    on a grid of ``grid_spacing``: its FWHM makes up the difference, sqrt(grid² - voxel²); 0 along
    axes whose voxels are already as coarse as the grid."""
    fwhm = np.sqrt(np.clip(grid_spacing ** 2 - np.square(np.asarray(image_spacing, dtype=float)), 0.0, None))
    return [float(v) for v in fwhm / (2 * np.sqrt(2 * np.log(2)))]


def antialiased(image, grid_spacing: float):
    """``image`` smoothed by ``antialias_sigmas`` before resampling (unchanged where all are 0)."""
    import ants

    sigmas = antialias_sigmas(image.spacing, grid_spacing)
    if not any(sigmas):
        return image
    return ants.smooth_image(image, sigmas, sigma_in_physical_coordinates=True)


def preprocess(sources: list[Path], template: Path, mask: Path, out: dict[str, Path], channels=("T1w",),
               settings: dict | None = None, label: Path | None = None, brain_mask: Path | None = None,
               threads: int = 1, raw_dir: Path | None = None) -> dict:
    """Run the chain (``pipeline.intake.recipe.STEPS``) on the ``sources`` (one per channel,
    reference first) into the grid of ``template``; write all ``out`` files; return the reference
    channel's sidecar. ``settings``: config ``preprocess`` (what it leaves out: the schema's
    defaults). ``label``: the sample's label image (same space as the reference), written to
    ``out["label_image"]`` and ``out["label_array"]``. ``brain_mask``: the reference's mask
    from derivatives (``brain_extraction: derivatives``); ``threads``: the extractor's. ``raw_dir``:
    the input dataset, which the sidecars' ``Sources`` are BIDS URIs into (``bids:raw:sub-…``;
    without it, ``file://`` URIs).

    Reproducible for a given ``seed`` (≥ 1) when ITK runs one thread: ITK reads
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ants is first imported (the CLI sets it).
    """
    import ants

    settings = config.resolved(["preprocess"], settings or {})
    transform, n4, n4_shrink, seed, antialias, extraction, working_mm = (settings[k] for k in PARAMETERS)
    channels = list(channels)
    if len(sources) != len(channels):
        raise InputError(f"{len(sources)} images given for channels {channels}; give one image per channel.")
    if seed < 1:
        raise InputError(f"The registration seed must be a positive integer (ANTs reads 0 as 'seed from the "
                         f"clock'), got {seed}; set `preprocess.seed` in config.")
    ants.config.set_ants_deterministic(True, seed)  # passes --random-seed to antsRegistration
    fixed = ants.image_read(str(template))
    mask_img = nib.load(str(mask))
    brain = mask_img.get_fdata() > 0
    orientation = ants.get_orientation(fixed)
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    native = brainmask.native_mask(extraction, sources[0], brain_mask, threads)
    native_brain = None
    if native is not None:
        atomic.nib_save(native, out["brain_mask"])  # the image's own affine: the same grid as load_native's
        native_brain = ants.reorient_image2(ants_image(np.asarray(native.dataobj), native.affine), orientation)
    reference, placement = prepared(sources[0], orientation, n4, n4_shrink, native_brain)
    placements = {channels[0]: placement}
    arrays = []
    with tempfile.TemporaryDirectory() as tmp:  # ANTs writes its transforms under outprefix
        forward = register(registration_template(fixed, working_mm), reference, transform, f"{tmp}/ref_")
        atomic.copyfile(forward, out["forward"])
        with atomic.path(out["inverse"]) as partial:
            ants.write_transform(ants.read_transform(forward).invert(), str(partial))
        subject = brain_on_grid(native_brain, fixed, out, mask_img, sources[0])
        for channel, source in zip(channels, sources):
            if channel == channels[0]:
                moving, transforms = reference, [str(out["forward"])]
            else:
                moving, placements[channel] = prepared(source, orientation, n4, n4_shrink)
                coreg = ants.registration(fixed=reference, moving=moving, type_of_transform="Rigid",
                                          outprefix=f"{tmp}/{channel}_", aff_random_sampling_rate=0.25)
                atomic.copyfile(coreg["fwdtransforms"][0], out[f"coreg_{channel}"])
                transforms = [str(out["forward"]), str(out[f"coreg_{channel}"])]  # applied right to left
            if antialias:
                moving = antialiased(moving, max(fixed.spacing))
            warped = ants.apply_transforms(fixed, moving, transforms, interpolator="linear")
            data = normalise(warped.numpy(), brain, source, subject)
            # The template grid's own RAS+ affine: the saved image is exactly on the study grid.
            atomic.nib_save(nib.Nifti1Image(data, mask_img.affine), out[f"image_{channel}"])
            arrays.append(data)
    atomic.np_save(out["array"], np.stack(arrays))
    if label is not None:
        write_label(label, fixed, mask_img.affine, out["forward"], out["label_image"], out["label_array"])
    similarity = float(np.corrcoef(arrays[0][brain], fixed.numpy()[brain])[0, 1])
    sidecars = {}
    for channel, source in zip(channels, sources):
        steps = sidecar_steps(settings, channels, channel)
        sidecars[channel] = {
            "Sources": [bids_uri(source, raw_dir) if raw_dir else Path(source).resolve().as_uri()],
            "Channel": channel,
            "SkullStripped": True,  # 0 outside the template brain mask (normalise); BIDS requires the key
            "SpatialReference": {"space": SPACE, "grid": str(template)},
            "Steps": steps,
            "Parameters": {k: settings[k] for k in PARAMETERS},
            "Geometry": placements[channel],
            "QC": (qc.scores(arrays[0], fixed.numpy(), brain, subject if native is not None else None)
                   if channel == channels[0] else {}),  # pipeline.intake.qc: correlation, mutual information, Dice
            "Transforms": {"forward": out["forward"].name, "inverse": out["inverse"].name,
                           **({"to_reference": out[f"coreg_{channel}"].name} if channel != channels[0] else {})},
            "SoftwareVersions": _versions(),
        }
        atomic.write_text(out[f"sidecar_{channel}"], json.dumps(sidecars[channel], indent=2))
    write_qc(arrays[0], mask_img, out["qc"], f"{Path(sources[0]).name}  r(template)={similarity:.2f}",
             subject if native is not None else None)
    return sidecars[channels[0]]


PARAMETERS = ("transform", "n4", "n4_shrink_factor", "seed", "antialias", "brain_extraction",
              "registration_resolution")  # the sidecar's


def brain_on_grid(native_brain, fixed, out: dict[str, Path], mask_img: nib.Nifti1Image, source: Path) -> np.ndarray:
    """The sample's brain mask on the template grid (uint8). With a native mask (``native_brain``,
    an ANTs image) it is carried forward (linear, > 0.5); without one (``brain_extraction: none``)
    the template's mask is the sample's, and it is carried back to write ``out["brain_mask"]``."""
    import ants

    if native_brain is None:
        back = to_native(mask_img, source, out["inverse"], interpolator="genericLabel")
        atomic.nib_save(nib.Nifti1Image(np.rint(back.get_fdata()).astype(np.uint8), back.affine), out["brain_mask"])
        return np.asarray(mask_img.dataobj).astype(np.uint8)
    warped = ants.apply_transforms(fixed, native_brain, [str(out["forward"])], interpolator="linear")
    return (warped.numpy() > 0.5).astype(np.uint8)


def preprocess_or_exclude(sources: list[Path], out: dict[str, Path], image_id: str, on_error: str = "stop",
                          excluded: Path | None = None, **settings) -> dict | None:
    """``preprocess`` one sample; when it fails (unreadable data, registration error, an image
    unusable in the template grid) no partial output is left behind.

    ``on_error: stop`` raises InputError naming the image and the failure. ``continue`` writes
    the failure as one row of ``excluded`` (``pipeline.exclusions`` columns), leaves every ``out``
    file empty (zero bytes: Snakemake needs its declared outputs, and an empty file fails loudly
    where a made-up image would not) and returns None; a success writes ``excluded`` with its
    header only. ``settings`` are ``preprocess``'s. A sample that ``preprocess`` finished but whose
    reference scores below config ``preprocess.qc_min`` (``pipeline.intake.qc``) is excluded the same
    way, its sidecars and QC PNG kept (``qc_excluded``).
    """
    try:
        sidecar = preprocess(sources, out=out, **settings)
    except MemoryError:
        raise  # the job's memory, not the sample: let Snakemake fail (and retry) it
    except Exception as exc:  # ANTs raises RuntimeError and others; every other failure excludes the sample
        for path in out.values():
            path.unlink(missing_ok=True)
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        reason = (detail if isinstance(exc, InputError) else
                  f"preprocessing failed ({type(exc).__name__}: {detail}); check the image (or its registration), "
                  "or leave the participant out (participants.exclude)")
        if on_error == "stop" or excluded is None:
            raise InputError(f"{sources[0]} ({image_id}): {reason}" if not isinstance(exc, InputError) else reason) from exc
        participant = image_id.split("_")[0]
        exclusions.write(exclusions.record(image_id, participant, "preprocess", str(sources[0]), reason), excluded)
        for path in out.values():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(path, b"")
        return None
    reason = qc.failure(sidecar["QC"], config.resolved(["preprocess"], settings.get("settings") or {})["qc_min"],
                        sources[0], out["qc"])
    if reason is not None:
        return qc_excluded(out, image_id, reason, sources[0], on_error, excluded)
    if excluded is not None:
        exclusions.write(exclusions.empty(), excluded)
    return sidecar


def qc_excluded(out: dict[str, Path], image_id: str, reason: str, source: Path, on_error: str,
                excluded: Path | None) -> None:
    """Exclude a sample that ``preprocess`` finished but whose registration failed quality control
    (config ``preprocess.qc_min``): ``stop`` (or no ``excluded``) removes its files and raises
    InputError with ``reason``; ``continue`` writes ``reason`` to ``excluded`` and empties its files
    like any excluded sample's, except its sidecars (with the QC scores) and QC PNG, which show why."""
    if on_error == "stop" or excluded is None:
        for path in out.values():
            path.unlink(missing_ok=True)
        raise InputError(f"{reason} ({image_id}; or set on_error: continue to exclude it and go on)")
    for role, path in out.items():
        if role != "qc" and not role.startswith("sidecar_"):
            atomic.write_bytes(path, b"")
    exclusions.write(exclusions.record(image_id, image_id.split("_")[0], "preprocess", str(source), reason), excluded)
    return None


def write_label(source: Path, fixed, affine: np.ndarray, forward: Path, image_out: Path, array_out: Path) -> np.ndarray:
    """Carry the label image ``source`` onto the grid of ``fixed`` (the template, RAS+ ``affine``)
    with the reference's ``forward`` transform, nearest label (ANTs genericLabel); write a uint8
    NIfTI and a (1, X, Y, Z) uint8 array. Labels must be integers in 0-255."""
    import ants

    native = nib.load(str(source))
    values = np.asarray(native.dataobj)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or values.min() < 0 or values.max() > 255:
        raise InputError(f"{source}: a label image must hold integer labels 0-255 (found values "
                         f"{float(values.min()):g} to {float(values.max()):g}, integers: "
                         f"{bool(np.all(values == np.round(values)))}); check config `label_image`.")
    warped = ants.apply_transforms(fixed, load_native(source)[0], [str(forward)], interpolator="genericLabel")
    data = np.rint(warped.numpy()).astype(np.uint8)
    image_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.nib_save(nib.Nifti1Image(data, affine), image_out)
    atomic.np_save(array_out, data[None])
    return data


def to_native(map_img: nib.Nifti1Image, native_path: Path, inverse: Path, interpolator: str = "linear") -> nib.Nifti1Image:
    """Resample a template-grid map onto the native grid of ``native_path`` (its header only is
    read) with the inverse transform; the result carries the native image's affine."""
    import ants

    native = nib.load(str(native_path))
    grid = ants_image(np.zeros(native.shape[:3], dtype=np.float32), native.affine)
    moving = ants_image(np.asarray(map_img.dataobj, dtype=np.float32), map_img.affine)
    warped = ants.apply_transforms(grid, moving, [str(inverse)], interpolator=interpolator)
    return nib.Nifti1Image(warped.numpy().astype(np.float32), native.affine)


def write_qc(data: np.ndarray, mask: nib.Nifti1Image, png: Path, title: str, subject: np.ndarray | None = None) -> None:
    """Sagittal, coronal and axial slices through the brain centre of the preprocessed image (on
    the template grid, RAS+) with the template brain outline in red and, when given, the sample's
    own brain mask (``subject``, on the same grid) in cyan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.intake.template import BRAIN_CENTRE_MM

    brain = np.asarray(mask.dataobj) > 0
    centre = np.rint(np.linalg.solve(mask.affine[:3, :3], BRAIN_CENTRE_MM - mask.affine[:3, 3])).astype(int)
    views = [("sagittal", lambda a: a[centre[0]]), ("coronal", lambda a: a[:, centre[1]]),
             ("axial", lambda a: a[:, :, centre[2]])]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), facecolor="black")
    for ax, (name, cut) in zip(axes, views):
        ax.imshow(cut(data).T, origin="lower", cmap="gray", vmin=-2, vmax=3)  # x/y right and up: RAS+ axes
        ax.contour(cut(brain).T.astype(float), levels=[0.5], colors="r", linewidths=0.8)
        if subject is not None and cut(subject).any():
            ax.contour(cut(subject).T.astype(float), levels=[0.5], colors="c", linewidths=0.8)
        ax.set_title(name, color="white", fontsize=9)
        ax.axis("off")
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout()
    atomic.savefig(fig, png, dpi=80, facecolor="black")
    plt.close(fig)


def _versions() -> str:
    """``antspyx 0.6.3, nibabel …, pipeline …``: one string, as BIDS has ``SoftwareVersions``."""
    from importlib.metadata import version

    from pipeline import __version__

    found = {**{name: version(name) for name in ("antspyx", "nibabel", "numpy")}, "pipeline": __version__}
    return ", ".join(f"{name} {number}" for name, number in found.items())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", type=Path, nargs="+", help="native images, one per channel, reference first")
    add_config(parser)  # preprocess, channels (in the order of SOURCES), on_error
    parser.add_argument("--template", type=Path, required=True, help="template on the study grid (NIfTI)")
    parser.add_argument("--mask", type=Path, required=True, help="brain mask on the study grid (NIfTI)")
    parser.add_argument("--out-dir", type=Path, required=True, help="derivatives root")
    parser.add_argument("--bids-dir", type=Path, help="the input dataset (the sidecars' Sources are BIDS URIs into it)")
    parser.add_argument("--subdir", required=True, help="sub-X[/ses-Y]")
    parser.add_argument("--image-id", required=True, help="sub-X[_ses-Y]")
    parser.add_argument("--label", type=Path, nargs="*", default=[],
                        help="the sample's label image (config label_image), or nothing")
    parser.add_argument("--brain-mask", type=Path, nargs="*", default=[],
                        help="the reference's brain mask (config brain_mask, with brain_extraction: derivatives), or nothing")
    parser.add_argument("--threads", type=int, default=1, help="ITK and extractor threads (1 is reproducible)")
    parser.add_argument("--excluded", type=Path, help="exclusion record (TSV) written either way; with on_error: "
                        "continue a failure is written there and the command exits 0")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # before ants is imported
    names, label = channel_names(args.config), (args.label[0] if args.label else None)
    out = derivative_paths(args.out_dir, args.subdir, args.image_id, names, label is not None)
    with InputError.exit_cleanly():
        sidecar = preprocess_or_exclude(args.sources, out, args.image_id, args.config["on_error"], args.excluded,
                                        template=args.template, mask=args.mask, channels=names,
                                        settings=args.config["preprocess"], label=label,
                                        brain_mask=args.brain_mask[0] if args.brain_mask else None, threads=args.threads,
                                        raw_dir=args.bids_dir)
    if sidecar is None:
        print(f"excluded {args.image_id}: see {args.excluded}", file=sys.stderr)
        return
    print(json.dumps(sidecar["QC"]), file=sys.stderr)


if __name__ == "__main__":
    main()
