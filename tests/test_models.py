import pytest
import torch

from pipeline.learning.models import REGISTRY, build_model, main, recorded_args, resolved_args

# Small widths keep every architecture's test to a fraction of a second; layouts are the defaults'.
SMALL = {
    "simple_cnn": {"channels": (4, 8), "dropout": 0.0},
    "sfcn": {"channels": (4, 4, 8, 8, 8, 4), "dropout": 0.0},
    "sfcn_peng": {"channels": (4, 4, 8, 8, 8, 4), "dropout": 0.0},
    "alexnet": {"channels": (4, 8, 8, 8, 8), "dense": 16},
    "vgg": {"channels": (4, 8, 8, 8, 8), "convs": (1, 1, 2, 2, 2), "dense": 16},
    "resnet10": {"widths": (4, 8, 8, 8)},
    "resnet18": {"widths": (4, 8, 8, 8)},
    "densenet121": {"init_features": 4, "growth_rate": 2, "block_config": (1, 1, 1, 1), "bn_size": 1},
    "unet": {"features": (4, 4, 8, 8, 8, 4)},
}
SHAPE = {2: (32, 32), 3: (16, 16, 16)}
# DenseNet and SFCN halve the grid five times; the U-Net's bottom level needs > 1 voxel.
SHAPE_OF = {name: {2: (32, 32), 3: shape} for name, shape in
            [("densenet121", (32, 32, 32)), ("sfcn", (32, 32, 32)), ("sfcn_peng", (32, 32, 32)), ("unet", (32, 16, 16))]}


def test_every_registered_model_has_small_test_settings():
    assert set(SMALL) == set(REGISTRY)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_output_shape_and_one_step_lowers_the_loss(name, dims):
    torch.manual_seed(0)
    segmentation = REGISTRY[name].task == "segmentation"
    outputs, shape = 3, SHAPE_OF.get(name, SHAPE)[dims]
    model = build_model(name, in_channels=2, outputs=outputs, spatial_dims=dims, **SMALL[name])
    x = torch.randn(4, 2, *shape)
    y = torch.randint(0, outputs, (4, *shape) if segmentation else (4,))
    out = model(x)
    assert out.shape == ((4, outputs, *shape) if segmentation else (4, outputs))
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = criterion(out, y)
    optimizer.zero_grad()
    before.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    optimizer.step()
    with torch.no_grad():
        assert float(criterion(model(x), y)) < float(before)


def test_regression_output_is_one_column():
    model = build_model("resnet10", 1, 1, **SMALL["resnet10"])
    assert model(torch.randn(2, 1, 16, 16, 16)).shape == (2, 1)


def test_sfcn_has_the_papers_layout():
    model = build_model("sfcn", 1, 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 256, 64, 1]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 5 + [(1, 1, 1)] * 2


def test_simple_cnn_defaults_to_batch_norm_and_old_records_keep_instance_norm():
    model = build_model("simple_cnn", 1, 1)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    recorded = resolved_args("simple_cnn", {"channels": [4, 8]})
    assert recorded["norm"] == "batch" and recorded["dropout"] == 0.0 and recorded["channels"] == [4, 8]
    old = recorded_args("simple_cnn", {"channels": [4, 8]})  # a model recorded before the defaults changed
    legacy = build_model("simple_cnn", 1, 1, **old)
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in legacy.modules()) and old["dropout"] == 0.2
    assert recorded_args("simple_cnn", recorded) == recorded  # a new record is taken as it is


def test_pooling_heads_read_features_anywhere_or_by_place():
    x = torch.zeros(2, 1, 16, 20, 16)
    x[0, 0, 2:5, 2:5, 2:5] = 3.0
    for pool in ("avg", "max", "grid"):
        model = build_model("simple_cnn", 1, 2, channels=[4, 8], pool=pool).eval()
        assert model(x).shape == (2, 2)
    grid = build_model("simple_cnn", 1, 1, channels=[4, 8], pool="grid", grid=[2, 3, 2])
    assert grid.head[-1].in_features == 8 * 2 * 3 * 2
    with pytest.raises(KeyError, match="Unknown pool"):
        build_model("simple_cnn", 1, 1, pool="sum")


def test_vgg_defaults_to_vgg19_and_alexnet_to_its_kernels():
    vgg = [m for m in build_model("vgg", 1, 1, dense=8).modules() if isinstance(m, torch.nn.Conv3d)]
    assert len(vgg) == 16 and vgg[-1].out_channels == 512
    alex = [m for m in build_model("alexnet", 1, 1, dense=8).modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.kernel_size[0] for c in alex] == [11, 5, 3, 3, 3] and alex[0].stride == (4, 4, 4)


def test_unknown_model_lists_registered_ones():
    with pytest.raises(KeyError, match="simple_cnn.*unet|unet.*simple_cnn"):
        build_model("resnet1000", 1, 1)


def test_cli_lists_models_with_dims_and_description(capsys):
    main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(REGISTRY)
    rows = {line.split()[0]: line for line in lines}
    assert "2D/3D" in rows["resnet18"] and "MONAI" in rows["densenet121"] and "segmentation" in rows["unet"]
