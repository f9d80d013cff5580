"""The preprocessing recipe: how a model's input images are prepared, as a plain dict.

Standard library only: the Snakefile imports it. A model package carries the recipe of its study
(``preprocessing.json``); fine-tuning checks the new study's recipe against it and applying a
package prepares new images with it.

>>> r = from_config({"resolution": 4, "shape": [40, 48, 40], "transform": "Affine", "n4": True,
...                  "n4_shrink_factor": 4, "seed": 1, "antialias": True}, {"T1w": {"suffix": "T1w"}},
...                 {"datatype": "anat"})
>>> mismatches(r, {**r, "resolution": 8.0})
['resolution: package 4.0, study 8.0']
"""

from __future__ import annotations

from pipeline.common.paths import SPACE

TEMPLATE = "MNI ICBM152 2009a symmetric T1w, 1 mm, as bundled with nilearn (pipeline.template)"
# Keys that must be equal for images to be prepared the same way. The registration seed is not
# among them: any seed gives an equivalent registration.
COMPARED = ("space", "resolution", "shape", "transform", "n4", "n4_shrink_factor", "antialias", "channels")
# Keys added after packages were first written, with the value that packages without them used.
INTRODUCED = {"antialias": False}


def steps(channels: list[str], transform: str, n4: bool, n4_shrink: int, seed: int,
          antialias: bool = False) -> list[str]:
    """The preprocessing chain of ``pipeline.preprocess``, in words, in order."""
    chain = ["read each channel (ANTs), reorient to the template's axes"]
    if n4:
        chain.append(f"N4 bias-field correction (shrink factor {n4_shrink})")
    chain.append("divide by the image's 99th intensity percentile")
    chain += [f"rigid co-registration of {c} to {channels[0]} (ANTs)" for c in channels[1:]]
    chain += [f"ANTs {transform} registration of {channels[0]} to the template (seed {seed}, one ITK thread)",
              *(["Gaussian anti-aliasing of every channel where the grid is coarser than its voxels "
                 "(FWHM sqrt(grid^2 - voxel^2) per axis)"] if antialias else []),
              "linear resampling of every channel onto the template grid (grid/template.nii.gz)",
              "z-score each channel inside the template brain mask (grid/brain_mask.nii.gz); 0 outside",
              "stack the channels: a (C, X, Y, Z) float32 array"]
    return chain


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
        "channels": names,
        "selection": {"bids_filters": bids_filters, "channels": channels},
        "steps": steps(names, preprocess["transform"], preprocess["n4"], preprocess["n4_shrink_factor"],
                       preprocess["seed"], preprocess["antialias"]),
        "normalisation": "per image and channel: z-score inside the template brain mask, 0 outside",
    }


def config_keys(recipe: dict) -> dict:
    """The config keys (``preprocess``, ``channels``, ``bids_filters``) that reproduce ``recipe``."""
    keys = ("resolution", "shape", "transform", "n4", "n4_shrink_factor", "seed", "antialias")
    return {"preprocess": {k: recipe.get(k, INTRODUCED.get(k)) for k in keys}, "channels": recipe["selection"]["channels"],
            "bids_filters": recipe["selection"]["bids_filters"]}


def compared(recipe: dict) -> dict:
    """The keys of ``recipe`` that ``mismatches`` compares."""
    return {key: recipe.get(key, INTRODUCED.get(key)) for key in COMPARED}


def mismatches(package: dict, study: dict) -> list[str]:
    """``'<key>: package <value>, study <value>'`` for every compared key that differs."""
    package, study = compared(package), compared(study)
    return [f"{key}: package {package[key]}, study {study[key]}" for key in COMPARED if package[key] != study[key]]
