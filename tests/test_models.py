import pytest
import torch

from pipeline.models import REGISTRY, build_model, main


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("outputs", [1, 3])
def test_output_shape_and_gradients(name, outputs):
    kwargs = {"channels": (4, 4, 8, 8, 8, 4)} if name == "sfcn" else {}
    model = build_model(name, in_channels=1, outputs=outputs, **kwargs)
    x = torch.randn(2, 1, 40, 48, 40)
    y = model(x)
    assert y.shape == (2, outputs)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sfcn_has_the_papers_layout():
    model = build_model("sfcn", 1, 1)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 256, 256, 64, 1]
    assert [c.kernel_size for c in convs] == [(3, 3, 3)] * 5 + [(1, 1, 1)] * 2


def test_unknown_model_lists_registered_ones():
    with pytest.raises(KeyError, match="simple_cnn"):
        build_model("resnet1000", 1, 1)


def test_cli_lists_models(capsys):
    main(["--list"])
    out = capsys.readouterr().out
    assert "sfcn" in out and "simple_cnn" in out
