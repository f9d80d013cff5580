"""The preprocessing recipe: how a model's input images are prepared, as a plain dict.

The Snakefile imports it (and, for the words of the chain, ``pipeline.intake.steps``, which loads
numpy but neither ANTs nor nibabel). A model package carries the recipe of its study
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

from pipeline.common.paths import SPACE
from pipeline.intake import steps as steps_module
from pipeline.intake.steps import Step

TEMPLATE = "MNI ICBM152 2009a symmetric T1w, 1 mm, as bundled with nilearn (pipeline.intake.template)"
# Keys that must be equal for images to be prepared the same way. The registration seed is not
# among them: any seed gives an equivalent registration.
COMPARED = ("space", "resolution", "shape", "transform", "n4", "n4_shrink_factor", "antialias", "brain_extraction",
            "registration_resolution", "channels")
# What an imported package's recipe declares (``bids-deepstudy import``): the input itself, not how
# the study computes it (N4, registration settings, anti-aliasing are the study's own choice).
DECLARED = ("space", "resolution", "shape", "brain_extraction", "channels")
# Keys added after packages were first written, with the value that packages without them used.
INTRODUCED = {"antialias": False, "brain_extraction": "none", "registration_resolution": None, "qc_min": None}


def active(settings: dict) -> list[Step]:
    """The steps of the chain (``pipeline.intake.steps.STEPS``) that run with config ``preprocess``
    ``settings`` (a key it leaves out: its value in packages written before it, ``INTRODUCED``)."""
    return steps_module.active({**INTRODUCED, **settings})


def words(ran: list[Step], settings: dict, channels: list[str]) -> list[str]:
    """The recipe's ``steps``: the words of the steps ``ran`` (or that will run), in order."""
    return [line for step in ran for line in step.words({**INTRODUCED, **settings}, channels)]


def steps(settings: dict, channels: list[str]) -> list[str]:
    """The preprocessing chain, in words, in order (the recipe's ``steps``): the words of the
    steps that ``pipeline.intake.preprocess`` runs with ``settings``."""
    return words(active(settings), settings, channels)


def sidecar_steps(ran: list[Step], settings: dict, channels: list[str], channel: str) -> list[str]:
    """The ``Steps`` of ``channel``'s sidecar: the entries of the steps that ``ran``, in order."""
    return [entry for step in ran for entry in step.entries(settings, channels, channel)]


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
    """``'<key>: package <value>, study <value>'`` for every compared key that differs (of an
    imported package's recipe, only the ``DECLARED`` input)."""
    keys = DECLARED if package.get("imported") else COMPARED
    package, study = compared(package), compared(study)
    return [f"{key}: package {package[key]}, study {study[key]}" for key in keys if package[key] != study[key]]
