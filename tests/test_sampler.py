import pytest
import torch
from torch import nn

from pipeline.learning.sampler import ImageModel, PatchSampler, Sampler, SliceSampler, aggregate, build_sampler


def coded_images(n=4, shape=(6, 7, 5)) -> torch.Tensor:
    """(n, 1, X, Y, Z) images whose voxel value encodes image and position: 1000 i + 100 x + 10 y + z."""
    i, x, y, z = torch.meshgrid(*[torch.arange(s) for s in (n, *shape)], indexing="ij")
    return (1000 * i + 100 * x + 10 * y + z).float().unsqueeze(1)


def decode(value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    v = value.long()
    return v // 1000, v // 100 % 10, v // 10 % 10, v % 10


@pytest.mark.parametrize("sampler", [SliceSampler(batch_size=8, per_image=6, axis=1),
                                     PatchSampler(batch_size=8, per_image=6, size=(3, 4, 2)),
                                     Sampler(batch_size=2)], ids=["slices", "patches", "image"])
def test_sub_batch_count_per_epoch(sampler):
    n_images, batch_images = 12, 4
    x, y = coded_images(batch_images), torch.arange(batch_images).float()
    generator = torch.Generator().manual_seed(0)
    steps, views = 0, 0
    for _ in range(n_images // batch_images):
        for vx, vy in sampler.sub_batches(x, y, generator):
            assert len(vx) == len(vy) == sampler.batch_size
            steps, views = steps + 1, views + len(vx)
    assert views == n_images * sampler.per_image
    assert steps == sampler.count(n_images, batch_images) == n_images * sampler.per_image // sampler.batch_size


def test_count_drops_a_last_sub_batch_of_one_view():
    sampler = SliceSampler(batch_size=4, per_image=3)
    x, y = coded_images(3), torch.arange(3).float()  # 9 views: 4 + 4 + (1 dropped)
    sizes = [len(vx) for vx, _ in sampler.sub_batches(x, y, torch.Generator().manual_seed(0))]
    assert sizes == [4, 4] and sampler.count(3, 3) == 2


def test_slices_carry_their_image_target_and_distinct_positions():
    sampler = SliceSampler(batch_size=4, per_image=4, axis=1)
    x, y = coded_images(), torch.tensor([10.0, 11.0, 12.0, 13.0])
    seen = []
    for vx, vy in sampler.sub_batches(x, y, torch.Generator().manual_seed(1)):
        assert vx.shape[1:] == (1, 6, 5)  # (C, X, Z): axis 1 removed
        image, _, pos, _ = decode(vx[:, 0])
        assert (image == image[:, :1, :1]).all() and (pos == pos[:, :1, :1]).all()  # one slice each
        assert torch.equal(vy, y[image[:, 0, 0]])
        seen += [(int(i), int(p)) for i, p in zip(image[:, 0, 0], pos[:, 0, 0])]
    assert len(seen) == len(set(seen)) == 16


def test_patches_cut_label_images_like_their_images():
    sampler = PatchSampler(batch_size=3, per_image=5, size=(3, 4, 2))
    x = coded_images()
    label = x.long() % 7  # a label image that is a function of the voxel
    for vx, vy in sampler.sub_batches(x, label, torch.Generator().manual_seed(2)):
        assert vx.shape[1:] == (1, 3, 4, 2) and vy.shape == (len(vx), 1, 3, 4, 2) and vy.dtype == torch.long
        assert torch.equal(vy, vx.long() % 7)
        _, px, py, pz = decode(vx[:, 0])
        assert torch.equal(px[:, :, 0, 0] - px[:, :1, 0, 0], torch.arange(3).expand(len(vx), 3))


def test_slices_of_label_images():
    sampler = SliceSampler(batch_size=4, per_image=2, axis=0)
    x = coded_images(2)
    for vx, vy in sampler.sub_batches(x, x.long(), torch.Generator().manual_seed(0)):
        assert torch.equal(vy, vx.long()) and vy.shape == (4, 1, 7, 5)


def test_prediction_patch_grid_covers_every_voxel():
    sampler = PatchSampler(size=(4, 4, 4))
    views, index = sampler.prediction_views(torch.zeros(2, 1, 10, 9, 4))
    covered = torch.zeros(10, 9, 4, dtype=torch.bool)
    for a, b, c in sampler.grid((10, 9, 4)):
        covered[a:a + 4, b:b + 4, c:c + 4] = True
    assert covered.all() and len(views) == 2 * len(sampler.grid((10, 9, 4))) and index.max() == 1


def test_aggregate_is_the_mean_per_image():
    outputs = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 4.0], [5.0, 5.0], [6.0, 6.0]])
    index = torch.tensor([0, 0, 1, 2, 2])
    assert torch.equal(aggregate(outputs, index, 3), torch.tensor([[2.0, 1.0], [10.0, 4.0], [5.5, 5.5]]))


class MeanNet(nn.Module):
    def forward(self, x):
        return x.flatten(1).mean(1, keepdim=True)


def test_image_model_predicts_one_value_per_image_from_all_slices():
    x = coded_images(3)
    model = ImageModel(MeanNet(), SliceSampler(axis=2), chunk=4)
    assert torch.allclose(model(x), x.flatten(1).mean(1, keepdim=True))
    assert torch.equal(ImageModel(MeanNet(), Sampler())(x), MeanNet()(x))


def test_build_sampler_from_config():
    assert build_sampler({}).kind == "image"
    s = build_sampler({"kind": "slices", "axis": 0, "per_image": 3, "batch_size": 16})
    assert (s.kind, s.axis, s.per_image, s.batch_size, s.spatial_dims) == ("slices", 0, 3, 16, 2)
    p = build_sampler({"kind": "patches", "size": [8, 8, 8]})
    assert p.size == (8, 8, 8) and p.per_image == 8 and p.spatial_dims == 3
    defaults = {"axis": 2, "per_image": 8, "size": [32, 32, 32], "batch_size": None}  # what the schema fills in
    assert build_sampler({"kind": "image", **defaults}) == build_sampler({})
    assert build_sampler({"kind": "slices", **defaults}).axis == 2
    with pytest.raises(ValueError, match="patches"):
        build_sampler({"kind": "blocks"})
    with pytest.raises(ValueError, match="stride"):
        build_sampler({"kind": "patches", "stride": 4})
    with pytest.raises(ValueError, match="larger than the image"):
        list(p.sub_batches(torch.zeros(2, 1, 4, 4, 4), torch.zeros(2), torch.Generator()))


@pytest.mark.parametrize("sampler", [Sampler(), SliceSampler(axis=0), SliceSampler(axis=2), PatchSampler(size=(4, 4, 2))],
                         ids=["image", "slices-0", "slices-2", "patches"])
def test_place_puts_each_view_back_where_it_was_cut(sampler):
    x = coded_images(1, shape=(10, 7, 5))
    views, _ = sampler.prediction_views(x)
    assert torch.equal(sampler.place(views[:, 0], (10, 7, 5)), x[0, 0])


def test_place_averages_overlapping_patches():
    sampler = PatchSampler(size=(4, 4, 4))
    shape = (8, 6, 4)  # starts x: 0, 2, 4; y: 0, 2; z: 0 (six patches)
    assert len(sampler.grid(shape)) == 6
    maps = torch.arange(1.0, 7.0).view(6, 1, 1, 1).expand(6, 4, 4, 4)  # patch k is all k + 1
    placed = sampler.place(maps, shape)
    assert placed[0, 0, 0] == 1 and placed[7, 5, 3] == 6  # corners: one patch each
    assert placed[2, 0, 0] == (1 + 3) / 2 and placed[3, 3, 0] == (1 + 2 + 3 + 4) / 4
