"""The preprocessing chain, as one list: ``STEPS``, each a ``Step`` that runs over a shared ``Context``.

``pipeline.intake.preprocess`` builds the context (the template grid, the sample's native brain
mask), runs ``active(settings.asdict())`` in order and writes what they leave; the recipe's
``steps`` (``pipeline.intake.recipe``) are the words of the same active steps, and each sidecar's
``Steps`` the entries of the steps that ran. Adding a step is one ``Step`` here (its words, its sidecar
entry, its ``run``) and, when a config key turns it on, that key in the schema's ``preprocess``
section (and in ``recipe.COMPARED`` if it changes the images).

The chain reads config ``preprocess`` as one ``PreprocessSettings`` (``PreprocessSettings.of``:
the schema's defaults for what the config leaves out), built once by the caller.

Imports: the standard library, numpy and ``pipeline.common.config`` at module level (the
Snakefile reads the words through ``recipe``); ANTs, nibabel and the chain's own helpers inside
the functions that use them.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.common import config
from pipeline.common.errors import InputError

OFF = (False, None, "none")  # a step's key with one of these values turns it off


@dataclass(frozen=True)
class PreprocessSettings:
    """Config ``preprocess`` (keys and meanings: config/README.md). ``resolution``: the study grid's
    voxel size (mm) and ``shape`` its voxels (read by the grid; the chain takes the grid from its
    template); ``registration_resolution`` None: register on the grid itself; ``qc_min`` None:
    no registration score excludes a sample."""

    resolution: float
    shape: list[int]
    transform: str
    registration_resolution: float | None
    n4: bool
    n4_shrink_factor: int
    seed: int
    antialias: bool
    brain_extraction: str
    qc_min: float | None

    @classmethod
    def of(cls, preprocess: dict) -> "PreprocessSettings":
        """The settings of config ``preprocess`` (a key it leaves out: the schema's default; an
        unknown key: an InputError naming it)."""
        return config.build(cls, ["preprocess"], preprocess)

    def asdict(self) -> dict:
        """The settings as config ``preprocess``'s mapping (the recipe's words and sidecar entries
        are filled from it)."""
        return asdict(self)


@dataclass
class Context:
    """What the steps share for one sample: the inputs and settings, the template grid, and each
    channel's image as the chain carries it (``images``: an ANTs image, then the normalised array
    on the grid). ``tmp``: a folder for ANTs' transform files; ``ran``: the steps that ran."""

    sources: list[Path]
    channels: list[str]
    settings: PreprocessSettings
    out: dict[str, Path]
    fixed: Any  # the template on the study grid (ANTs)
    mask_img: Any  # the template brain mask on the study grid (nibabel)
    brain: np.ndarray  # its voxels, True inside
    native_brain: Any = None  # the reference's brain mask on its native grid, reoriented (ANTs), or None
    tmp: str = ""
    images: dict = field(default_factory=dict)
    placements: dict = field(default_factory=dict)
    transforms: dict = field(default_factory=dict)  # per channel, to the grid (applied right to left)
    subject: np.ndarray | None = None  # the sample's brain mask on the grid (uint8)
    in_view: np.ndarray | None = None  # the reference's field of view on the grid (``in_view``)
    array: np.ndarray | None = None  # (C, X, Y, Z) float32
    ran: list = field(default_factory=list)

    @property
    def reference(self) -> str:
        return self.channels[0]


@dataclass(frozen=True)
class Step:
    """One step of the chain. ``recipe``: the step in words for the recipe and the model card
    (``{reference}``, ``{channel}`` and the preprocess keys filled in); ``sidecar``: the entries it
    adds to each channel's sidecar ``Steps``; ``key``: the config ``preprocess`` key that turns it
    on (None: always); ``further``: said once per channel after the reference (``further_only``:
    entries only in those channels' sidecars, ``reference_only``: only in the reference's);
    ``run``: what it does to the ``Context``."""

    name: str
    recipe: str
    sidecar: tuple[str, ...] = ()
    key: str | None = None
    further: bool = False
    further_only: bool = False
    reference_only: bool = False
    run: Callable[[Context], None] | None = None

    def words(self, settings: dict, channels: list[str]) -> list[str]:
        """The step in the recipe's words (one line per further channel when ``further``)."""
        targets = channels[1:] if self.further else [None]
        return [self.recipe.format(reference=channels[0], channel=c, **settings) for c in targets]

    def entries(self, settings: dict, channels: list[str], channel: str) -> list[str]:
        """What it adds to the ``Steps`` of ``channel``'s sidecar."""
        further = channel != channels[0]
        if (self.further_only and not further) or (self.reference_only and further):
            return []
        return [entry.format(reference=channels[0], **settings) for entry in self.sidecar]


def load_native(path: Path):
    """Read a 3D image into ANTs, placed by ``pipeline.intake.geometry``'s rule, failing with a
    message that names the file; returns the image and its placement."""
    from pipeline.intake.geometry import ants_native, load_3d

    try:
        return ants_native(path, load_3d(path))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read this NIfTI ({type(exc).__name__}: {exc}). Replace or exclude it.") from exc


def reorient(c: Context) -> None:
    """Read each channel (placed by ``pipeline.intake.geometry``'s rule), reoriented to the template's axes."""
    import ants

    from pipeline.intake.geometry import DISAGREE_MM

    orientation = ants.get_orientation(c.fixed)
    for channel, source in zip(c.channels, c.sources):
        native, c.placements[channel] = load_native(source)
        if (c.placements[channel]["qform_sform_mm"] or 0) > DISAGREE_MM:
            print(f"warning: {source}: its qform and sform place it up to {c.placements[channel]['qform_sform_mm']} "
                  "mm apart; the sform is used (pipeline.intake.geometry)", file=sys.stderr)
        c.images[channel] = ants.reorient_image2(native, orientation)


def n4(c: Context) -> None:
    """N4 bias-field correction, fitted inside the brain mask when there is one (the reference's
    native mask; else ANTs' own head mask, get_mask, which costs ~10 s at 1 mm and fits scalp and
    neck too)."""
    import ants

    for channel in c.channels:
        image = c.images[channel]
        brain = c.native_brain if channel == c.reference else None
        c.images[channel] = ants.n4_bias_field_correction(
            image, mask=brain if brain is not None else ants.get_mask(image),
            shrink_factor=c.settings.n4_shrink_factor, convergence={"iters": [50, 50, 30], "tol": 1e-6})


def extract(c: Context) -> None:
    """Zero the reference outside its native brain mask."""
    if c.native_brain is None:
        return
    image = c.images[c.reference]
    inside = c.native_brain.numpy() > 0
    c.images[c.reference] = image.new_image_like(np.where(inside, image.numpy(), 0.0).astype(np.float32))


def scale(c: Context) -> None:
    """Divide each channel by its 99th intensity percentile (the reference's inside its brain mask
    when extracted): the template's intensity range, ~[0, 1]."""
    for channel, source in zip(c.channels, c.sources):
        values = c.images[channel].numpy()
        if channel == c.reference and c.native_brain is not None:
            values = values[c.native_brain.numpy() > 0]
        factor = float(np.percentile(values, 99))
        if not np.isfinite(factor) or factor <= 0:
            raise InputError(f"{source}: 99 % of its voxels are 0 or less after reorientation"
                             f"{' and N4' if c.settings.n4 else ''} (an empty or mostly-background image), so it "
                             "cannot be scaled or registered; check the image and replace it, or leave the participant "
                             "out (participants.exclude).")
        c.images[channel] = c.images[channel] / factor


def coregister(c: Context) -> None:
    """Rigid co-registration (mutual information) of every further channel to the reference; its
    transform to the grid is the reference's forward transform after it."""
    import ants

    from pipeline.common import atomic

    for channel in c.channels[1:]:
        coreg = ants.registration(fixed=c.images[c.reference], moving=c.images[channel], type_of_transform="Rigid",
                                  outprefix=f"{c.tmp}/{channel}_", aff_random_sampling_rate=0.25)
        atomic.copyfile(coreg["fwdtransforms"][0], c.out[f"coreg_{channel}"])
        c.transforms[channel] = [str(c.out["forward"]), str(c.out[f"coreg_{channel}"])]


def register_reference(c: Context) -> None:
    """Register the reference to the template (``register``), write the forward and inverse
    transforms, carry the sample's brain mask onto the grid (``brain_on_grid``) and the
    reference's field of view (``in_view``, for quality control)."""
    import ants

    from pipeline.common import atomic

    forward = register(registration_template(c.fixed, c.settings.registration_resolution), c.images[c.reference],
                       c.settings.transform, f"{c.tmp}/ref_")
    atomic.copyfile(forward, c.out["forward"])
    with atomic.path(c.out["inverse"]) as partial:
        ants.write_transform(ants.read_transform(forward).invert(), str(partial))
    c.transforms[c.reference] = [str(c.out["forward"])]
    c.subject = brain_on_grid(c.native_brain, c.fixed, c.out, c.mask_img, c.sources[0])
    c.in_view = in_view(c.fixed, c.images[c.reference], c.out["forward"])


def antialias(c: Context) -> None:
    """Smooth every channel where the grid is coarser than its voxels (``antialiased``)."""
    for channel in c.channels:
        c.images[channel] = antialiased(c.images[channel], max(c.fixed.spacing))


def resample(c: Context) -> None:
    """Every channel onto the template grid through its transforms (linear)."""
    import ants

    for channel in c.channels:
        c.images[channel] = ants.apply_transforms(c.fixed, c.images[channel], c.transforms[channel],
                                                  interpolator="linear")


def zscore(c: Context) -> None:
    """Each channel z-scored inside the template brain mask (``normalise``), an array on the grid."""
    for channel, source in zip(c.channels, c.sources):
        c.images[channel] = normalise(c.images[channel].numpy(), c.brain, source, c.subject)


def stack(c: Context) -> None:
    """The channels as one (C, X, Y, Z) float32 array."""
    c.array = np.stack([c.images[channel] for channel in c.channels])


STEPS = (
    Step("reorient", "read each channel (ANTs), reorient to the template's axes", ("reorient",), run=reorient),
    Step("n4", "N4 bias-field correction (shrink factor {n4_shrink_factor})", ("N4BiasFieldCorrection",), key="n4",
         run=n4),
    Step("extract", "brain extraction of {reference} ({brain_extraction}; pipeline.intake.brainmask): zero outside "
         "its brain mask, written on the native grid", ("brain extraction ({brain_extraction})",), key="brain_extraction",
         reference_only=True, run=extract),
    Step("scale", "divide by the image's 99th intensity percentile (inside the brain mask when extracted)", run=scale),
    Step("coregister", "rigid co-registration of {channel} to {reference} (ANTs)",
         ("ants.registration:Rigid to {reference}",), further=True, further_only=True, run=coregister),
    Step("register", "ANTs registration of {reference} to the template, rigid from the centres of mass then "
         "{transform} (working resolution {registration_resolution} mm, none: the grid's; seed {seed}, one ITK thread)",
         ("ants.registration:{transform} to template",), run=register_reference),
    Step("antialias", "Gaussian anti-aliasing of every channel where the grid is coarser than its voxels "
         "(FWHM sqrt(grid^2 - voxel^2) per axis)", ("anti-aliasing Gaussian (FWHM sqrt(grid^2 - voxel^2))",),
         key="antialias", run=antialias),
    Step("resample", "linear resampling of every channel onto the template grid (grid/template.nii.gz)", run=resample),
    Step("normalise", "z-score each channel inside the template brain mask (grid/brain_mask.nii.gz), its mean and "
         "sd where the sample's brain mask overlaps it; 0 outside",
         ("template brain mask", "z-score inside mask"), run=zscore),
    Step("stack", "stack the channels: a (C, X, Y, Z) float32 array", run=stack),
)


def active(settings: dict) -> list[Step]:
    """The steps that run with config ``preprocess`` ``settings`` (a mapping holding every step's
    key: ``PreprocessSettings.asdict()``, or a recipe's keys), in order."""
    return [step for step in STEPS if step.key is None or settings[step.key] not in OFF]


def normalise(data: np.ndarray, mask: np.ndarray, source: Path, stats: np.ndarray | None = None) -> np.ndarray:
    """Z-score ``data`` with the mean and sd inside ``stats`` (default: ``mask``); 0 outside ``mask``."""
    inside = data[(mask > 0) if stats is None else (mask > 0) & (stats > 0)]
    sd = inside.std()
    if not np.isfinite(sd) or sd == 0:
        raise InputError(f"{source}: the image is constant or not finite inside the template brain mask after "
                         "registration; check the image (or its registration in the QC PNG) and exclude it.")
    return np.where(mask > 0, (data - inside.mean()) / sd, 0.0).astype(np.float32)


def registration_template(fixed, resolution: float | None):
    """The image the reference is registered to: the study grid's template ``fixed`` when
    ``resolution`` (mm) is None or not finer than the grid, else the bundled template over the
    same extent (centred on the brain) at ``resolution`` mm, so registration sees the anatomy at a
    working resolution whatever the study grid."""
    from pipeline.intake.geometry import ants_image
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


def brain_on_grid(native_brain, fixed, out: dict[str, Path], mask_img, source: Path) -> np.ndarray:
    """The sample's brain mask on the template grid (uint8). With a native mask (``native_brain``,
    an ANTs image) it is carried forward (linear, > 0.5); without one (``brain_extraction: none``)
    the template's mask is the sample's, and it is carried back to write ``out["brain_mask"]``."""
    import ants
    import nibabel as nib

    from pipeline.common import atomic
    from pipeline.intake.geometry import to_native

    if native_brain is None:
        back = to_native(mask_img, source, out["inverse"], interpolator="genericLabel")
        atomic.nib_save(nib.Nifti1Image(np.rint(back.get_fdata()).astype(np.uint8), back.affine), out["brain_mask"])
        return np.asarray(mask_img.dataobj).astype(np.uint8)
    warped = ants.apply_transforms(fixed, native_brain, [str(out["forward"])], interpolator="linear")
    return (warped.numpy() > 0.5).astype(np.uint8)


def in_view(fixed, reference, forward: Path) -> np.ndarray:
    """The field of view of ``reference`` (an ANTs image) carried to the grid of ``fixed`` by the
    ``forward`` transform: True where the image has data (linear, > 0.5). A brain whose top the
    field of view cut off leaves part of the template brain outside it, however well the rest fits."""
    import ants

    ones = reference.new_image_like(np.ones(reference.shape, dtype=np.float32))
    return ants.apply_transforms(fixed, ones, [str(forward)], interpolator="linear").numpy() > 0.5
