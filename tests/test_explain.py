"""Attribution maps equal captum's, group statistics, the atlas and the region table."""

import nibabel as nib
import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, NoiseTunnel, Occlusion, Saliency

from pipeline.results import attribution
from pipeline.results.atlas import atlas_on_grid
from pipeline.common.errors import InputError
from pipeline.results.maps import FoldMeanMaps, combine_by_class, combine_folds, region_table, statistics
from pipeline.results.validation import top_fraction_enrichment
from pipeline.intake.grid import write_grid
from pipeline.learning.models import build_model


def brain_like(channels: int, shape=(13, 11, 9), seed=0) -> torch.Tensor:
    """A (1, C, X, Y, Z) z-scored-like image: random inside an ellipsoid, exactly 0 outside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(a ** 2 for a in axes) < 0.6
    return x * inside


def small_model(channels: int, outputs: int = 3, norm: str = "batch"):
    torch.manual_seed(0)
    return build_model("simple_cnn", channels, outputs, channels=(4, 8), norm=norm).eval()


@pytest.mark.parametrize("channels, window, stride", [(1, 4, 3), (2, 5, 2), (1, 3, 3)])
def test_occlusion_equals_captum_including_cut_edge_windows(channels, window, stride):
    model, x = small_model(channels), brain_like(channels)
    for target in (0, 2):
        ours = attribution.occlusion(model, x, target, window, stride, batch=7)
        theirs = Occlusion(model).attribute(x, sliding_window_shapes=(channels, window, window, window),
                                            strides=(channels, stride, stride, stride), baselines=0.0,
                                            target=target, perturbations_per_eval=16)
        assert ours.shape == x.shape[2:]
        torch.testing.assert_close(torch.from_numpy(ours), theirs[0, 0], atol=1e-5, rtol=1e-5)
        if channels > 1:  # captum's windows span all channels: every channel gets the same value
            torch.testing.assert_close(theirs[0, 1], theirs[0, 0])


def test_occlusion_with_a_nonzero_baseline_equals_captum():
    model, x = small_model(1), brain_like(1)
    ours = attribution.occlusion(model, x, 1, 4, 2, baseline=-0.5)
    theirs = Occlusion(model).attribute(x, sliding_window_shapes=(1, 4, 4, 4), strides=(1, 2, 2, 2),
                                        baselines=-0.5, target=1)
    torch.testing.assert_close(torch.from_numpy(ours), theirs[0, 0], atol=1e-5, rtol=1e-5)


def test_window_starts_follow_captum_and_reject_oversized_windows():
    assert list(attribution.window_starts(11, 4, 3)) == [0, 3, 6, 9]  # the last window is cut by the edge
    assert list(attribution.window_starts(12, 4, 4)) == [0, 4, 8]
    with pytest.raises(InputError, match="explain.window"):
        attribution.window_starts(5, 6, 2)


def test_gradient_and_smoothgrad_equal_captum_summed_over_channels():
    model, x = small_model(2), brain_like(2)
    theirs = Saliency(model).attribute(x.clone().requires_grad_(True), target=0, abs=True)
    torch.testing.assert_close(torch.from_numpy(attribution.gradient(model, x, 0)), theirs[0].sum(0))
    torch.manual_seed(3)
    theirs = NoiseTunnel(Saliency(model)).attribute(x.clone().requires_grad_(True), nt_type="smoothgrad",
                                                    nt_samples=5, stdevs=0.3, target=1, abs=True)
    ours = attribution.smoothgrad(model, x, 1, samples=5, noise=0.3, seed=3)
    torch.testing.assert_close(torch.from_numpy(ours), theirs[0].sum(0), atol=1e-5, rtol=1e-5)
    assert not np.allclose(ours, attribution.smoothgrad(model, x, 1, samples=5, noise=0.3, seed=4))


def test_integrated_gradients_equal_captum_and_report_completeness():
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 3, channels=(4, 8), norm="batch").eval()
    x, reference = brain_like(1), 0.5 * brain_like(1, seed=5)
    ours, error = attribution.integrated_gradients(model, x, 2, steps=64, baseline=reference)
    theirs = IntegratedGradients(model).attribute(x, baselines=reference, target=2, n_steps=64)
    torch.testing.assert_close(torch.from_numpy(ours), theirs[0, 0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        change = float(model(x)[0, 2] - model(reference)[0, 2])
    assert error == pytest.approx(abs(ours.sum() - change) / abs(change), rel=1e-3, abs=1e-6)
    assert error < 0.01


def test_integrated_gradients_from_zero_are_degenerate_under_instance_norm():
    """Why the default baseline is the training mean: instance norm makes f(a * x) = f(x), so the
    path from 0 carries almost no signal and completeness fails."""
    model, x = small_model(1, norm="instance"), brain_like(1)
    _, from_zero = attribution.integrated_gradients(model, x, 2, steps=32, baseline=0.0)
    _, from_image = attribution.integrated_gradients(model, x, 2, steps=32, baseline=0.5 * brain_like(1, seed=5))
    assert from_zero > 0.5 and from_zero > 3 * from_image


def test_gradcam_equals_captum_and_names_the_layers_when_wrong():
    model, x = small_model(1), brain_like(1, shape=(16, 16, 16))
    ours = attribution.gradcam(model, x, 0, "features.1")
    cam = LayerGradCam(model, model.features[1]).attribute(x, target=0, relu_attributions=True)
    theirs = LayerAttribution.interpolate(cam, (16, 16, 16), interpolate_mode="trilinear")
    assert ours.shape == (16, 16, 16)
    torch.testing.assert_close(torch.from_numpy(ours), theirs[0, 0])
    signed = attribution.gradcam(model, x, 0, "features.1", relu=False)  # regression: both directions
    assert (ours >= 0).all() and (signed < 0).any()
    with pytest.raises(InputError, match="features.0"):
        attribution.gradcam(model, x, 0, "classifier.9")


def test_unknown_method_is_an_error_listing_the_methods():
    with pytest.raises(InputError, match="occlusion"):
        attribution.attribute(small_model(1), brain_like(1), 0, ["lime"], attribution.Settings.of({}))


def test_enrichment_is_relative_to_chance():
    brain = np.ones((10, 10, 10), bool)
    region = np.zeros_like(brain)
    region[:5] = True  # half the brain: chance is 0.5
    values = np.zeros(brain.shape)
    values[:2] = 1.0  # the top 5 % all lie in the region
    assert top_fraction_enrichment(values, region, brain) == pytest.approx(2.0)


def test_group_statistics_on_hand_computed_maps():
    maps = np.array([[[[1.0, -2.0]]], [[[3.0, -2.0]]], [[[2.0, 1.0]]]])  # 3 subjects, 2 voxels
    signed = statistics(maps, signed=True)
    np.testing.assert_allclose(signed["mean"][0, 0], [2.0, 5 / 3])
    np.testing.assert_allclose(signed["t"][0, 0, 0], 2.0 / (1.0 / np.sqrt(3)))  # mean 2, sd 1
    assert signed["t"][0, 0, 1] < 0  # consistently negative on average
    unsigned = statistics(maps, signed=False)
    assert unsigned["t"][0, 0, 1] > 0  # magnitudes are positive
    constant = statistics(np.ones((4, 1, 1, 2)), signed=True)
    np.testing.assert_array_equal(constant["t"], 0.0)


@pytest.fixture(scope="module")
def grid_mask(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    write_grid(8.0, (20, 24, 20), d / "tpl.nii.gz", d / "mask.nii.gz")
    return nib.load(d / "mask.nii.gz")


def test_atlas_covers_the_brain_with_named_lateralised_regions(grid_mask):
    labels, names = atlas_on_grid(grid_mask)
    brain = np.asarray(grid_mask.dataobj) > 0
    assert ((labels > 0) == brain).all()
    assert "right temporal white matter" in names and "left lateral ventricle" in names
    # the left hemisphere is at negative x (RAS+): label voxels named "left" lie there
    x = (grid_mask.affine @ np.vstack([np.indices(labels.shape).reshape(3, -1), np.ones(labels.size)]))[0]
    left = np.isin(labels.ravel(), [i + 1 for i, n in enumerate(names) if n.startswith("left")])
    assert (x[left] < 0).all()


def test_region_table_ranks_the_region_holding_the_attribution_first(grid_mask):
    labels, names = atlas_on_grid(grid_mask)
    target = names.index("right temporal white matter") + 1
    mean = np.where(labels == target, 5.0, 0.1) * (labels > 0)
    table = region_table({"occlusion": mean}, grid_mask)
    assert table.iloc[0]["region"] == "right temporal white matter" and table.iloc[0]["occlusion_rank"] == 1
    assert table["voxels"].sum() == (labels > 0).sum()


def write_fold_maps(fold_dir, images: dict[str, float], affine) -> None:
    """A fold's maps.tsv and constant template-space occlusion maps (value per image id)."""
    fold_dir.mkdir(parents=True)
    rows = ["image_id\tparticipant_id\tmethod\ttemplate\tnative"]
    for image_id, value in images.items():
        path = fold_dir / f"{image_id}_occlusion.nii.gz"
        nib.save(nib.Nifti1Image(np.full((3, 4, 5), value, np.float32), affine), path)
        rows.append(f"{image_id}\t{image_id.split('_')[0]}\tocclusion\t{path}\t{path}")
    (fold_dir / "maps.tsv").write_text("\n".join(rows) + "\n")


def test_fold_mean_maps_average_each_image_over_folds_and_read_only_what_is_asked(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_fold_maps(tmp_path / "fold-1", {"sub-1": 1.0, "sub-2": 10.0}, affine)
    write_fold_maps(tmp_path / "fold-2", {"sub-2": 20.0, "sub-1": 3.0}, affine)  # other row order: joined by id
    maps = FoldMeanMaps([tmp_path / "fold-1", tmp_path / "fold-2"], "occlusion", "template")
    assert list(maps) == ["sub-1", "sub-2"] and len(maps) == 2
    (tmp_path / "fold-2" / "sub-2_occlusion.nii.gz").unlink()  # not read until asked for
    np.testing.assert_array_equal(maps["sub-1"].get_fdata(), 2.0)
    np.testing.assert_array_equal(maps["sub-1"].affine, affine)
    with pytest.raises(FileNotFoundError):
        maps["sub-2"]
    write_fold_maps(tmp_path / "fold-3", {"sub-1": 5.0}, affine)
    with pytest.raises(InputError, match="different test images"):
        FoldMeanMaps([tmp_path / "fold-1", tmp_path / "fold-3"], "occlusion", "template")


def test_group_maps_count_a_participant_with_two_sessions_once(tmp_path):
    """sub-1's two sessions (maps 1 and 3) are averaged to 2 before the group mean with sub-2 (10): 6, not 14/3."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_fold_maps(tmp_path / "fold-1", {"sub-1_ses-1": 1.0, "sub-1_ses-2": 3.0, "sub-2": 10.0}, affine)
    maps = FoldMeanMaps([tmp_path / "fold-1"], "occlusion", "template")
    mask = nib.Nifti1Image(np.ones((3, 4, 5), np.uint8), affine)
    means = combine_folds({"occlusion": maps}, mask, tmp_path / "group")
    np.testing.assert_allclose(means["occlusion"], 6.0)


def test_every_image_explains_one_class_whatever_it_predicts():
    """Two images the model assigns to different classes: both are explained for the same class (the
    last in sorted order, or the one named), never each for its own prediction."""
    from pipeline.learning.coder import TargetCoder
    from pipeline.results.maps import target_index

    coder = TargetCoder("classification", classes=["AD", "CN"])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0] * 8, [-1.0] * 8]))
    images = [torch.ones(1, 1, 2, 2, 2), -torch.ones(1, 1, 2, 2, 2)]
    assert [int(model(x).argmax(1)) for x in images] == [0, 1]
    assert [target_index(model, x, coder) for x in images] == [1, 1]
    assert [target_index(model, x, coder, "AD") for x in images] == [0, 0]
    assert target_index(model, images[0], TargetCoder("regression")) == 0
    with pytest.raises(InputError, match="choose one of: AD, CN"):
        target_index(model, images[0], coder, "MCI")


def test_classification_group_maps_are_also_kept_per_true_class(tmp_path):
    """Patients' maps (1 and 3, one participant with two sessions; 5) and controls' (-10, -20)
    averaged apart: class-patient mean |map| (2 + 5) / 2, class-control 15."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    write_fold_maps(tmp_path / "fold-1", {"sub-1_ses-1": 1.0, "sub-1_ses-2": 3.0, "sub-2": 5.0, "sub-3": -10.0,
                                          "sub-4": -20.0}, affine)
    maps = FoldMeanMaps([tmp_path / "fold-1"], "occlusion", "template")
    true_class = {"sub-1_ses-1": "patient", "sub-1_ses-2": "patient", "sub-2": "patient", "sub-3": "control",
                  "sub-4": "control"}
    mask = nib.Nifti1Image(np.ones((3, 4, 5), np.uint8), affine)
    table = combine_by_class({"occlusion": maps}, true_class, mask, tmp_path / "classes")
    counts = table.dropna(subset=["participants"]).set_index("class")["participants"]
    assert counts.to_dict() == {"control": 2, "patient": 2}
    for name, expected in (("patient", 3.5), ("control", 15.0)):
        mean = nib.load(tmp_path / "classes" / f"class-{name}" / "group_space-MNI152NLin2009aSym_desc-occlusion_mean.nii.gz")
        np.testing.assert_allclose(mean.get_fdata(), expected)
    assert table.set_index("class").loc["control vs patient", "method"] == "occlusion"  # constant maps: r undefined


class RegionSum(torch.nn.Module):
    """An output that depends on one box of the image (and, weakly, on everything): counts its calls."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += len(x)
        return x[:, :, 12:18, 4:10, 8:14].sum((2, 3, 4)) + 0.1 * x.mean((2, 3, 4))


def test_coarse_to_fine_occlusion_finds_the_region_at_a_fraction_of_the_passes():
    x = torch.randn(1, 1, 24, 28, 24, generator=torch.Generator().manual_seed(0)) + 1
    model = RegionSum()
    full = attribution.occlusion(model, x, 0, 4, 2)
    full_images, model.images = model.images, 0
    np.testing.assert_array_equal(attribution.occlusion(model, x, 0, 4, 2, keep=1.0), full)  # keep 1: the exact map
    model.images = 0
    fine = attribution.occlusion(model, x, 0, 4, 2, keep=0.3)
    assert model.images < 0.5 * full_images
    top = lambda a: np.abs(a) >= np.quantile(np.abs(a), 0.95)  # noqa: E731
    assert 2 * (top(full) & top(fine)).sum() / (top(full).sum() + top(fine).sum()) > 0.9
    assert np.corrcoef(full.ravel(), fine.ravel())[0, 1] > 0.95
