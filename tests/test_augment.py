import pytest
import torch

from pipeline.learning.augment import (Augmentation, RandomAffine, RandomBiasField, RandomGamma, RandomGhosting,
                              RandomIntensity, RandomNoise, RandomSmoothing, affine_theta, main, select)


def identity_affine(batch: int, translation=None) -> dict:
    return {"rotation": torch.zeros(batch, 3), "scaling": torch.ones(batch, 3),
            "translation": torch.zeros(batch, 3) if translation is None else translation,
            "shear": torch.zeros(batch, 3), "flip": torch.ones(batch, 3)}


def cube(batch=2, size=20) -> torch.Tensor:
    """(B, 1, size, size, size) label images: an off-centre, asymmetric box of 1s."""
    label = torch.zeros(batch, 1, size, size, size, dtype=torch.long)
    label[:, :, 5:12, 6:14, 4:10] = 1
    return label


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_identity_parameters_leave_the_image_unchanged():
    x = torch.randn(2, 1, 10, 12, 8)
    assert torch.allclose(RandomAffine().apply(identity_affine(2), x), x, atol=1e-5)


def test_translation_moves_the_content_along_the_named_axis():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 8, 8, 8] = 1
    out = RandomAffine().apply(identity_affine(1, torch.tensor([[2.0, 0, 0]])), x)
    peak = (out[0, 0] == out.max()).nonzero()[0].tolist()
    assert peak in ([6, 8, 8], [10, 8, 8]) and peak[1:] == [8, 8]


@pytest.mark.parametrize("shift", [(2, 0, 0), (0, -3, 1), (1, 2, -2)])
@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, 1)])
def test_label_stays_aligned_with_its_image_at_integer_shifts(shift, flip):
    label = cube()
    image = label.float() * 3 - 1  # the known structure: the box is bright
    params = identity_affine(2, torch.tensor([shift, shift], dtype=torch.float32))
    params["flip"] = torch.tensor([flip, flip], dtype=torch.float32)
    aug = Augmentation(rotation=0, scaling=0, translation=0, noise=0.1, intensity=0.1, flip=(0,))
    full = {"affine": params, **{k: v for k, v in aug.sample(2, torch.Generator().manual_seed(0)).items()
                                 if k != "affine"}}
    out, lab = aug.apply(full, image, label)
    assert lab.dtype == torch.long and lab.sum() == label.sum()  # the box stays inside the grid
    assert dice(out > 0.5, lab == 1) == 1.0
    assert not torch.equal(lab, label)


def test_image_and_label_share_one_random_draw():
    aug = Augmentation(rotation=10, scaling=0.1, translation=3, shear=0.1, noise=0.0, intensity=0.0)
    label = cube()
    out, lab = aug(label.float(), torch.Generator().manual_seed(3), label)
    assert lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1}
    assert (lab[out > 0.9] == 1).all() and (lab[out < 0.1] == 0).all()
    assert dice(out > 0.5, lab == 1) > 0.95


def test_same_seed_same_draw_and_draws_differ_between_images():
    aug = Augmentation(smoothing=1, bias_field=0.3, gamma=0.3, ghosting=0.5, shear=0.05)
    x = torch.randn(1, 1, 8, 8, 8).repeat(3, 1, 1, 1, 1)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a[0], a[1])


def test_a_subset_of_draws_reproduces_those_images():
    """What each process of a multi-GPU run does with its share of a batch."""
    aug = Augmentation(smoothing=1, bias_field=0.3, gamma=0.3, ghosting=0.5)
    x = torch.randn(4, 1, 8, 8, 8)
    params = aug.sample(4, torch.Generator().manual_seed(1))
    whole = aug.apply(params, x)
    assert torch.allclose(aug.apply(select(params, slice(2, 4)), x[2:]), whole[2:], atol=1e-6)


def test_augmentation_is_off_by_default_and_flip_stays_off_when_others_are_on():
    assert Augmentation().transforms() == {}
    assert Augmentation().apply(Augmentation().sample(2, torch.Generator()), torch.ones(2, 1, 4, 4, 4)).eq(1).all()
    rotating = Augmentation(rotation=5)
    assert rotating.flip == () and "affine" in rotating.transforms()
    params = rotating.sample(50, torch.Generator().manual_seed(0))
    assert (params["affine"]["flip"] == 1).all()
    flipped = Augmentation(flip=[0]).sample(50, torch.Generator().manual_seed(0))["affine"]["flip"]
    assert set(flipped[:, 0].tolist()) == {-1.0, 1.0} and (flipped[:, 1:] == 1).all()
    with pytest.raises(ValueError, match="flip"):
        Augmentation(flip=[3])


def test_flip_mirrors_the_named_axis():
    x = torch.arange(8.0).view(1, 1, 8, 1, 1).expand(1, 1, 8, 2, 2).contiguous()
    params = identity_affine(1)
    params["flip"] = torch.tensor([[-1.0, 1, 1]])
    assert torch.allclose(RandomAffine().apply(params, x), x.flip(2), atol=1e-5)


def test_zero_ranges_turn_transforms_off():
    aug = Augmentation(rotation=0, scaling=0, translation=0, noise=0, intensity=0)
    assert aug.transforms() == {}
    x = torch.randn(2, 1, 6, 6, 6)
    assert torch.equal(aug(x, torch.Generator()), x)


def test_noise_has_the_configured_sd():
    x = torch.zeros(2, 1, 32, 32, 32)
    out = RandomNoise(sd=0.2)(x, torch.Generator().manual_seed(0))
    assert abs(float(out.std()) - 0.2) < 0.01


def test_intensity_gain_and_shift():
    x = torch.ones(2, 1, 4, 4, 4)
    out = RandomIntensity().apply({"gain": torch.tensor([2.0, 0.5]), "shift": torch.tensor([1.0, 0.0])}, x)
    assert torch.allclose(out[0], torch.full_like(out[0], 3.0)) and torch.allclose(out[1], torch.full_like(out[1], 0.5))


def test_smoothing_keeps_the_mean_and_lowers_the_variance():
    x = torch.randn(2, 1, 16, 16, 16)
    out = RandomSmoothing(sigma=2).apply({"sigma": torch.tensor([0.0, 2.0])}, x)
    assert torch.allclose(out[0], x[0], atol=1e-5)
    inner = (slice(6, 10),) * 3
    assert out[1, 0][inner].std() < 0.5 * x[1, 0][inner].std()


def test_bias_field_is_smooth_positive_and_multiplicative():
    x = torch.ones(1, 1, 12, 12, 12)
    t = RandomBiasField(amplitude=0.3)
    out = t(x, torch.Generator().manual_seed(0))
    assert (out > 0).all() and not torch.allclose(out, x)
    assert float((out[..., 1:] - out[..., :-1]).abs().max()) < 0.3
    assert torch.allclose(t.apply(t.sample(1, torch.Generator().manual_seed(0)), 2 * x), 2 * out)


def test_gamma_keeps_the_range_and_is_monotonic():
    x = torch.linspace(-2, 3, 64).view(1, 1, 4, 4, 4)
    out = RandomGamma().apply({"gamma": torch.tensor([2.0])}, x)
    assert torch.isclose(out.min(), x.min()) and torch.isclose(out.max(), x.max())
    assert (out.flatten().diff() > 0).all() and (out < x + 1e-6).all()


def test_ghosting_adds_shifted_copies_along_the_drawn_axis():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 6:10, 6:8, 6:10] = 1  # narrower than the ghost period along axis 1
    params = {"axis": torch.tensor([1]), "period": torch.tensor([4]), "strength": torch.tensor([1.0])}
    out = RandomGhosting().apply(params, x)
    ghost = out[0, 0, 8, 2, 8]  # a copy 16 / 4 = 4 voxels away along axis 1
    assert ghost.abs() > 0.05 and out[0, 0, 2, 8, 8].abs() < 1e-5  # nothing along axis 0
    assert torch.allclose(out.sum(), x.sum(), atol=1e-3)  # k = 0 is untouched: the mean stays


@pytest.mark.parametrize("transform", [Augmentation(flip=[0]), RandomGhosting(), RandomBiasField(),
                                       RandomSmoothing(), RandomGamma()], ids=lambda t: type(t).__name__)
def test_preview_writes_a_png_grid(tmp_path, transform):
    png = transform.preview(torch.randn(1, 10, 12, 10), 3, tmp_path / "preview.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_preview_cli(tmp_path):
    import numpy as np

    np.save(tmp_path / "a.npy", np.random.default_rng(0).normal(size=(1, 10, 12, 10)).astype(np.float32))
    main([str(tmp_path / "a.npy"), "-n", "2", "--augmentation", '{"rotation": 20}', "--out", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_rotation_matrix_is_orthonormal():
    theta = affine_theta(torch.tensor([[0.1, -0.2, 0.3]]), torch.ones(1, 3), torch.zeros(1, 3), (8, 8, 8))
    r = theta[0, :, :3]
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
