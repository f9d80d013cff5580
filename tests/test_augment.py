import torch

from pipeline.augment import Augmentation, affine_theta


def test_identity_parameters_leave_the_image_unchanged():
    x = torch.randn(2, 1, 10, 12, 8)
    params = {"rotation": torch.zeros(2, 3), "scaling": torch.ones(2, 3), "translation": torch.zeros(2, 3),
              "noise_seed": torch.tensor([0]), "gain": torch.ones(2), "shift": torch.zeros(2)}
    out = Augmentation(noise=0.0).apply(params, x)
    assert torch.allclose(out, x, atol=1e-5)


def test_translation_moves_the_content_along_the_named_axis():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 8, 8, 8] = 1
    params = {"rotation": torch.zeros(1, 3), "scaling": torch.ones(1, 3), "translation": torch.tensor([[2.0, 0, 0]]),
              "noise_seed": torch.tensor([0]), "gain": torch.ones(1), "shift": torch.zeros(1)}
    out = Augmentation(noise=0.0).apply(params, x)
    peak = (out[0, 0] == out.max()).nonzero()[0].tolist()
    assert peak in ([6, 8, 8], [10, 8, 8]) and peak[1:] == [8, 8]


def test_image_and_label_share_one_draw():
    aug = Augmentation(rotation=10, scaling=0.1, translation=3, noise=0.0, intensity=0.0)
    label = torch.zeros(2, 1, 20, 20, 20, dtype=torch.long)
    label[:, :, 5:12, 6:14, 4:10] = 1
    image = label.float()
    out, lab = aug(image, torch.Generator().manual_seed(3), label)
    assert lab.dtype == torch.long and set(lab.unique().tolist()) <= {0, 1}
    # the label follows the image: where the warped image is clearly inside, the label is 1
    assert (lab[out > 0.9] == 1).all() and (lab[out < 0.1] == 0).all()


def test_same_seed_same_draw():
    aug = Augmentation()
    x = torch.randn(3, 1, 8, 8, 8)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_rotation_matrix_is_orthonormal():
    theta = affine_theta(torch.tensor([[0.1, -0.2, 0.3]]), torch.ones(1, 3), torch.zeros(1, 3), (8, 8, 8))
    r = theta[0, :, :3]
    assert torch.allclose(r @ r.T, torch.eye(3), atol=1e-6)
