"""Brain extraction before registration (config ``preprocess.brain_extraction``).

A whole-head image registered to the brain-only template squeezes skull and scalp into the
template's brain outline; extraction first leaves only the brain to register. Methods:

* ``none``: the image is brain-only already (the demo cohort); its brain mask is the template
  brain mask carried back to the image through the inverse registration;
* ``deepbet``: a learned extractor (deepbet, its weights inside its wheel: nothing is
  downloaded; CPU, 7-14 s and 1.2 GB per image, any voxel size: it works at 256^3);
* ``derivatives``: a mask from a derivatives folder (e.g. SynthStrip or FreeSurfer output),
  matched to each image by entities like ``label_image`` (config ``brain_mask``).

Every mask is a uint8 NIfTI on the image's own (native) grid, 1 inside the brain.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common.errors import InputError
from pipeline.intake.geometry import load_3d

METHODS = ("none", "deepbet", "derivatives")
BRAIN_ML = (300.0, 3000.0)  # a mask outside this volume found no brain (or the whole head)


def deepbet_mask(image: nib.Nifti1Image, threads: int = 1) -> np.ndarray:
    """Boolean brain mask of ``image`` (its own grid and voxel order) by deepbet on the CPU."""
    import torch
    from deepbet import BrainExtraction

    torch.set_num_threads(max(int(threads), 1))
    data = np.asarray(image.dataobj, dtype=np.float32)
    image = nib.Nifti1Image(np.nan_to_num(data), image.affine, image.header)
    _, mask, _ = BrainExtraction(no_gpu=True).run(image)
    return np.asarray(mask.dataobj) > 0


def derivative_mask(path: Path, image: nib.Nifti1Image, source: Path) -> np.ndarray:
    """Boolean mask (> 0) of the NIfTI ``path``, which must share the grid of ``image`` (``source``)."""
    try:
        mask = load_3d(path)
        values = np.asarray(mask.dataobj)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"{path}: cannot read this brain mask ({type(exc).__name__}: {exc}); "
                         "check config `brain_mask`.") from exc
    if values.shape[:3] != image.shape[:3] or not np.allclose(mask.affine, image.affine, atol=1e-3):
        raise InputError(f"{path}: the brain mask's grid (shape {values.shape[:3]}) differs from its image "
                         f"{source} (shape {image.shape[:3]}) or their affines differ; masks must be on the "
                         "image's own grid (check config `brain_mask.filters`).")
    return values.reshape(values.shape[:3]) > 0


def native_mask(method: str, source: Path, mask_source: Path | None = None, threads: int = 1) -> nib.Nifti1Image | None:
    """The brain mask of ``source`` (uint8, its native grid) by ``method``; None for ``none`` (its
    mask comes from the template, after registration). Fails, naming the file, when the mask holds
    no plausible brain (``BRAIN_ML``)."""
    if method == "none":
        return None
    if method not in METHODS:
        raise InputError(f"preprocess.brain_extraction must be one of {list(METHODS)}, not {method!r}.")
    image = load_3d(source)  # a trailing singleton axis dropped: the mask is 3D like the image ANTs gets
    if method == "deepbet":
        mask = deepbet_mask(image, threads)
    elif mask_source is None:
        raise InputError(f"{source}: `preprocess.brain_extraction: derivatives` needs a brain mask for this image "
                         "(config `brain_mask`), and none was given.")
    else:
        mask = derivative_mask(mask_source, image, source)
    volume_ml = float(mask.sum() * abs(np.linalg.det(image.affine[:3, :3]))) / 1000
    if not BRAIN_ML[0] <= volume_ml <= BRAIN_ML[1]:
        raise InputError(f"{source}: brain extraction ({method}) found {volume_ml:.0f} ml of brain, outside the "
                         f"plausible {BRAIN_ML[0]:.0f}-{BRAIN_ML[1]:.0f} ml: no brain found (or the whole head). "
                         "Check the image, or exclude it.")
    return nib.Nifti1Image(mask.astype(np.uint8), image.affine)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean arrays (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def problems(config: dict) -> list[str]:
    """Config problems across keys: ``brain_extraction: derivatives`` without ``brain_mask``, and
    a ``brain_mask`` that no method would read."""
    method, masks = config["preprocess"]["brain_extraction"], config.get("brain_mask")
    if method == "derivatives" and not masks:
        return ["config `preprocess.brain_extraction: derivatives` needs config `brain_mask` (e.g. {derivatives: "
                "derivatives/synthstrip, filters: {suffix: mask, desc: brain}}); set it, or choose deepbet or none."]
    if masks and method != "derivatives":
        return [f"config `brain_mask` is set but `preprocess.brain_extraction` is {method!r}: the masks would not be "
                "used. Did you mean `preprocess.brain_extraction: derivatives`? Or set `brain_mask: null`."]
    if masks and config.get("non_bids"):
        return ["config `brain_mask` needs a BIDS dataset (entities to match); with `non_bids` use deepbet or none."]
    return []
