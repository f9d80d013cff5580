"""Every per-image path the study writes, built from entities in one place.

Standard library only: the Snakefile imports it to declare the same paths as outputs (pass
``"{subdir}"`` and ``"{image}"`` to get wildcard patterns). Names follow BIDS derivatives:
``sub-X/[ses-Y/]anat/<image_id>_space-<SPACE>_desc-<desc>_<suffix>.<ext>``.
"""

from __future__ import annotations

from pathlib import Path

SPACE = "MNI152NLin2009aSym"


def desc(method: str) -> str:
    """The ``desc-`` label of an explanation method's files: its name with only letters and digits
    (``integrated_gradients`` → ``integratedgradients``), since a BIDS entity value may hold neither
    ``_`` nor ``-`` (pybids would read ``desc-integrated_gradients`` as ``desc-integrated``). Every
    map, group map and figure name goes through here; config, tables and the report keep the
    method's own name."""
    label = "".join(c for c in method if c.isalnum())
    if not label:
        raise ValueError(f"Method name {method!r} has no letter or digit to make a desc- label of.")
    return label


def preprocessed(root: str, subdir: str, image_id: str, channels: tuple[str, ...] | list[str] = ("T1w",),
                 label: bool = False) -> dict[str, str]:
    """Files preprocessing writes for one sample, by role.

    ``image_<channel>`` and ``sidecar_<channel>``: each channel on the template grid (NIfTI + JSON);
    ``array``: all channels stacked, (C, X, Y, Z) float32 ``.npy``; ``forward``/``inverse``: the
    reference channel's (the first) affine to and from the template; ``coreg_<channel>``: each
    further channel's rigid transform onto the reference; ``qc``: a PNG of the reference;
    ``brain_mask``: the reference's brain mask on its native grid (uint8 NIfTI).
    With ``label`` (config ``label_image``): ``label_image``, the sample's label image on the
    template grid (uint8 NIfTI, nearest-neighbour labels), and ``label_array``, the same as a
    (1, X, Y, Z) uint8 ``.npy``.
    """
    stem = f"{root}/{subdir}/anat/{image_id}"
    reference = channels[0]
    paths = {
        "array": f"{stem}_space-{SPACE}_desc-preproc_{''.join(channels)}.npy",
        "forward": f"{stem}_from-{reference}_to-{SPACE}_mode-image_xfm.mat",
        "inverse": f"{stem}_from-{SPACE}_to-{reference}_mode-image_xfm.mat",
        "qc": f"{stem}_space-{SPACE}_desc-qc_{reference}.png",
        "brain_mask": f"{stem}_desc-brain_mask.nii.gz",
    }
    for channel in channels:
        paths[f"image_{channel}"] = f"{stem}_space-{SPACE}_desc-preproc_{channel}.nii.gz"
        paths[f"sidecar_{channel}"] = f"{stem}_space-{SPACE}_desc-preproc_{channel}.json"
    for channel in channels[1:]:
        paths[f"coreg_{channel}"] = f"{stem}_from-{channel}_to-{reference}_mode-image_xfm.mat"
    if label:
        paths["label_image"] = f"{stem}_space-{SPACE}_desc-label_dseg.nii.gz"
        paths["label_array"] = f"{stem}_space-{SPACE}_desc-label_dseg.npy"
    return paths


def exclusion_record(root: str, subdir: str, image_id: str) -> str:
    """Preprocessing's record of one sample: a TSV with a header, plus one row when it was excluded."""
    return f"{root}/{subdir}/anat/{image_id}_desc-preproc_excluded.tsv"


def predicted_labels(root: str, subdir: str, image_id: str, reference: str = "T1w") -> dict[str, str]:
    """A segmentation model's label map of one image in template space and in the image's native
    (reference) space."""
    stem = f"{root}/{subdir}/anat/{image_id}"
    return {"template": f"{stem}_space-{SPACE}_desc-predicted_dseg.nii.gz",
            "native": f"{stem}_space-{reference}_desc-predicted_dseg.nii.gz"}


def explanation_maps(root: str, subdir: str, image_id: str, method: str, reference: str = "T1w") -> dict[str, str]:
    """One method's map of one image in template space and in the image's native (reference) space."""
    stem = f"{root}/{subdir}/anat/{image_id}"
    return {"template": f"{stem}_space-{SPACE}_desc-{desc(method)}_saliency.nii.gz",
            "native": f"{stem}_space-{reference}_desc-{desc(method)}_saliency.nii.gz"}


def groundtruth_mask(truth_dir, target: str) -> Path:
    """The true effect mask of ``target`` in a simulated cohort's ground truth (config ``explain.groundtruth``)."""
    return Path(truth_dir) / f"space-{SPACE}_desc-{target}_mask.nii.gz"


def missing_groundtruth(truth_dir, target: str) -> str | None:
    """What to do when ``truth_dir`` lacks the mask of ``target``; None when it is there."""
    path = groundtruth_mask(truth_dir, target)
    if path.exists():
        return None
    return (f"config `explain.groundtruth`: no ground-truth mask {path} for target {target!r}. Set it to the "
            f"folder with space-{SPACE}_desc-{target}_mask.nii.gz (pipeline.demo writes one for its cohorts), or to null.")


def group_map(root: str, method: str, statistic: str = "mean") -> str:
    """A group-level map of ``method`` in template space."""
    return f"{root}/group_space-{SPACE}_desc-{desc(method)}_{statistic}.nii.gz"


def group_figure(root: str, method: str, view: str) -> str:
    """A PNG of ``method``'s group mean map: ``view`` is ``slices`` or ``glass``."""
    return f"{root}/group_desc-{desc(method)}_{view}.png"


def derivative_paths(out_dir, subdir: str, image_id: str, channels=None, label: bool = False) -> dict[str, Path]:
    """``preprocessed`` as Paths, under the derivatives folder ``out_dir``."""
    paths = preprocessed(str(out_dir), subdir, image_id, tuple(channels or ("T1w",)), label)
    return {role: Path(path) for role, path in paths.items()}
