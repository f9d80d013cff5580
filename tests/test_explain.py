"""Explanation maps: our occlusion equals captum's exactly, and maps land in native space."""

import pytest
import torch
from captum.attr import Occlusion, Saliency

from pipeline.errors import InputError
from pipeline.explain import occlusion, saliency, top_fraction_enrichment, window_starts
from pipeline.models import build_model


def brain_like(channels: int, shape=(13, 11, 9), seed=0) -> torch.Tensor:
    """A (1, C, X, Y, Z) z-scored-like image: random inside an ellipsoid, exactly 0 outside."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, channels, *shape, generator=g)
    axes = torch.meshgrid(*[torch.linspace(-1, 1, n) for n in shape], indexing="ij")
    inside = sum(a ** 2 for a in axes) < 0.6
    return x * inside


@pytest.mark.parametrize("channels, window, stride", [(1, 4, 3), (2, 5, 2), (1, 3, 3)])
def test_occlusion_equals_captum_including_cut_edge_windows(channels, window, stride):
    torch.manual_seed(0)
    model = build_model("simple_cnn", channels, 3, channels=(4, 8)).eval()
    x = brain_like(channels)
    for target in (0, 2):
        ours = occlusion(model, x, target, window, stride, batch=7)
        theirs = Occlusion(model).attribute(x, sliding_window_shapes=(channels, window, window, window),
                                            strides=(channels, stride, stride, stride), baselines=0.0,
                                            target=target, perturbations_per_eval=16)
        assert ours.shape == x.shape[2:]
        torch.testing.assert_close(torch.from_numpy(ours), theirs[0, 0], atol=1e-5, rtol=1e-5)
        if channels > 1:  # captum's windows span all channels: every channel gets the same value
            torch.testing.assert_close(theirs[0, 1], theirs[0, 0])


def test_window_starts_follow_captum_and_reject_oversized_windows():
    assert list(window_starts(11, 4, 3)) == [0, 3, 6, 9]  # the last window is cut by the edge
    assert list(window_starts(12, 4, 4)) == [0, 4, 8]
    with pytest.raises(InputError, match="explain.window"):
        window_starts(5, 6, 2)


def test_saliency_is_captums_summed_over_channels():
    model = build_model("simple_cnn", 2, 1, channels=(4, 8)).eval()
    x = brain_like(2)
    theirs = Saliency(model).attribute(x.clone().requires_grad_(True), target=0, abs=True)
    torch.testing.assert_close(torch.from_numpy(saliency(model, x, 0)), theirs[0].sum(0))


def test_enrichment_is_relative_to_chance():
    import numpy as np

    brain = np.ones((10, 10, 10), bool)
    region = np.zeros_like(brain)
    region[:5] = True  # half the brain: chance is 0.5
    attribution = np.zeros(brain.shape)
    attribution[:2] = 1.0  # the top 5 % all lie in the region
    assert top_fraction_enrichment(attribution, region, brain) == pytest.approx(2.0)
