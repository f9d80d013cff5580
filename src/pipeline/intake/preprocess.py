"""Fixed preprocessing of one sample (one or more channels) into the study's template grid (antspyx).

``preprocess`` builds the shared context (``pipeline.intake.steps.Context``: the grid, the
reference's native brain mask), runs the steps of ``pipeline.intake.steps.STEPS`` that the
settings turn on, in order, and writes what they leave; each sidecar's ``Steps`` are the entries
of the steps that ran.

The chain, per channel: reorient → N4 bias correction. The reference channel (the first) is
brain-extracted (``preprocess.brain_extraction``, ``pipeline.intake.brainmask``: its mask is
written on the image's native grid) and registered (rigid or affine) to the template grid; every
further channel is rigidly co-registered to the reference (mutual information) and carried to
the template through both transforms, smoothed first where the grid is coarser than the image
(anti-aliasing: without it a 4 mm grid samples a 2 mm image's noise at every fourth voxel instead
of averaging it). Then the template brain mask and z-score normalisation inside it, per channel,
with the mean and sd taken where the template mask and the sample's own brain mask (carried to the
grid) overlap. Writes per channel a BIDS-derivative NIfTI with a JSON sidecar; for the sample the forward and inverse transforms of
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

from pipeline.common import atomic
from pipeline.common.cli import add_config, channel_names
from pipeline.intake import brainmask, exclusions, qc
from pipeline.intake.derivatives import bids_uri
from pipeline.intake.geometry import ants_image, load_3d
from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE, derivative_paths
from pipeline.intake.recipe import active, sidecar_steps
from pipeline.intake.steps import Context, PreprocessSettings, load_native


def preprocess(sources: list[Path], template: Path, mask: Path, out: dict[str, Path], channels=("T1w",),
               settings: PreprocessSettings | None = None, label: Path | None = None, brain_mask: Path | None = None,
               threads: int = 1, raw_dir: Path | None = None) -> dict:
    """Run the chain (the steps of ``pipeline.intake.steps.STEPS`` that ``settings`` turn on) on the
    ``sources`` (one per channel, reference first) into the grid of ``template``; write all ``out``
    files; return the reference channel's sidecar. ``settings``: config ``preprocess``
    (``PreprocessSettings.of``; None: the schema's defaults). ``label``: the sample's label image
    (same space as the reference), written to ``out["label_image"]`` and ``out["label_array"]``.
    ``brain_mask``: the reference's mask from derivatives (``brain_extraction: derivatives``);
    ``threads``: the extractor's. ``raw_dir``: the input dataset, which the sidecars' ``Sources``
    are BIDS URIs into (``bids:raw:sub-…``; without it, ``file://`` URIs).

    Reproducible for a given ``seed`` (≥ 1) when ITK runs one thread: ITK reads
    ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` once, when ants is first imported (the CLI sets it).
    """
    import ants

    settings = PreprocessSettings.of({}) if settings is None else settings
    channels = list(channels)
    if len(sources) != len(channels):
        raise InputError(f"{len(sources)} images given for channels {channels}; give one image per channel.")
    if settings.seed < 1:
        raise InputError(f"The registration seed must be a positive integer (ANTs reads 0 as 'seed from the "
                         f"clock'), got {settings.seed}; set `preprocess.seed` in config.")
    ants.config.set_ants_deterministic(True, settings.seed)  # passes --random-seed to antsRegistration
    fixed = ants.image_read(str(template))
    mask_img = nib.load(str(mask))
    for path in out.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    native = brainmask.native_mask(settings.brain_extraction, sources[0], brain_mask, threads)
    c = Context(list(sources), channels, settings, out, fixed, mask_img, mask_img.get_fdata() > 0)
    native_ml = None
    if native is not None:
        native_ml = float(np.asarray(native.dataobj).sum() * abs(np.linalg.det(native.affine[:3, :3]))) / 1000
        atomic.nib_save(native, out["brain_mask"])  # the image's own affine: the same grid as load_native's
        c.native_brain = ants.reorient_image2(ants_image(np.asarray(native.dataobj), native.affine),
                                              ants.get_orientation(fixed))
    with tempfile.TemporaryDirectory() as c.tmp:  # ANTs writes its transforms under outprefix
        for step in active(settings.asdict()):
            step.run(c)
            c.ran.append(step)
    for channel, data in zip(channels, c.array):
        # The template grid's own RAS+ affine: the saved image is exactly on the study grid.
        atomic.nib_save(nib.Nifti1Image(data, mask_img.affine), out[f"image_{channel}"])
    atomic.np_save(out["array"], c.array)
    if label is not None:
        write_label(label, fixed, mask_img.affine, out["forward"], out["label_image"], out["label_array"])
    subject = c.subject if native is not None else None
    sidecars = {}
    for channel, source in zip(channels, sources):
        sidecars[channel] = {
            "Sources": [bids_uri(source, raw_dir) if raw_dir else Path(source).resolve().as_uri()],
            "Channel": channel,
            "SkullStripped": True,  # 0 outside the template brain mask (normalise); BIDS requires the key
            "SpatialReference": {"space": SPACE, "grid": str(template)},
            "Steps": sidecar_steps(c.ran, settings.asdict(), channels, channel),
            "Parameters": {k: getattr(settings, k) for k in PARAMETERS},
            "Geometry": c.placements[channel],
            "QC": (qc.scores(c.array[0], fixed.numpy(), c.brain, subject, spacing_mm=float(max(fixed.spacing)),
                             native_brain_ml=native_ml, in_view=c.in_view)
                   if channel == channels[0] else {}),  # pipeline.intake.qc: correlation, mutual information, Dice
            "Transforms": {"forward": out["forward"].name, "inverse": out["inverse"].name,
                           **({"to_reference": out[f"coreg_{channel}"].name} if channel != channels[0] else {})},
            "SoftwareVersions": _versions(),
        }
        atomic.write_text(out[f"sidecar_{channel}"], json.dumps(sidecars[channel], indent=2))
    similarity = float(np.corrcoef(c.array[0][c.brain], fixed.numpy()[c.brain])[0, 1])
    write_qc(c.array[0], mask_img, out["qc"], f"{Path(sources[0]).name}  r(template)={similarity:.2f}", subject)
    return sidecars[channels[0]]


PARAMETERS = ("transform", "n4", "n4_shrink_factor", "seed", "antialias", "brain_extraction",
              "registration_resolution")  # the sidecar's


def preprocess_or_exclude(sources: list[Path], out: dict[str, Path], image_id: str, on_error: str = "stop",
                          excluded: Path | None = None, *, settings: PreprocessSettings | None = None,
                          **inputs) -> dict | None:
    """``preprocess`` one sample; when it fails (unreadable data, registration error, an image
    unusable in the template grid) no partial output is left behind.

    ``on_error: stop`` raises InputError naming the image and the failure. ``continue`` excludes
    the sample (``exclude``: one row of ``excluded``, every ``out`` file empty) and returns None; a
    success writes ``excluded`` with its header only. ``settings`` (None: the schema's defaults) and
    ``inputs`` (template, mask, channels, label, …) are ``preprocess``'s. A sample
    that ``preprocess`` finished but whose reference scores below config ``preprocess.qc_min``
    (``pipeline.intake.qc``) is refused or excluded the same way, its sidecars and QC PNG kept
    where it is excluded.
    """
    settings = PreprocessSettings.of({}) if settings is None else settings
    try:
        sidecar = preprocess(sources, out=out, settings=settings, **inputs)
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
        return exclude(out, image_id, sources[0], reason, excluded)
    reason = qc.failure(sidecar["QC"], settings.qc_min, sources[0], out["qc"])
    if reason is None:
        if excluded is not None:
            exclusions.write(exclusions.empty(), excluded)
        return sidecar
    if on_error == "stop" or excluded is None:
        for path in out.values():
            path.unlink(missing_ok=True)
        raise InputError(f"{reason} ({image_id}; or set on_error: continue to exclude it and go on)")
    return exclude(out, image_id, sources[0], reason, excluded, keep_qc=True)


def exclude(out: dict[str, Path], image_id: str, source: Path, reason: str, excluded: Path,
            keep_qc: bool = False) -> None:
    """Exclude a sample (``on_error: continue``): write ``reason`` as its one row of ``excluded``
    (``pipeline.intake.exclusions``, stage ``preprocess``) and leave every ``out`` file empty (zero
    bytes: Snakemake needs its declared outputs, and an empty file fails loudly where a made-up
    image would not), but its sidecars (with the QC scores) and QC PNG with ``keep_qc`` (a sample
    excluded by quality control: they show why). Returns None, the sidecar of an excluded sample."""
    for role, path in out.items():
        if not (keep_qc and (role == "qc" or role.startswith("sidecar_"))):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_bytes(path, b"")
    exclusions.write(exclusions.record(image_id, image_id.split("_")[0], "preprocess", str(source), reason), excluded)
    return None


def write_label(source: Path, fixed, affine: np.ndarray, forward: Path, image_out: Path, array_out: Path) -> np.ndarray:
    """Carry the label image ``source`` onto the grid of ``fixed`` (the template, RAS+ ``affine``)
    with the reference's ``forward`` transform, nearest label (ANTs genericLabel); write a uint8
    NIfTI and a (1, X, Y, Z) uint8 array. Labels must be integers in 0-255."""
    import ants

    native = load_3d(source)
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
                                        settings=PreprocessSettings.of(args.config["preprocess"]),
                                        template=args.template, mask=args.mask, channels=names, label=label,
                                        brain_mask=args.brain_mask[0] if args.brain_mask else None, threads=args.threads,
                                        raw_dir=args.bids_dir)
    if sidecar is None:
        print(f"excluded {args.image_id}: see {args.excluded}", file=sys.stderr)
        return
    print(json.dumps(sidecar["QC"]), file=sys.stderr)


if __name__ == "__main__":
    main()
