"""Every attribution method on image, slice and patch models: maps on the whole image's grid.

A slice or patch model predicts an image as the mean of its network's outputs over the prediction
views (``ImageModel``). With a network whose output is the sum of a view's positive voxels, that
model is a known linear function of the positive voxels: F(x) = sum(relu(x) * W), W = (views
covering the voxel) / (views), so its maps must equal those of that function applied to the whole
image. Grad-CAM reads a layer of the network per view: a planted bright block must light up where
it is, not where the first patch is.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from pipeline.learning.models import build_model
from pipeline.learning.sampler import ImageModel, PatchSampler, Sampler, SliceSampler
from pipeline.results import attribution

SHAPE = (8, 6, 4)
# Patches of 4^3 with half-patch stride on (8, 6, 4): starts x 0, 2, 4; y 0, 2; z 0 (six patches).
PATCH_COVER = np.einsum("i,j,k->ijk", [1, 1, 2, 2, 2, 2, 1, 1], [1, 1, 2, 2, 1, 1], [1, 1, 1, 1]) / 6
SAMPLERS = {"image": (Sampler(), np.ones(SHAPE)), "slices": (SliceSampler(axis=2), np.full(SHAPE, 1 / 4)),
            "patches": (PatchSampler(size=(4, 4, 4)), PATCH_COVER)}
SETTINGS = attribution.Settings.of({"window": 2, "stride": 2, "smoothgrad_samples": 4, "ig_steps": 16,
                                    "ig_baseline": 0.0})
GRADIENT_METHODS = ["occlusion", "gradient", "smoothgrad", "integrated_gradients"]


class Brightness(nn.Module):
    """Sum of a view's positive voxels: a 1-voxel convolution of weight 1, ReLU and a 2x average
    pool (``features.2``, Grad-CAM's default layer, at half the view's resolution), summed × 2^d."""

    def __init__(self, spatial_dims: int):
        super().__init__()
        conv, pool = (nn.Conv2d, nn.AvgPool2d) if spatial_dims == 2 else (nn.Conv3d, nn.AvgPool3d)
        self.features = nn.Sequential(conv(1, 1, 1, bias=False), nn.ReLU(), pool(2))
        nn.init.ones_(self.features[0].weight)
        self.scale = 2 ** spatial_dims

    def forward(self, x):
        return self.features(x).flatten(1).sum(1, keepdim=True) * self.scale


class Weighted(nn.Module):
    """The known whole-image function: sum(relu(x) * weights)."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        self.weights = torch.as_tensor(weights, dtype=torch.float32)

    def forward(self, x):
        return (torch.relu(x) * self.weights).flatten(1).sum(1, keepdim=True)


def view_model(kind: str, network=None) -> nn.Module:
    sampler, _ = SAMPLERS[kind]
    network = Brightness(sampler.spatial_dims) if network is None else network
    return network.eval() if kind == "image" else ImageModel(network, sampler, chunk=4).eval()


def planted(shape=SHAPE) -> torch.Tensor:
    """(1, 1, X, Y, Z): negative noise, and a bright block at the far corner (x 6-7, y 4-5, z 2-3)."""
    x = -torch.rand(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    x[0, 0, -2:, -2:, -2:] = 1 + torch.rand(2, 2, 2, generator=torch.Generator().manual_seed(1))
    return x


@pytest.mark.parametrize("kind", SAMPLERS)
def test_maps_of_view_models_equal_those_of_the_known_linear_function(kind):
    x = planted() + 0.2 * torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(2)).abs()
    model, weights = view_model(kind), SAMPLERS[kind][1]
    with torch.no_grad():
        assert torch.allclose(model(x), Weighted(weights)(x), atol=1e-5)
    ours, diagnostics = attribution.attribute(model, x, 0, GRADIENT_METHODS, SETTINGS)
    known, _ = attribution.attribute(Weighted(weights), x, 0, GRADIENT_METHODS, SETTINGS)
    for method in GRADIENT_METHODS:
        assert ours[method].shape == SHAPE and np.isfinite(ours[method]).all(), method
        np.testing.assert_allclose(ours[method], known[method], atol=1e-5, rtol=1e-4, err_msg=method)
    positive = x[0, 0].numpy() > 0
    np.testing.assert_allclose(ours["gradient"], positive * weights, atol=1e-6)  # |dF/dx| = W where x > 0
    np.testing.assert_allclose(ours["integrated_gradients"], np.maximum(x[0, 0].numpy(), 0) * weights, atol=1e-4)
    assert diagnostics["completeness_error"] < 1e-3


@pytest.mark.parametrize("kind", SAMPLERS)
@pytest.mark.parametrize("classification", [True, False])
def test_gradcam_lights_up_the_planted_block_on_the_images_grid(kind, classification):
    model, x = view_model(kind), planted()
    maps, _ = attribution.attribute(model, x, 0, ["gradcam"], attribution.Settings.of({}), classification=classification)
    cam = maps["gradcam"]  # the default layer, features.2, names the network's module whatever the sampler
    assert cam.shape == SHAPE and np.isfinite(cam).all()
    assert cam[-1, -1, -1] > 0 and np.unravel_index(np.argmax(cam), SHAPE)[0] >= 5
    assert np.abs(cam[:4, :3]).max() == 0  # the first patch (and everything away from the block) is dark
    assert (cam >= 0).all()  # this network only rises with the block: the signed map has no negatives either


@pytest.mark.parametrize("kind", ["slices", "patches"])
def test_gradcam_of_a_view_model_is_each_views_gradcam_put_back(kind):
    """Each view's own Grad-CAM (captum on the network), over the number of views, placed at the view."""
    model, x = view_model(kind), planted()
    views, _ = model.sampler.prediction_views(x)
    layer = model.network.features[2]
    per_view = []
    for view in views:
        cam = LayerGradCam(model.network, layer).attribute(view[None], target=0, relu_attributions=False)
        mode = "bilinear" if view.ndim == 3 else "trilinear"
        per_view.append(LayerAttribution.interpolate(cam, tuple(view.shape[1:]), interpolate_mode=mode)[0, 0].detach())
    expected = model.sampler.place(torch.stack(per_view) / len(views), SHAPE)
    np.testing.assert_allclose(attribution.gradcam(model, x, 0, "features.2", relu=False), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", SAMPLERS)
def test_every_method_works_on_a_real_network_of_each_sampler(kind):
    sampler = SAMPLERS[kind][0]
    torch.manual_seed(0)
    network = build_model("simple_cnn", 1, 2, sampler.spatial_dims, channels=(4, 8), norm="batch")
    model, x = view_model(kind, network), torch.randn(1, 1, *SHAPE, generator=torch.Generator().manual_seed(3))
    settings = replace(SETTINGS, gradcam_layer="features.1")
    maps, _ = attribution.attribute(model, x, 1, attribution.METHODS, settings, classification=False)  # signed Grad-CAM
    for method, data in maps.items():
        assert data.shape == SHAPE and np.isfinite(data).all(), method
        assert (data != 0).mean() > 0.5, method  # every voxel reaches the output of this network


def test_the_gradcam_layer_check_reads_known_networks_from_the_cache_without_torch(tmp_path):
    """The config check lists a network's layers once; later checks (a Snakemake start, `check`)
    read them from the user's cache and import no torch, with the same messages."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys\n"
              "from pipeline.common.config import fill, schema\n"
              "from pipeline.results import explainconfig\n"
              "config = fill(schema(), {'bids_dir': 'x', 'target': 'age', 'task': 'regression',\n"
              "                         'explain': {'methods': ['gradcam'], 'gradcam_layer': sys.argv[1]}})\n"
              "print(json.dumps([explainconfig.problems(config), 'torch' in sys.modules]))\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}

    def check(layer: str) -> tuple[list[str], bool]:
        done = subprocess.run([sys.executable, "-c", script, layer], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return tuple(json.loads(done.stdout.splitlines()[-1]))

    first_problems, first_torch = check("features.9")
    assert first_torch and "`explain.gradcam_layer` is 'features.9'" in first_problems[0] and "features.1" in first_problems[0]
    again = check("features.9")
    assert again == (first_problems, False)
    assert check("features.1") == ([], False)
    assert (tmp_path / "bids-deepstudy" / "layers.json").is_file()

