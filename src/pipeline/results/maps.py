"""Explanation maps as files and as statistics: one image's maps written in template and native
space, group statistics accumulated one map at a time, fold-mean maps read on demand, the region table
(the coarse template-derived atlas, or the user's ``explain.atlas``).

Shared by the study's explain stage and apply mode's ``predict maps``: ``write_maps`` is the one loop of
both (image → maps → template and native space → group statistics → ``maps.tsv``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.paths import derivative_paths, explanation_maps, group_map
from pipeline.common.tables import read_tsv
from pipeline.intake.geometry import to_native
from pipeline.results.atlas import atlas_on_grid
from pipeline.results.attribution import SIGNED
from pipeline.results.useratlas import Atlas, labels_on_grid, load_atlas


STATISTICS = ("mean", "sd", "t")


def target_index(model, x: torch.Tensor, coder, target_class: str | None = None) -> int:
    """Output to attribute: 0 for regression; for classification the class ``target_class`` or,
    when None, the last class in sorted order (a binary target's default positive class). Every
    image of a study explains the same class, so group maps never average classes whose
    attributions mean opposite things."""
    if coder.task != "classification":
        return 0
    if target_class is None:
        return len(coder.classes) - 1
    if target_class not in coder.classes:
        raise InputError(f"`explain.target_class` {target_class!r} is not a class of the model; choose one of: "
                         f"{', '.join(coder.classes)}.")
    return coder.classes.index(target_class)


def save_image_maps(maps: dict[str, np.ndarray], row, affine: np.ndarray, inverse: Path, out_dir: Path,
                    reference: str, groups: dict[str, "GroupStatistics"]) -> dict[str, dict[str, str]]:
    """Write one image's ``maps`` (by method) in template space (``affine``) and, through its
    ``inverse`` transform, on the native grid of ``row.path``; add each to its method's group
    statistics; return the written paths by method."""
    written = {}
    for method, data in maps.items():
        paths = explanation_maps(str(out_dir / "maps"), row.subdir, row.image_id, method, reference)
        Path(paths["template"]).parent.mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(data, affine)
        atomic.nib_save(img, paths["template"])
        atomic.nib_save(to_native(img, Path(row.path), inverse), paths["native"])
        groups[method].add(data)
        written[method] = paths
    return written


def write_maps(table: pd.DataFrame, maps_of: Callable, affine: np.ndarray, preproc_dir: Path, channels: list[str],
               out_dir: Path, methods: list[str], ids: tuple[str, ...] = ("image_id", "participant_id")) -> pd.DataFrame:
    """The one map-writing path of the study's explain stage (one fold's network) and apply mode's
    ``predict maps`` (the mean over a package's folds). For every image of ``table`` (one row per
    image: ``image_id``, ``participant_id``, ``subdir``, ``path``), in order, ``maps_of(i, row)``
    (``i`` from 1) gives its maps by method and, by method, the further columns of its rows of the
    index; the maps are written in template space (``affine``) and, through the image's inverse
    preprocessing transform, on its native grid (``save_image_maps``), and added to each method's
    group statistics, written last (``write_statistics``). Returns the index, written as
    ``out_dir/maps.tsv``: one row per image and method, columns ``ids``, ``method``, the further
    columns, ``template`` and ``native``."""
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    groups, rows = {m: GroupStatistics(SIGNED[m]) for m in methods}, []
    for i, row in enumerate(table.itertuples(index=False), 1):
        maps, columns = maps_of(i, row)
        inverse = derivative_paths(preproc_dir, row.subdir, row.image_id, channels)["inverse"]
        for method, paths in save_image_maps(maps, row, affine, inverse, out_dir, channels[0], groups).items():
            rows.append({**{c: getattr(row, c) for c in ids}, "method": method, **columns.get(method, {}), **paths})
        print(f"[{i}/{len(table)}] {row.image_id}", file=sys.stderr)
    for method, group in groups.items():
        write_statistics(group, affine, out_dir, method)
    index = pd.DataFrame(rows)
    atomic.to_csv(index, out_dir / "maps.tsv", sep="\t", index=False)
    return index


class GroupStatistics:
    """Voxel-wise group statistics of maps added one at a time (Welford's running mean and sum of
    squared deviations, float64): memory of a few maps, not of the cohort. ``result()``: mean and
    sd of |map|, and the one-sample t of the map (``signed`` methods) or of |map|; t is 0 where the
    sd is 0."""

    def __init__(self, signed: bool):
        self.signed, self.n = signed, 0
        self.moments: dict[str, list[np.ndarray]] = {}  # "magnitude"/"values" -> [mean, M2]

    def add(self, data: np.ndarray) -> None:
        self.n += 1
        series = {"magnitude": np.abs(data)}
        if self.signed:
            series["values"] = data
        for key, x in series.items():
            x = np.asarray(x, dtype=np.float64)
            if key not in self.moments:
                self.moments[key] = [x.copy(), np.zeros_like(x)]
                continue
            mean, m2 = self.moments[key]
            delta = x - mean
            mean += delta / self.n
            m2 += delta * (x - mean)

    def sd(self, key: str) -> np.ndarray:
        mean, m2 = self.moments[key]
        return np.sqrt(m2 / (self.n - 1)) if self.n > 1 else np.zeros_like(mean)

    def result(self) -> dict[str, np.ndarray]:
        if self.n == 0:
            raise ValueError("Group statistics of no maps.")
        key = "values" if self.signed else "magnitude"
        sd = self.sd(key)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(sd > 0, self.moments[key][0] / (sd / np.sqrt(self.n)), 0.0)
        return {"mean": self.moments["magnitude"][0], "sd": self.sd("magnitude"), "t": t}


def statistics(maps, signed: bool) -> dict[str, np.ndarray]:
    """``GroupStatistics`` of an iterable of (X, Y, Z) maps (e.g. an (N, X, Y, Z) array)."""
    group = GroupStatistics(signed)
    for data in maps:
        group.add(data)
    return group.result()


def write_statistics(group: GroupStatistics, affine: np.ndarray, out_dir: Path, method: str) -> None:
    for name, data in group.result().items():
        atomic.nib_save(nib.Nifti1Image(data.astype(np.float32), affine), group_map(str(out_dir), method, name))


class FoldMeanMaps(Mapping):
    """Each test image's ``space`` ("template" or "native") map of ``method``, averaged over the
    folds, by image id; read from the folds' files when asked for, so that going through them all
    holds one image's maps at a time, not the test set's."""

    def __init__(self, fold_dirs: list[Path], method: str, space: str):
        indexes = [read_tsv(d / "maps.tsv") for d in fold_dirs]
        self.paths = {}  # image id -> that image's map from each fold
        self.participant = {}  # image id -> participant id
        for ix in indexes:
            rows = ix.loc[ix["method"] == method, ["image_id", "participant_id", space]]
            for image_id, participant, path in rows.itertuples(index=False):
                self.paths.setdefault(image_id, []).append(path)
                self.participant[image_id] = participant
        if any(len(paths) != len(indexes) for paths in self.paths.values()):
            folds = ", ".join(map(str, fold_dirs))
            raise InputError(f"The folds' {method} maps are of different test images ({folds}); "
                             "rerun the explanation of every fold.")

    def __getitem__(self, image_id: str) -> nib.Nifti1Image:
        images = [nib.load(p) for p in self.paths[image_id]]
        mean = np.mean([np.asarray(img.dataobj, dtype=np.float32) for img in images], axis=0)
        return nib.Nifti1Image(mean, images[0].affine)

    def __iter__(self):
        return iter(self.paths)

    def __len__(self) -> int:
        return len(self.paths)


def region_table(means: dict[str, np.ndarray], mask: nib.Nifti1Image, atlas: Atlas | None = None) -> pd.DataFrame:
    """Atlas regions ranked by each method's mean |attribution| relative to the brain's mean
    (``<method>_relative``; rank 1 is the highest), inside the brain ``mask``. The coarse template-derived
    atlas (``pipeline.results.atlas``) without a user ``atlas``; with one, each label's ``index`` and
    ``<method>_mass``: the region's share of the method's total |attribution| in the brain. A label
    with no voxel in the brain on the grid has 0 voxels, mass 0, no relative value, and ranks last."""
    inside = np.asarray(mask.dataobj) > 0
    if atlas is None:
        labels, names = atlas_on_grid(mask)
        position, values = labels, None
    else:
        labels = labels_on_grid(atlas, mask.affine, mask.shape) * inside
        values, names = np.array(list(atlas.names)), list(atlas.names.values())
        position = np.where(labels > 0, np.searchsorted(values, labels) + 1, 0)
    labelled, n = position > 0, len(names) + 1
    table = pd.DataFrame({"region": names, "voxels": np.bincount(position[labelled], minlength=n)[1:]})
    if values is not None:
        table.insert(0, "index", values)
    for method, mean in means.items():
        total = np.bincount(position[labelled], weights=mean[labelled], minlength=n)[1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            table[f"{method}_relative"] = total / table["voxels"] / mean[inside].mean()
            if values is not None:
                table[f"{method}_mass"] = total / mean[inside].sum()
        table[f"{method}_rank"] = table[f"{method}_relative"].rank(ascending=False, method="min",
                                                                   na_option="bottom").astype(int)
    first = next(iter(means))
    return table.sort_values(f"{first}_rank", kind="stable").reset_index(drop=True)


def by_participant(maps: Mapping[str, nib.Nifti1Image], participant: dict[str, str], ids=None):
    """Each participant's mean map over its images (``participant``: image id -> participant id;
    ``ids``: only these images), one participant at a time (maps read when needed), so that a
    participant with two sessions counts once."""
    images = {}
    for image_id in maps if ids is None else ids:
        images.setdefault(participant.get(image_id, image_id), []).append(image_id)
    for ids in images.values():
        yield np.mean([np.asarray(maps[i].dataobj, dtype=np.float64) for i in ids], axis=0)


def combine_folds(template_maps: dict[str, Mapping[str, nib.Nifti1Image]], mask: nib.Nifti1Image, out_dir: Path,
                  atlas: dict | None = None) -> dict[str, np.ndarray]:
    """Group statistics over participants of the fold-averaged ``template_maps`` (method -> image
    id -> map; a ``FoldMeanMaps`` knows each image's participant, whose images are averaged first);
    write them and the region table (of config ``explain.atlas``, ``atlas``, when given). Returns each
    method's mean |attribution| map."""
    out_dir.mkdir(parents=True, exist_ok=True)
    user_atlas = load_atlas(atlas) if atlas else None  # bad files fail before any map is read
    means = {}
    for method, maps in template_maps.items():
        group = GroupStatistics(SIGNED[method])
        for data in by_participant(maps, getattr(maps, "participant", {})):
            group.add(data)
        write_statistics(group, mask.affine, out_dir, method)
        means[method] = group.result()["mean"]
    atomic.to_csv(region_table(means, mask, user_atlas), out_dir / "regions.tsv", sep="\t", index=False,
                  float_format="%.4g")
    return means


def combine_by_class(template_maps: dict[str, Mapping[str, nib.Nifti1Image]], true_class: dict[str, str],
                     mask: nib.Nifti1Image, out_dir: Path) -> pd.DataFrame:
    """Classification: the group statistics of each true class's test participants apart, in
    ``out_dir/class-<name>/`` (the same files as the group's); a table of each method's participants
    per class and, per pair of classes, the Pearson correlation of their mean |attribution| maps
    inside the brain (low: the classes' maps differ)."""
    from pipeline.results.sanity import correlation

    brain, rows, means = np.asarray(mask.dataobj) > 0, [], {}
    for method, maps in template_maps.items():
        for name in sorted(set(true_class.values())):
            ids = [i for i in maps if true_class.get(i) == name]
            if not ids:
                continue
            group = GroupStatistics(SIGNED[method])
            for data in by_participant(maps, getattr(maps, "participant", {}), ids):
                group.add(data)
            folder = out_dir / f"class-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            write_statistics(group, mask.affine, folder, method)
            means[method, name] = group.result()["mean"]
            rows.append({"method": method, "class": name, "participants": group.n})
        names = [c for (m, c) in means if m == method]
        rows += [{"method": method, "class": f"{a} vs {b}", "mean_map_r": correlation(means[method, a], means[method, b],
                                                                                        brain)}
                 for k, a in enumerate(names) for b in names[k + 1:]]
    return pd.DataFrame(rows)
