"""A user's labelled atlas (config ``explain.atlas``): a NIfTI label image and its labels table, on the study grid.

The image: 3-D integer labels (0 is background; a trailing axis of length 1 is dropped), in the
template's space (MNI152, world mm, RAS+) on any grid and affine; it is resampled onto the study grid
by nearest neighbour (``nibabel.processing``), so labels are never blended. The labels: a table with a
header row (tab-separated; a ``.csv`` file comma-separated) holding an index column (the first of
``INDEX_COLUMNS``) and a name column (the first other of ``NAME_COLUMNS``), as BIDS ``dseg.tsv`` files
or exported Harvard-Oxford and AAL lookup tables have them; column names are matched ignoring case.
A row for label 0 (background) is ignored. Every label value of the image needs a row; a row whose
label is not on the grid (a structure smaller than a grid voxel, or absent from the image) stays in
the region table with 0 voxels.

``problems`` checks the files before any job runs; ``load_atlas`` checks them again when the region
table is built. Every message names ``explain.atlas.image`` or ``explain.atlas.labels`` and what to do.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError

from pipeline.common.errors import InputError

INDEX_COLUMNS = ("index", "label", "value", "id", "label_id")
NAME_COLUMNS = ("name", "label_name", "region", "structure", "label")
SHOWN = 5  # label values a message names
UNREADABLE = (OSError, ValueError, EOFError, zlib.error, ImageFileError)


@dataclass(frozen=True)
class Atlas:
    """A checked atlas: ``labels`` (X, Y, Z) int32 on the image's own grid (``affine``, mm, RAS+)
    and ``names``, label value -> region name (background 0 left out), in label order."""

    labels: np.ndarray
    affine: np.ndarray
    names: dict[int, str]


def existing(path: str, key: str, what: str) -> Path:
    found = Path(path)
    if not found.is_file():
        raise InputError(f"config `{key}`: no file {found} ({what}). Set a valid value: an existing file "
                         "(a relative path is relative to the folder you run snakemake from).")
    return found


def pick(columns: list[str], choices: tuple[str, ...], taken: str | None = None) -> str | None:
    """The first column (matched ignoring case and surrounding spaces) named one of ``choices``."""
    lowered = {c.strip().lower(): c for c in columns if c != taken}
    return next((lowered[c] for c in choices if c in lowered), None)


def read_labels(path: str, key: str = "explain.atlas.labels") -> dict[int, str]:
    """Label value -> name from the labels table at ``path`` (background 0 left out)."""
    found = existing(path, key, "the atlas's labels table")
    try:
        table = pd.read_csv(found, sep="," if found.suffix.lower() == ".csv" else "\t", dtype=str,
                            keep_default_na=False)
    except (*UNREADABLE, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise InputError(f"config `{key}`: {found} cannot be read as a table ({exc}); make it readable or "
                         "replace it with a tab-separated table with a header row.") from None
    index = pick(list(table.columns), INDEX_COLUMNS)
    name = pick(list(table.columns), NAME_COLUMNS, taken=index)
    if index is None or name is None:
        raise InputError(f"config `{key}`: {found} has the columns {', '.join(map(str, table.columns)) or 'none'}; "
                         f"expected a header row with an index column (one of {', '.join(INDEX_COLUMNS)}) and a "
                         f"name column (one of {', '.join(NAME_COLUMNS)}), tab-separated; correct it.")
    values = pd.to_numeric(table[index].str.strip(), errors="coerce")
    bad = table.index[values.isna() | (values != values.round()) | (values < 0)]
    if len(bad):
        raise InputError(f"config `{key}`: {found}, row {bad[0] + 2}: {index} {table.at[bad[0], index]!r} is not a "
                         "label value (an integer of at least 0); correct it.")
    twice = values[values.duplicated()]
    if len(twice):
        raise InputError(f"config `{key}`: {found} has more than one row for label {int(twice.iloc[0])}. "
                         "Keep one row each.")
    names = {int(v): str(n).strip() or f"label {int(v)}" for v, n in zip(values, table[name])}
    names.pop(0, None)
    return dict(sorted(names.items()))


def read_label_image(path: str, key: str = "explain.atlas.image") -> nib.Nifti1Image:
    """The label image at ``path`` as (X, Y, Z) int32 labels with its affine."""
    found = existing(path, key, "the atlas's NIfTI label image")
    try:
        img = nib.load(found)
        data = np.asanyarray(img.dataobj)
    except UNREADABLE as exc:
        raise InputError(f"config `{key}`: {found} cannot be read as a NIfTI image ({exc}); make it readable or "
                         "replace it with a NIfTI label image.") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"config `{key}`: {found} has shape {data.shape}, not a 3-D label image; replace it with "
                         "a 3-D image of integer labels (a probabilistic atlas: its maximum-probability labels).")
    if data.dtype.kind not in "iub":
        integral = np.isfinite(data) & (data == np.round(data))
        if not integral.all():
            example = data[~integral].flat[0]
            raise InputError(f"config `{key}`: {found} holds values that are not integer labels (e.g. {example:g}); "
                             "replace it with a 3-D image of integer labels (a probabilistic atlas: its "
                             "maximum-probability labels).")
    if (data < 0).any():
        raise InputError(f"config `{key}`: {found} holds negative values (e.g. {data[data < 0].flat[0]}); label "
                         "values are integers of at least 0 (0 is background). Replace it.")
    return nib.Nifti1Image(data.astype(np.int32), img.affine)


def load_atlas(settings: dict) -> Atlas:
    """The atlas of config ``explain.atlas`` (``{image, labels}``), checked; InputError listing every problem."""
    found, names, img = [], None, None
    try:
        names = read_labels(settings["labels"])
    except InputError as exc:
        found.append(str(exc))
    try:
        img = read_label_image(settings["image"])
    except InputError as exc:
        found.append(str(exc))
    if img is not None and names is not None:
        values = np.unique(np.asarray(img.dataobj))
        missing = [int(v) for v in values if v != 0 and int(v) not in names]
        if missing:
            more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
            found.append(f"config `explain.atlas.image`: label value(s) {', '.join(map(str, missing[:SHOWN]))}{more} "
                         f"of {settings['image']} have no row in `explain.atlas.labels` ({settings['labels']}); add "
                         "its row (index and name) for each, or replace the labels table with the atlas's own.")
    if found:
        raise InputError("\n".join(found))
    return Atlas(np.asarray(img.dataobj), img.affine, names)


def world_extent(affine: np.ndarray, shape) -> np.ndarray:
    """(3, 2) min and max world coordinates (mm) of the voxel centres of a grid."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return np.stack([world.min(axis=1), world.max(axis=1)], axis=1)


def labels_on_grid(atlas: Atlas, affine: np.ndarray, shape) -> np.ndarray:
    """The atlas's labels (X, Y, Z) int32 on the grid (``affine``, ``shape``), nearest neighbour,
    0 outside the atlas; InputError when no label reaches the grid."""
    from nibabel.processing import resample_from_to

    image = nib.Nifti1Image(atlas.labels, atlas.affine)
    on_grid = np.asarray(resample_from_to(image, (tuple(shape), affine), order=0, cval=0).dataobj).astype(np.int32)
    if not on_grid.any():
        def described(box):
            return ", ".join(f"{axis} {lo:.0f}..{hi:.0f}" for axis, (lo, hi) in zip("xyz", box))

        raise InputError(f"config `explain.atlas.image`: no label of the atlas lies on the study grid (atlas: "
                         f"{described(world_extent(atlas.affine, atlas.labels.shape))} mm; grid: "
                         f"{described(world_extent(affine, shape))} mm, MNI152). Replace it with an atlas in MNI "
                         "space (world coordinates in mm), or correct its affine.")
    return on_grid


def problems(config: dict) -> list[str]:
    """Problems of config ``explain.atlas`` (the config filled in with the schema's defaults), checked on
    the study grid of ``preprocess``; none without an atlas, for segmentation (no maps) and in apply mode."""
    settings = config.get("explain", {}).get("atlas")
    if not settings or config.get("task") == "segmentation" or config.get("apply"):
        return []
    from pipeline.intake.template import grid_affine

    try:
        atlas = load_atlas(settings)
        shape = tuple(config["preprocess"]["shape"])
        labels_on_grid(atlas, grid_affine(config["preprocess"]["resolution"], shape), shape)
    except InputError as exc:
        return str(exc).splitlines()
    return []
