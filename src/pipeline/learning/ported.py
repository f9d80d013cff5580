"""A Keras network rebuilt in PyTorch from a plain description of its layers (``pipeline.sharing.kerasport``).

The description is a JSON list, one dict per Keras layer in order, so a package records it in
``spec.json`` and rebuilds the network without Keras or TensorFlow::

    {"name": "conv3d", "type": "conv", "in": 1, "out": 4, "kernel": [3, 3, 3], "strides": [1, 1, 1],
     "padding": "same", "dilation": [1, 1, 1], "bias": true, "activation": "relu"}
    {"name": "bn", "type": "batchnorm", "channels": 4, "eps": 0.001, "momentum": 0.01, "center": true, "scale": true}
    {"name": "pool", "type": "maxpool" | "avgpool", "pool": [2, 2, 2], "strides": [2, 2, 2], "padding": "same"}
    {"name": "gap", "type": "global_avgpool" | "global_maxpool"}
    {"name": "flat", "type": "flatten"}        channels-last order, as Keras flattens
    {"name": "fc", "type": "dense", "in": 36, "out": 2, "bias": true, "activation": "linear"}
    {"name": "act", "type": "activation", "activation": "relu"}       (also "dropout": identity at inference)

Tensors are channels-first, (B, C, X, Y, Z) (or (B, C, X, Y) for 2-D); the kernels were transposed
to PyTorch's layout on the way in. Keras's ``"same"`` padding puts the odd voxel at the end (TF's
rule), which ``same_padding`` reproduces for any input size; pooling pads with -inf (max) or
averages over the voxels inside the image only (average), as Keras does. BatchNorm's momentum is
PyTorch's (1 − Keras's).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"linear": lambda x: x, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
               "elu": F.elu, "softmax": lambda x: torch.softmax(x, dim=1), "gelu": F.gelu, "swish": F.silu,
               "silu": F.silu}


def same_padding(size: list[int], kernel: list[int], strides: list[int], dilation: list[int]) -> list[int]:
    """``F.pad``'s argument (last axis first: before, after, ...) for TF's "same": total padding
    max((out − 1)·s + (k − 1)·d + 1 − n, 0) with out = ceil(n / s), the larger half after."""
    pads = []
    for n, k, s, d in zip(size, kernel, strides, dilation):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        pads.append((total // 2, total - total // 2))
    return [p for before_after in reversed(pads) for p in before_after]


class Conv(nn.Module):
    """A Keras ConvND: ``weight`` (out, in, *kernel), ``bias`` (out), "same"/"valid" padding, activation."""

    def __init__(self, layer: dict):
        super().__init__()
        self.kernel, self.strides = list(layer["kernel"]), list(layer["strides"])
        self.dilation, self.padding = list(layer.get("dilation") or [1] * len(self.kernel)), layer["padding"]
        self.activation = layer.get("activation", "linear")
        self.weight = nn.Parameter(torch.zeros(layer["out"], layer["in"], *self.kernel))
        self.bias = nn.Parameter(torch.zeros(layer["out"])) if layer.get("bias", True) else None
        self.convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.kernel)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            x = F.pad(x, same_padding(list(x.shape[2:]), self.kernel, self.strides, self.dilation))
        x = self.convolve(x, self.weight, self.bias, stride=self.strides, dilation=self.dilation)
        return ACTIVATIONS[self.activation](x)


class Dense(nn.Module):
    """A Keras Dense layer on (B, features): ``weight`` (out, in), ``bias`` (out), activation."""

    def __init__(self, layer: dict):
        super().__init__()
        self.activation = layer.get("activation", "linear")
        self.weight = nn.Parameter(torch.zeros(layer["out"], layer["in"]))
        self.bias = nn.Parameter(torch.zeros(layer["out"])) if layer.get("bias", True) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](F.linear(x, self.weight, self.bias))


class Pool(nn.Module):
    """Keras Max/AveragePoolingND with "same" or "valid" padding."""

    def __init__(self, layer: dict):
        super().__init__()
        self.kind, self.pool = layer["type"], list(layer["pool"])
        self.strides, self.padding = list(layer.get("strides") or self.pool), layer["padding"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = len(self.pool)
        pad = same_padding(list(x.shape[2:]), self.pool, self.strides, [1] * dims) if self.padding == "same" else []
        if self.kind == "maxpool":
            x = F.pad(x, pad, value=-math.inf) if pad else x
            return {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[dims](x, self.pool, self.strides)
        average = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dims]
        if not pad or not any(pad):
            return average(x, self.pool, self.strides)
        ones = torch.ones_like(x[:, :1])
        return average(F.pad(x, pad), self.pool, self.strides) / average(F.pad(ones, pad), self.pool, self.strides)


class Lambda(nn.Module):
    """A layer without weights: global pooling, flattening (channels last), an activation, dropout."""

    def __init__(self, layer: dict):
        super().__init__()
        self.kind, self.activation = layer["type"], layer.get("activation", "linear")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "global_avgpool":
            return x.flatten(2).mean(2)
        if self.kind == "global_maxpool":
            return x.flatten(2).amax(2)
        if self.kind == "flatten":
            return x.movedim(1, -1).flatten(1) if x.dim() > 2 else x
        if self.kind == "activation":
            return ACTIVATIONS[self.activation](x)
        return x  # dropout: identity at inference


def batchnorm(layer: dict) -> nn.Module:
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[layer.get("dims", 3)]
    return norm(layer["channels"], eps=layer["eps"], momentum=layer["momentum"])  # gamma 1 / beta 0 if Keras had none


BUILDERS = {"conv": Conv, "dense": Dense, "maxpool": Pool, "avgpool": Pool, "batchnorm": batchnorm}


def module_name(name: str) -> str:
    """A Keras layer name as a state-dict key part ('.' is the key separator)."""
    return name.replace(".", "_")


def keras_network(in_channels: int = 1, outputs: int = 1, spatial_dims: int = 3, layers: list | None = None) -> nn.Module:
    """The network described by ``layers`` (see the module docstring); ``in_channels``, ``outputs``
    and ``spatial_dims`` are fixed by the description and only checked against it."""
    if not layers:
        raise ValueError("keras_port needs `layers`: the ported Keras layers (pipeline.sharing.kerasport).")
    unknown = sorted({layer["type"] for layer in layers} - set(BUILDERS) - {"global_avgpool", "global_maxpool",
                                                                              "flatten", "activation", "dropout"})
    if unknown:
        raise ValueError(f"keras_port: unknown layer types {unknown}")
    modules = OrderedDict((module_name(layer["name"]), BUILDERS.get(layer["type"], Lambda)(layer)) for layer in layers)
    return nn.Sequential(modules)
