"""Model registry: networks chosen by name in config `train.model` (+ `train.model_args`).

Classifiers and regressors map a (B, C, *spatial) batch to (B, outputs); segmentation networks
map it to (B, K, *spatial). ``spatial_dims`` is 3 for whole images and patches, 2 for slices.
ResNet, DenseNet and U-Net are MONAI's implementations; SFCN, the simple CNN, AlexNet and VGG
(the layouts of ANTsPyNet's, which nitrain serves) are written here. ``bids-deepstudy
networks`` prints the registry. (Trained model packages have their own: ``pipeline.sharing.registry``.)
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """A registered network: ``build(in_channels, outputs, spatial_dims, **args)`` → nn.Module."""

    build: Callable[..., nn.Module]
    description: str
    dims: tuple[int, ...] = (2, 3)
    task: str = "image"  # "image": (B, outputs); "segmentation": (B, K, *spatial)


REGISTRY: dict[str, ModelSpec] = {}
# Networks an imported package is rebuilt with (``pipeline.sharing.importer``): their definition
# comes from the package, not from config, so they are no `train.model` choices.
FOREIGN: dict[str, ModelSpec] = {}


def register(name: str, description: str, dims=(2, 3), task: str = "image", registry: dict | None = None):
    """Decorator adding a network class or factory to the registry (or ``FOREIGN``) under ``name``."""
    def add(build):
        (REGISTRY if registry is None else registry)[name] = ModelSpec(build, description, tuple(dims), task)
        return build
    return add


def build_model(name: str, in_channels: int, outputs: int, spatial_dims: int = 3, **kwargs) -> nn.Module:
    """Instantiate the registered network ``name`` for ``spatial_dims``-D inputs of ``in_channels``."""
    spec = REGISTRY.get(name) or FOREIGN.get(name)
    if spec is None:
        raise KeyError(f"Unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    if spatial_dims not in spec.dims:
        raise ValueError(f"Model {name!r} supports {spec.dims}-D inputs, not {spatial_dims}-D")
    return spec.build(in_channels=in_channels, outputs=outputs, spatial_dims=spatial_dims, **kwargs)


# Defaults that changed: a trained model recorded before the change, with these arguments left
# out, was built with these values (simple_cnn's defaults before the learning recipe of
# docs/benchmarks.md, *Learning*). Records written since hold every argument (``resolved_args``).
LEGACY_ARGS = {"simple_cnn": {"norm": "instance", "dropout": 0.2, "pool": "avg", "downsample": "max"}}
FIXED = ("in_channels", "outputs", "spatial_dims")  # set by the study, not by `train.model_args`


def resolved_args(name: str, args: dict) -> dict:
    """``args`` with every other keyword argument of the network's builder at its default, so a
    record keeps meaning the same network when a default changes. Unknown names stay for
    ``build_model`` to refuse."""
    if name not in REGISTRY:
        return dict(args)
    defaults = {k: p.default for k, p in inspect.signature(REGISTRY[name].build).parameters.items()
                if k not in FIXED and p.default is not inspect.Parameter.empty}
    return {**{k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()}, **args}


def recorded_args(name: str, args: dict) -> dict:
    """The arguments a recorded model was built with: a record from before a default changed
    lacks them, and gets the old value (``LEGACY_ARGS``)."""
    return {**LEGACY_ARGS.get(name, {}), **args}


def layers(spatial_dims: int):
    """(Conv, MaxPool, AdaptiveAvgPool, BatchNorm, InstanceNorm) classes for 2 or 3 dims."""
    if spatial_dims == 2:
        return nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.InstanceNorm2d
    return nn.Conv3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d, nn.BatchNorm3d, nn.InstanceNorm3d


def norm_layer(norm: str, channels: int, spatial_dims: int) -> nn.Module:
    """``batch`` (BatchNorm) or ``instance`` (InstanceNorm with affine parameters)."""
    *_, batch, instance = layers(spatial_dims)
    if norm == "batch":
        return batch(channels)
    if norm == "instance":
        return instance(channels, affine=True)
    raise KeyError(f"Unknown norm {norm!r}; choose one of ['batch', 'instance']")


def _block(cin: int, cout: int, norm: str = "batch", spatial_dims: int = 3, downsample: str = "max") -> nn.Sequential:
    """3^d conv, normalisation (``batch`` or ``instance``), 2x max- (or ``avg``) pooling, ReLU."""
    conv, pool, *_ = layers(spatial_dims)
    if downsample == "avg":
        pool = nn.AvgPool2d if spatial_dims == 2 else nn.AvgPool3d
    return nn.Sequential(conv(cin, cout, 3, padding=1, bias=False), norm_layer(norm, cout, spatial_dims),
                         pool(2), nn.ReLU(inplace=True))


def pooling_head(pool: str, channels: int, outputs: int, dropout: float, spatial_dims: int,
                 grid=(4, 5, 4)) -> nn.Sequential:
    """The head that turns (B, channels, *spatial) features into (B, outputs).

    ``avg`` (global average pooling) and ``max`` (global max: a focal finding anywhere counts in
    full) are translation invariant; ``grid`` averages the features onto a fixed coarse ``grid``
    and reads every cell with its own weights, so the head knows where a feature is (images
    registered to a template: an effect has a place), like a linear model on the features."""
    conv, maxpool, avgpool, *_ = layers(spatial_dims)
    if pool == "avg":
        reduce, width = avgpool(1), channels
    elif pool == "max":
        reduce, width = (nn.AdaptiveMaxPool2d if spatial_dims == 2 else nn.AdaptiveMaxPool3d)(1), channels
    elif pool == "grid":
        cells = tuple(grid)[:spatial_dims]
        reduce, width = avgpool(cells), channels * int(torch.tensor(cells).prod())
    else:
        raise KeyError(f"Unknown pool {pool!r}; choose one of ['avg', 'max', 'grid']")
    return nn.Sequential(reduce, nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, outputs))


@register("simple_cnn", "Conv-norm-pool-ReLU blocks and a linear head over average, max or grid pooling.")
class SimpleCNN(nn.Module):
    """Conv-norm-pool-ReLU blocks, then ``pooling_head`` (``pool``: avg, max or grid).

    The defaults are the measured recipe of docs/benchmarks.md (*Learning*): BatchNorm (``norm=
    "batch"``) and no dropout fit small cohorts' training images where InstanceNorm, which
    normalises every feature map of every image, and dropout held the networks back (the linear
    baseline beat them 3x on the demo). ``"instance"`` suits batches of 1-2 images.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(8, 16, 32, 64), dropout: float = 0.0,
                 norm: str = "batch", pool: str = "avg", grid=(4, 5, 4), downsample: str = "max",
                 spatial_dims: int = 3):
        super().__init__()
        widths = [in_channels, *channels]
        self.features = nn.Sequential(*[_block(a, b, norm, spatial_dims, downsample)
                                        for a, b in zip(widths[:-1], widths[1:])])
        self.head = pooling_head(pool, widths[-1], outputs, dropout, spatial_dims, grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("sfcn", "Simple Fully Convolutional Network for brain age (Peng et al. 2021).")
class SFCN(nn.Module):
    """Simple Fully Convolutional Network (Peng et al. 2021, Med Image Anal 68:101871).

    Five conv-BN-maxpool-ReLU blocks, a 1x1x1 conv block, average pooling, dropout and a 1x1x1
    conv classifier. ``channels`` defaults to the paper's (32, 64, 128, 256, 256, 64); the
    paper's soft-label age bins are replaced by ``outputs`` plain outputs.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(32, 64, 128, 256, 256, 64),
                 dropout: float = 0.5, spatial_dims: int = 3):
        super().__init__()
        conv, _, avgpool, batchnorm, _ = layers(spatial_dims)
        *hidden, last = channels
        widths = [in_channels, *hidden]
        self.features = nn.Sequential(
            *[_block(a, b, "batch", spatial_dims) for a, b in zip(widths[:-1], widths[1:])],
            conv(widths[-1], last, 1, bias=False), batchnorm(last), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(avgpool(1), nn.Dropout(dropout), conv(last, outputs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).flatten(1)


@register("sfcn_peng", "SFCN in its authors' published PyTorch layout: log-probabilities over soft-label bins.")
class PublishedSFCN(nn.Module):
    """SFCN as Peng et al. published it (github.com/ha-ha-ha-han/UKBiobank_deep_pretrain), so their
    state dicts load: ``feature_extractor.conv_0`` … ``conv_{n-2}`` are conv 3^d (bias) - BatchNorm -
    2x max-pool - ReLU, ``conv_{n-1}`` a 1^d conv - BatchNorm - ReLU; ``classifier`` averages,
    drops out and maps to ``outputs`` bins with ``conv_{n}`` (1^d). Returns (B, outputs)
    log-probabilities (their log-softmax; their code returns it in a list, shaped (B, K, 1, 1, 1));
    with one output (a fine-tuned regression head) the output itself.
    Their fixed ``AvgPool3d([5, 6, 5])`` (for 160x192x160 inputs) is an adaptive average here:
    the same on their grid, and any grid works. The paper's widths and 40 age bins are the defaults.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 40, channels=(32, 64, 128, 256, 256, 64),
                 dropout: float = 0.5, spatial_dims: int = 3):
        super().__init__()
        conv, maxpool, avgpool, batchnorm, _ = layers(spatial_dims)
        self.feature_extractor = nn.Sequential()
        widths = [in_channels, *channels]
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            if i < len(channels) - 1:
                block = [conv(a, b, 3, padding=1), batchnorm(b), maxpool(2, stride=2), nn.ReLU()]
            else:
                block = [conv(a, b, 1, padding=0), batchnorm(b), nn.ReLU()]
            self.feature_extractor.add_module(f"conv_{i}", nn.Sequential(*block))
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", avgpool(1))
        if dropout:
            self.classifier.add_module("dropout", nn.Dropout(dropout))
        self.classifier.add_module(f"conv_{len(channels)}", conv(channels[-1], outputs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.classifier(self.feature_extractor(x)).flatten(1)
        return torch.log_softmax(out, dim=1) if out.shape[1] > 1 else out


@register("alexnet", "AlexNet as in nitrain/ANTsPyNet: 5 convs (11-5-3-3-3), 3 max-pools, 2 dense layers.")
class AlexNet(nn.Module):
    """AlexNet in ANTsPyNet's layout (which nitrain's ``fetch_architecture('alexnet')`` serves):
    conv 11^d stride 4, max-pool, conv 5^d, max-pool, three 3^d convs, max-pool, two ReLU dense
    layers of ``dense`` units with ``dropout``, linear output. Pools are padded and the features
    averaged to one vector before the dense layers, so any input of at least 11 voxels per axis works.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(96, 256, 384, 384, 256), dense: int = 4096,
                 dropout: float = 0.0, spatial_dims: int = 3):
        super().__init__()
        conv, maxpool, avgpool, *_ = layers(spatial_dims)
        c1, c2, c3, c4, c5 = channels
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        pool = lambda: maxpool(3, stride=2, padding=1)  # noqa: E731
        self.features = nn.Sequential(
            conv(in_channels, c1, 11, stride=4, padding=2), relu(), pool(),
            conv(c1, c2, 5, padding=2), relu(), pool(),
            conv(c2, c3, 3, padding=1), relu(), conv(c3, c4, 3, padding=1), relu(),
            conv(c4, c5, 3, padding=1), relu(), pool(), avgpool(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(c5, dense), relu(), nn.Dropout(dropout), nn.Linear(dense, dense), relu(),
                                  nn.Dropout(dropout), nn.Linear(dense, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("vgg", "VGG as in nitrain/ANTsPyNet (style 19 by default): 3^d conv blocks, max-pools, 2 dense layers.")
class VGG(nn.Module):
    """VGG in ANTsPyNet's layout: blocks of ``convs[i]`` 3^d conv-ReLU layers of ``channels[i]``
    filters, each block followed by a 2x max-pool; two ReLU dense layers of ``dense`` units with
    ``dropout``; linear output. Defaults are VGG19 (convs 2-2-4-4-4, filters 64…512); the
    features are averaged to one vector before the dense layers (any input size works).
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(64, 128, 256, 512, 512),
                 convs=(2, 2, 4, 4, 4), dense: int = 4096, dropout: float = 0.0, spatial_dims: int = 3):
        super().__init__()
        conv, maxpool, avgpool, *_ = layers(spatial_dims)
        modules, cin = [], in_channels
        for cout, n in zip(channels, convs):
            for _ in range(n):
                modules += [conv(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
                cin = cout
            modules.append(maxpool(2, ceil_mode=True))
        self.features = nn.Sequential(*modules, avgpool(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(cin, dense), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(dense, dense), nn.ReLU(inplace=True), nn.Dropout(dropout),
                                  nn.Linear(dense, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _resnet(depth_layers: list[int]):
    def build(in_channels: int, outputs: int, spatial_dims: int = 3, widths=(64, 128, 256, 512), **kwargs):
        from monai.networks.nets import ResNet

        return ResNet("basic", depth_layers, list(widths), spatial_dims=spatial_dims, n_input_channels=in_channels,
                      num_classes=outputs, **kwargs)
    return build


register("resnet10", "MONAI ResNet-10 (basic blocks 1-1-1-1); `widths` sets the four stages' channels.")(
    _resnet([1, 1, 1, 1]))
register("resnet18", "MONAI ResNet-18 (basic blocks 2-2-2-2); `widths` sets the four stages' channels.")(
    _resnet([2, 2, 2, 2]))


@register("densenet121", "MONAI DenseNet-121 (dense blocks 6-12-24-16, growth rate 32).")
def densenet121(in_channels: int, outputs: int, spatial_dims: int = 3, **kwargs) -> nn.Module:
    """MONAI's DenseNet121; ``kwargs`` go to ``monai.networks.nets.DenseNet`` (e.g. ``init_features``)."""
    from monai.networks.nets import DenseNet

    kwargs = {"init_features": 64, "growth_rate": 32, "block_config": (6, 12, 24, 16), **kwargs}
    return DenseNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=outputs, **kwargs)


@register("unet", "MONAI BasicUNet for segmentation: (B, C, *spatial) → (B, K classes, *spatial).",
          task="segmentation")
def unet(in_channels: int, outputs: int, spatial_dims: int = 3, features=(32, 32, 64, 128, 256, 32),
         **kwargs) -> nn.Module:
    """MONAI's BasicUNet (four 2x down/up-sampling levels: each spatial size a multiple of 16);
    ``outputs`` is the number of classes K, background included; output logits (B, K, *spatial)."""
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=outputs,
                     features=tuple(features), **kwargs)


BUNDLE_TARGETS = "monai."  # a bundle's network_def may only build MONAI's own classes


def check_bundle_definition(definition, where: str = "network_def") -> None:
    """ValueError unless ``definition`` builds MONAI classes only: every ``_target_`` a MONAI name
    (``monai.…``, or a bare class name, which MONAI looks up among its own), no ``$`` expressions
    (Python that the bundle parser would evaluate) and no ``@`` references left unresolved."""
    if isinstance(definition, dict):
        for key, value in definition.items():
            if key == "_target_" and not (isinstance(value, str) and (value.startswith(BUNDLE_TARGETS)
                                                                      or value.isidentifier())):
                raise ValueError(f"{where}._target_ is {value!r}: only MONAI classes are built from a bundle")
            check_bundle_definition(value, f"{where}.{key}")
    elif isinstance(definition, list):
        for i, value in enumerate(definition):
            check_bundle_definition(value, f"{where}[{i}]")
    elif isinstance(definition, str) and definition[:1] in ("$", "@", "%"):
        raise ValueError(f"{where} is {definition!r}: expressions and references are not rebuilt; "
                         "the import resolves them to values")


@register("monai_bundle", "A MONAI bundle's own network_def (MONAI classes only), built with monai.bundle.",
          (1, 2, 3), "any", FOREIGN)
def monai_bundle(in_channels: int = 1, outputs: int = 1, spatial_dims: int = 3, network_def: dict | None = None):
    """The network of a MONAI bundle's ``network_def`` (references resolved at import, MONAI classes
    only: ``check_bundle_definition``), built by ``monai.bundle.ConfigParser``. ``in_channels``,
    ``outputs`` and ``spatial_dims`` are the definition's own."""
    from monai.bundle import ConfigParser

    check_bundle_definition(network_def)
    return ConfigParser({"network_def": network_def}).get_parsed_content("network_def")


@register("user_code", "A network built by user code, `module:factory` with keyword arguments (not ours).",
          (1, 2, 3), "any", FOREIGN)
def user_code(in_channels: int = 1, outputs: int = 1, spatial_dims: int = 3, factory: str = "",
              kwargs: dict | None = None) -> nn.Module:
    """``factory(**kwargs)`` from ``module:factory`` (importable where the package is used)."""
    import importlib

    module, _, name = factory.partition(":")
    if not module or not name:
        raise ValueError(f"user_code factory {factory!r} is not 'module:function'")
    return getattr(importlib.import_module(module), name)(**(kwargs or {}))


def keras_port(in_channels: int = 1, outputs: int = 1, spatial_dims: int = 3, layers: list | None = None) -> nn.Module:
    """A Keras network ported to PyTorch (``pipeline.learning.ported``)."""
    from pipeline.learning.ported import keras_network

    return keras_network(in_channels, outputs, spatial_dims, layers)


register("keras_port", "A Keras network ported to PyTorch from its layer list (pipeline.learning.ported).",
         (1, 2, 3), "any", FOREIGN)(keras_port)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list registered networks: name, dims, task, description")
    parser.parse_args(argv)
    for name, spec in sorted(REGISTRY.items()):
        dims = "/".join(f"{d}D" for d in spec.dims)
        print(f"{name:<12} {dims:<6} {spec.task:<13} {spec.description}")


if __name__ == "__main__":
    main()
