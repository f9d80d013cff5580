import pytest
import torch
import torch.nn.functional as F

from pipeline.learning.augment import RandomAffine, affine_theta
from pipeline.learning.resample import affine_resample, over_threads


def draws(batch: int, shape, seed: int = 0, **ranges):
    params = RandomAffine(**ranges).sample(batch, torch.Generator().manual_seed(seed))
    return affine_theta(params["rotation"], params["scaling"], params["translation"], shape, params["shear"],
                        params["flip"])


def torch_reference(image, theta, mode):
    grid = F.affine_grid(theta.to(image.dtype), list(image.shape), align_corners=False)
    return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)


@pytest.mark.parametrize("shape", [(9, 11, 7), (16, 12, 20)])
def test_trilinear_equals_grid_sample(shape):
    # Large rotations, scalings, shifts, shears and flips: many samples fall on the border or outside.
    theta = draws(4, shape, rotation=30, scaling=0.3, translation=4, shear=0.2, flip=(0, 2))
    image = torch.randn(4, 2, *shape, generator=torch.Generator().manual_seed(1))
    out = affine_resample(image, theta)
    assert out.shape == image.shape and out.dtype == image.dtype
    assert torch.allclose(out, torch_reference(image, theta, "bilinear"), atol=1e-5)


def test_nearest_equals_grid_sample_for_labels():
    shape = (12, 10, 14)
    theta = draws(3, shape, seed=2, rotation=20, scaling=0.2, translation=3)
    labels = torch.randint(0, 4, (3, 1, *shape), generator=torch.Generator().manual_seed(3)).float()
    assert torch.equal(affine_resample(labels, theta, "nearest"), torch_reference(labels, theta, "nearest"))


def test_integer_shift_moves_voxels_exactly():
    image = torch.arange(6 * 7 * 8, dtype=torch.float32).view(1, 1, 6, 7, 8)
    theta = affine_theta(torch.zeros(1, 3), torch.ones(1, 3), torch.tensor([[1.0, -2.0, 3.0]]), (6, 7, 8))
    out = affine_resample(image, theta)
    # The sampling matrix maps output to input: output voxel (i, j, k) reads input (i + 1, j - 2, k + 3)
    # (to float32 rounding of the shift in normalised units).
    assert torch.allclose(out[0, 0, :5, 2:, :5], image[0, 0, 1:, :5, 3:], atol=1e-3)
    assert out[0, 0, 5].abs().sum() == 0 and out[0, 0, :, :2].abs().sum() == 0


def test_identity_keeps_image_and_thread_count_does_not_change_result():
    shape = (10, 9, 8)
    image = torch.randn(5, 1, *shape, generator=torch.Generator().manual_seed(4))
    identity = affine_theta(torch.zeros(5, 3), torch.ones(5, 3), torch.zeros(5, 3), shape)
    assert torch.allclose(affine_resample(image, identity), image, atol=1e-6)
    theta = draws(5, shape, rotation=10, scaling=0.1, translation=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = affine_resample(image, theta)
        torch.set_num_threads(2)
        two = affine_resample(image, theta)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_gradients_and_other_dtypes_use_torch():
    shape = (6, 6, 6)
    theta = draws(2, shape, rotation=10)
    image = torch.randn(2, 1, *shape, requires_grad=True)
    affine_resample(image, theta).sum().backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    half = torch.randn(2, 1, *shape).to(torch.bfloat16)
    assert affine_resample(half, theta).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bicubic"):
        affine_resample(image.detach(), theta, "bicubic")


def test_over_threads_covers_every_item_once():
    seen = []
    over_threads(lambda a, b: seen.extend(range(a, b)), 11)
    assert sorted(seen) == list(range(11))
