"""The preprocessing recipe: how a model's input images are prepared, as a plain dict.

Standard library only: the Snakefile imports it. A model package carries the recipe of its study
(``preprocessing.json``); fine-tuning checks the new study's recipe against it and applying a
package prepares new images with it.

>>> r = from_config({"resolution": 4, "shape": [40, 48, 40], "transform": "Affine", "n4": True,
...                  "n4_shrink_factor": 4, "seed": 1, "antialias": True, "brain_extraction": "none"},
...                 {"T1w": {"suffix": "T1w"}},
...                 {"datatype": "anat"})
>>> mismatches(r, {**r, "resolution": 8.0})
['resolution: package 4.0, study 8.0']
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.common.paths import SPACE

TEMPLATE = "MNI ICBM152 2009a symmetric T1w, 1 mm, as bundled with nilearn (pipeline.intake.template)"
# Keys that must be equal for images to be prepared the same way. The registration seed is not
# among them: any seed gives an equivalent registration.
COMPARED = ("space", "resolution", "shape", "transform", "n4", "n4_shrink_factor", "antialias", "brain_extraction",
            "registration_resolution", "channels")
# Keys added after packages were first written, with the value that packages without them used.
INTRODUCED = {"antialias": False, "brain_extraction": "none", "registration_resolution": None, "qc_min": None}
OFF = (False, None, "none")  # a step's key with one of these values turns it off


@dataclass(frozen=True)
class Step:
    """One step of the preprocessing chain (``pipeline.intake.preprocess`` runs them in this order).

    ``key``: the config ``preprocess`` key that turns it on (None: always); ``recipe``: the step in
    words for the recipe and the model card (``{reference}``, ``{channel}`` and the preprocess
    keys filled in); ``further``: done once per channel after the reference; ``sidecar``: the
    entries it adds to each channel's sidecar ``Steps`` (``further_only``: only in those channels';
    ``reference_only``: only in the reference's)."""

    name: str
    recipe: str
    sidecar: tuple[str, ...] = ()
    key: str | None = None
    further: bool = False
    further_only: bool = False
    reference_only: bool = False


STEPS = (
    Step("reorient", "read each channel (ANTs), reorient to the template's axes", ("reorient",)),
    Step("n4", "N4 bias-field correction (shrink factor {n4_shrink_factor})", ("N4BiasFieldCorrection",), key="n4"),
    Step("extract", "brain extraction of {reference} ({brain_extraction}; pipeline.intake.brainmask): zero outside "
         "its brain mask, written on the native grid", ("brain extraction ({brain_extraction})",), key="brain_extraction",
         reference_only=True),
    Step("scale", "divide by the image's 99th intensity percentile (inside the brain mask when extracted)"),
    Step("coregister", "rigid co-registration of {channel} to {reference} (ANTs)",
         ("ants.registration:Rigid to {reference}",), further=True, further_only=True),
    Step("register", "ANTs registration of {reference} to the template, rigid from the centres of mass then "
         "{transform} (working resolution {registration_resolution} mm, none: the grid's; seed {seed}, one ITK thread)",
         ("ants.registration:{transform} to template",)),
    Step("antialias", "Gaussian anti-aliasing of every channel where the grid is coarser than its voxels "
         "(FWHM sqrt(grid^2 - voxel^2) per axis)", ("anti-aliasing Gaussian (FWHM sqrt(grid^2 - voxel^2))",),
         key="antialias"),
    Step("resample", "linear resampling of every channel onto the template grid (grid/template.nii.gz)"),
    Step("normalise", "z-score each channel inside the template brain mask (grid/brain_mask.nii.gz), its mean and "
         "sd where the sample's brain mask overlaps it; 0 outside",
         ("template brain mask", "z-score inside mask")),
    Step("stack", "stack the channels: a (C, X, Y, Z) float32 array"),
)


def active(settings: dict) -> list[Step]:
    """The steps that run with config ``preprocess`` ``settings``."""
    return [step for step in STEPS if step.key is None or settings.get(step.key, INTRODUCED.get(step.key)) not in OFF]


def steps(settings: dict, channels: list[str]) -> list[str]:
    """The preprocessing chain, in words, in order (the recipe's ``steps``)."""
    chain = []
    for step in active(settings):
        targets = channels[1:] if step.further else [None]
        chain += [step.recipe.format(reference=channels[0], channel=c, **{**INTRODUCED, **settings}) for c in targets]
    return chain


def sidecar_steps(settings: dict, channels: list[str], channel: str) -> list[str]:
    """The ``Steps`` of ``channel``'s sidecar."""
    further = channel != channels[0]
    return [entry.format(reference=channels[0], **settings) for step in active(settings)
            if (further or not step.further_only) and not (further and step.reference_only) for entry in step.sidecar]


def from_config(preprocess: dict, channels: dict, bids_filters: dict) -> dict:
    """The recipe of a study from its config keys ``preprocess``, ``channels`` and ``bids_filters``."""
    names = list(channels)
    return {
        "space": SPACE,
        "template": TEMPLATE,
        "resolution": float(preprocess["resolution"]),
        "shape": [int(n) for n in preprocess["shape"]],
        "transform": preprocess["transform"],
        "n4": bool(preprocess["n4"]),
        "n4_shrink_factor": int(preprocess["n4_shrink_factor"]),
        "seed": int(preprocess["seed"]),
        "antialias": bool(preprocess["antialias"]),
        "brain_extraction": preprocess.get("brain_extraction", INTRODUCED["brain_extraction"]),
        "registration_resolution": preprocess.get("registration_resolution", INTRODUCED["registration_resolution"]),
        # Not compared: it excludes badly registered images but prepares the others no differently.
        "qc_min": preprocess.get("qc_min", INTRODUCED["qc_min"]),
        "channels": names,
        "selection": {"bids_filters": bids_filters, "channels": channels},
        "steps": steps(preprocess, names),
        "normalisation": "per image and channel: z-score inside the template brain mask, 0 outside",
    }


INTENSITIES = {"zscore": "per image and channel: z-score inside the template brain mask, 0 outside",
               "mean": "per image: divide by the mean intensity (SFCN's)",
               "minmax": "per image: scale to [0, 1] (min-max)"}


BRAIN_EXTRACTIONS = ("none", "deepbet", "derivatives")  # config preprocess.brain_extraction (intake.brainmask.METHODS)


def unproducible(recipe: dict) -> list[str]:
    """What of a (declared, imported) recipe this pipeline's preprocessing cannot make, one line
    each (empty: it makes exactly that input): another template space, a cropped grid, another
    brain extraction method or intensity normalisation than ours."""
    problems = []
    if recipe.get("space", SPACE) != SPACE:
        problems.append(f"space: the model expects {recipe['space']}, this pipeline registers to {SPACE}")
    if recipe.get("crop"):
        problems.append(f"crop: the model expects the crop {recipe['crop']} of its template grid, this pipeline "
                        f"makes a grid of shape {recipe.get('shape')} centred on the brain")
    if recipe.get("brain_extraction", "none") not in BRAIN_EXTRACTIONS:
        problems.append(f"brain extraction: the model expects {recipe['brain_extraction']}, this pipeline offers "
                        f"{', '.join(BRAIN_EXTRACTIONS)}")
    intensity = recipe.get("intensity", "zscore")
    if intensity != "zscore":
        problems.append(f"intensity: the model expects {INTENSITIES.get(intensity, intensity)}, this pipeline "
                        f"makes {INTENSITIES['zscore']}")
    return problems


def config_keys(recipe: dict) -> dict:
    """The config keys (``preprocess``, ``channels``, ``bids_filters``) that reproduce ``recipe``."""
    keys = ("resolution", "shape", "transform", "n4", "n4_shrink_factor", "seed", "antialias", "brain_extraction",
            "registration_resolution", "qc_min")
    return {"preprocess": {k: recipe.get(k, INTRODUCED.get(k)) for k in keys}, "channels": recipe["selection"]["channels"],
            "bids_filters": recipe["selection"]["bids_filters"]}


def compared(recipe: dict) -> dict:
    """The keys of ``recipe`` that ``mismatches`` compares."""
    return {key: recipe.get(key, INTRODUCED.get(key)) for key in COMPARED}


def mismatches(package: dict, study: dict) -> list[str]:
    """``'<key>: package <value>, study <value>'`` for every compared key that differs."""
    package, study = compared(package), compared(study)
    return [f"{key}: package {package[key]}, study {study[key]}" for key in COMPARED if package[key] != study[key]]
