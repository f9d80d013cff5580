"""A user atlas (config ``explain.atlas``) on the study grid and the region table it gives: real
files on another resolution and orientation than the grid, a planted blob, the default unchanged."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from atlases import hemisphere_labels, write_atlas

from pipeline.common.errors import InputError
from pipeline.intake.grid import write_grid
from pipeline.results.maps import FoldMeanMaps, combine_folds, region_table
from pipeline.results.useratlas import labels_on_grid, load_atlas, read_labels


@pytest.fixture(scope="module")
def grid_mask(tmp_path_factory):
    """The 8 mm study grid's brain mask: its voxel centres lie at x = ±4, ±12, … mm, clear of the
    atlas's boundaries at ±8 mm, so nearest-neighbour labels are known from x alone."""
    d = tmp_path_factory.mktemp("grid")
    write_grid(8.0, (20, 24, 20), d / "tpl.nii.gz", d / "mask.nii.gz")
    return nib.load(d / "mask.nii.gz")


def grid_x(mask: nib.Nifti1Image) -> np.ndarray:
    ijk = np.indices(mask.shape).reshape(3, -1)
    return (mask.affine[:3, :3] @ ijk + mask.affine[:3, 3:4])[0].reshape(mask.shape)


def test_atlas_on_another_grid_is_resampled_by_nearest_neighbour(tmp_path, grid_mask):
    atlas = load_atlas(write_atlas(tmp_path))
    on_grid = labels_on_grid(atlas, grid_mask.affine, grid_mask.shape)
    assert on_grid.shape == grid_mask.shape and set(np.unique(on_grid)) == {1, 2, 3}  # labels, never blends
    np.testing.assert_array_equal(on_grid, hemisphere_labels(grid_x(grid_mask)))
    assert list(atlas.names) == [1, 2, 3, 9] and 0 not in atlas.names  # the background row is ignored


def test_planted_blob_ranks_its_region_first_with_its_share_of_the_mass(tmp_path, grid_mask):
    brain = np.asarray(grid_mask.dataobj) > 0
    x = grid_x(grid_mask)
    centre = grid_mask.affine @ [14, 12, 10, 1]  # a brain voxel at x = +36 mm: right hemisphere
    ijk = np.indices(grid_mask.shape).reshape(3, -1)
    world = (grid_mask.affine[:3, :3] @ ijk + grid_mask.affine[:3, 3:4]).reshape(3, *grid_mask.shape)
    blob = np.sum((world - centre[:3, None, None, None]) ** 2, axis=0) <= 12.0 ** 2
    assert (x[blob] > 8).all() and brain[blob].sum() > 5
    mean = np.where(blob, 5.0, 0.1) * brain
    table = region_table({"occlusion": mean, "gradient": np.ones(grid_mask.shape)}, grid_mask,
                         load_atlas(write_atlas(tmp_path)))
    right = (x > 8) & brain
    assert table.iloc[0]["region"] == "right hemisphere" and table.iloc[0]["occlusion_rank"] == 1
    assert table.iloc[0]["occlusion_mass"] == pytest.approx(mean[right].sum() / mean[brain].sum())
    assert table["occlusion_mass"].sum() == pytest.approx(1.0)  # the atlas covers the whole brain
    rows = table.set_index("region")
    assert rows.loc["right hemisphere", "voxels"] == right.sum() and table["voxels"].sum() == brain.sum()
    assert rows.loc["left hemisphere", "gradient_mass"] == pytest.approx(((x < -8) & brain).sum() / brain.sum())
    # A label of the table that is not on the grid: listed with 0 voxels and no mass, ranked last.
    tiny = rows.loc["tiny nucleus"]
    assert (tiny["index"], tiny["voxels"], tiny["occlusion_mass"], tiny["occlusion_rank"]) == (9, 0, 0.0, 4)
    assert np.isnan(tiny["occlusion_relative"]) and list(table.columns) == [
        "index", "region", "voxels", "occlusion_relative", "occlusion_mass", "occlusion_rank",
        "gradient_relative", "gradient_mass", "gradient_rank"]


def test_without_an_atlas_the_table_is_the_coarse_one(grid_mask):
    mean = np.asarray(grid_mask.dataobj, dtype=float)
    table = region_table({"occlusion": mean}, grid_mask)
    assert list(table.columns) == ["region", "voxels", "occlusion_relative", "occlusion_rank"]
    assert "right temporal white matter" in set(table["region"])


@pytest.mark.parametrize("text", ["index\tname\n1\tleft\n2\tmid\n3\tright\n",
                                  "Label\tName\tcolor\n1\tleft\t#f00\n2\tmid\t#0f0\n3\tright\t#00f\n",
                                  "index\tlabel\n1\tleft\n2\tmid\n3\tright\n",
                                  "id\tregion\n3\tright\n1\tleft\n2\tmid\n"])
def test_labels_table_column_variants(text, tmp_path):
    path = tmp_path / "labels.tsv"
    path.write_text(text)
    assert read_labels(str(path)) == {1: "left", 2: "mid", 3: "right"}


def test_csv_labels_table(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("value,structure\n0,Unknown\n1,left\n2,mid\n3,right\n")
    assert read_labels(str(path)) == {1: "left", 2: "mid", 3: "right"}


def test_group_step_writes_the_regions_of_the_atlas(tmp_path, grid_mask):
    """``combine_folds`` (the ``explain group`` step) with config ``explain.atlas``: regions.tsv by its labels."""
    fold = tmp_path / "fold-1"
    fold.mkdir()
    mean = np.where(grid_x(grid_mask) < -8, 2.0, 0.5).astype(np.float32) * (np.asarray(grid_mask.dataobj) > 0)
    nib.save(nib.Nifti1Image(mean, grid_mask.affine), fold / "map.nii.gz")
    (fold / "maps.tsv").write_text("image_id\tparticipant_id\tmethod\ttemplate\tnative\n"
                                   f"sub-1\tsub-1\tocclusion\t{fold / 'map.nii.gz'}\t{fold / 'map.nii.gz'}\n")
    maps = {"occlusion": FoldMeanMaps([fold], "occlusion", "template")}
    combine_folds(maps, grid_mask, tmp_path / "group", write_atlas(tmp_path / "atlas"))
    table = pd.read_csv(tmp_path / "group" / "regions.tsv", sep="\t")
    assert table["region"].tolist() == ["left hemisphere", "midline", "right hemisphere", "tiny nucleus"]
    assert table["index"].tolist() == [1, 2, 3, 9]


def test_group_step_refuses_a_bad_atlas_before_reading_a_map(tmp_path, grid_mask):
    atlas = write_atlas(tmp_path, labels_text="index\tname\n1\tleft\n")
    with pytest.raises(InputError, match=r"`explain\.atlas\.image`: label value\(s\) 2, 3 of .* have no row"):
        combine_folds({"occlusion": {}}, grid_mask, tmp_path / "group", atlas)
    assert not (tmp_path / "group" / "regions.tsv").exists()


def test_report_says_which_atlas_the_regions_are_of():
    from pipeline.results.report import atlas_sentence

    atlas = {"image": "atlases/HarvardOxford-cort-maxprob-thr25-1mm.nii.gz", "labels": "atlases/HO.tsv"}
    said = atlas_sentence(atlas)
    assert atlas["image"] in said and atlas["labels"] in said and "explain.atlas" in said and "_mass" in said
    assert "Coarse atlas derived from the template" in atlas_sentence(None)
