"""Model registry: 3D networks that map a (B, C, X, Y, Z) image batch to (B, outputs).

``python -m pipeline.models --list`` prints the registered names; ``register`` and ``fetch``
put trained model packages into a registry and get them back (``pipeline.registry``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

REGISTRY: dict[str, type[nn.Module]] = {}


def register(name: str):
    """Class decorator adding a network to the registry under ``name``."""
    def add(cls):
        REGISTRY[name] = cls
        return cls
    return add


def build_model(name: str, in_channels: int, outputs: int, **kwargs) -> nn.Module:
    """Instantiate the registered network ``name``."""
    if name not in REGISTRY:
        raise KeyError(f"Unknown model {name!r}; registered models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](in_channels=in_channels, outputs=outputs, **kwargs)


NORMS = {"batch": nn.BatchNorm3d, "instance": lambda c: nn.InstanceNorm3d(c, affine=True)}


def _block(cin: int, cout: int, norm: str = "batch") -> nn.Sequential:
    """3x3x3 conv, normalisation (``batch`` or ``instance``), 2x max-pool, ReLU."""
    if norm not in NORMS:
        raise KeyError(f"Unknown norm {norm!r}; choose one of {sorted(NORMS)}")
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1, bias=False), NORMS[norm](cout),
                         nn.MaxPool3d(2), nn.ReLU(inplace=True))


@register("simple_cnn")
class SimpleCNN(nn.Module):
    """Conv-norm-pool-ReLU blocks, global average pooling and a linear head.

    ``norm="instance"`` (default) keeps validation losses stable with the small batches 3D
    images allow; ``"batch"`` uses BatchNorm, whose running statistics swing with batches of 8.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(8, 16, 32, 64), dropout: float = 0.2,
                 norm: str = "instance"):
        super().__init__()
        widths = [in_channels, *channels]
        self.features = nn.Sequential(*[_block(a, b, norm) for a, b in zip(widths[:-1], widths[1:])])
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(widths[-1], outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register("sfcn")
class SFCN(nn.Module):
    """Simple Fully Convolutional Network (Peng et al. 2021, Med Image Anal 68:101871).

    Five conv-BN-maxpool-ReLU blocks, a 1x1x1 conv block, average pooling, dropout and a 1x1x1
    conv classifier. ``channels`` defaults to the paper's (32, 64, 128, 256, 256, 64); the
    paper's soft-label age bins are replaced by ``outputs`` plain outputs.
    """

    def __init__(self, in_channels: int = 1, outputs: int = 1, channels=(32, 64, 128, 256, 256, 64), dropout: float = 0.5):
        super().__init__()
        *conv, last = channels
        widths = [in_channels, *conv]
        self.features = nn.Sequential(
            *[_block(a, b) for a, b in zip(widths[:-1], widths[1:])],
            nn.Conv3d(widths[-1], last, 1, bias=False), nn.BatchNorm3d(last), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(dropout), nn.Conv3d(last, outputs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).flatten(1)


def main(argv=None) -> None:
    from pipeline import registry

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--list", action="store_true", help="list registered models")
    registry.add_commands(parser.add_subparsers(dest="command"))  # register / fetch model packages
    args = parser.parse_args(argv)
    if args.command:
        registry.run_command(args)
    elif args.list:
        for name, cls in sorted(REGISTRY.items()):
            print(f"{name}\t{cls.__doc__.splitlines()[0]}")


if __name__ == "__main__":
    main()
