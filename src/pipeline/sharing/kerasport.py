"""Keras weights (``.h5`` or ``.keras``) read with h5py and ported to PyTorch (``pipeline.learning.ported``).

No TensorFlow or Keras is needed: the model's configuration (JSON) names its layers, h5py reads
their weights, and each layer becomes its PyTorch equivalent: convolution kernels (*k, in, out) →
(out, in, *k), dense kernels (in, out) → (out, in), BatchNormalization's gamma, beta and moving
statistics with its epsilon, and momentum as PyTorch counts it (1 − Keras's); "same" padding as
TensorFlow pads (the odd voxel after). A linear stack of layers (``Sequential``, or a functional
model whose layers run one after another) in ``channels_last`` is supported; any other layer is
refused, named. Legacy ``.h5``: root attribute ``model_config`` and ``model_weights/<layer>``;
``.keras``: a zip of ``config.json`` and ``model.weights.h5`` (``layers/<layer>/vars/<i>``).

``keras_output``: where Keras 3 is installed (with its torch backend, no TensorFlow) the original
model's own forward pass, the parity reference.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.common.errors import InputError
from pipeline.learning.ported import module_name

CONV = {"Conv1D": 1, "Conv2D": 2, "Conv3D": 3}
POOL = {f"{kind}Pooling{d}D": ("maxpool" if kind == "Max" else "avgpool", d) for kind in ("Max", "Average")
        for d in (1, 2, 3)}
GLOBAL = {f"Global{kind}Pooling{d}D": f"global_{'max' if kind == 'Max' else 'avg'}pool"
          for kind in ("Max", "Average") for d in (1, 2, 3)}
WITHOUT_WEIGHTS = {"Flatten": "flatten", "Dropout": "dropout", "SpatialDropout3D": "dropout",
                   "SpatialDropout2D": "dropout", "Activation": "activation", "ReLU": "activation"}


def read(path: Path) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """(model config, {layer name: its weight arrays in Keras's order}) of a ``.h5`` or ``.keras`` file."""
    import h5py

    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
                with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
                    weights = {f[f"layers/{name}/vars"].attrs.get("name", name): ordered(f[f"layers/{name}/vars"])
                               for name in f.get("layers", {})}
            return config, weights
        with h5py.File(path, "r") as f:
            if "model_config" not in f.attrs:
                raise InputError(f"{path} holds weights only (no model_config): save the whole model "
                                 "(`model.save('model.h5')` or `.keras`) so its layers are known.")
            config = json.loads(f.attrs["model_config"])
            group = f["model_weights"]
            weights = {name: [np.array(group[name][w]) for w in map(text, group[name].attrs["weight_names"])]
                       for name in group if "weight_names" in group[name].attrs}
            return config, weights
    except InputError:
        raise
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} is not a readable Keras model file: truncated or corrupt ({exc}).") from exc


def text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def ordered(group) -> list[np.ndarray]:
    return [np.array(group[str(i)]) for i in range(len(group))]


def layer_list(config: dict, path: Path) -> list[dict]:
    """The model's layers in order (InputLayer dropped), each {class_name, config}."""
    layers = config.get("config", {}).get("layers")
    if layers is None:
        raise InputError(f"{path}: model config of class {config.get('class_name')!r} has no layer list.")
    return [layer for layer in layers if layer["class_name"] != "InputLayer"]


def port_layer(layer: dict, channels: int, path: Path, rank: int = 5) -> tuple[dict, int]:
    """One Keras layer as a ``pipeline.learning.ported`` description; the channels after it."""
    kind, c = layer["class_name"], layer["config"]
    name = c["name"]
    if c.get("data_format", "channels_last") != "channels_last":
        raise InputError(f"{path}: layer {name} is {c['data_format']}; only channels_last models are ported.")
    if kind in CONV:
        if c.get("groups", 1) != 1:
            raise InputError(f"{path}: layer {name} is a grouped convolution; not ported.")
        return ({"name": name, "type": "conv", "in": channels, "out": c["filters"], "kernel": c["kernel_size"],
                 "strides": c["strides"], "padding": c["padding"], "dilation": c["dilation_rate"],
                 "bias": c["use_bias"], "activation": activation(c, name, path)}, c["filters"])
    if kind == "Dense":
        return ({"name": name, "type": "dense", "in": channels, "out": c["units"], "bias": c["use_bias"],
                 "activation": activation(c, name, path)}, c["units"])
    if kind == "BatchNormalization":
        axis = c["axis"][0] if isinstance(c["axis"], list) else c["axis"]
        if axis not in (-1, rank - 1):  # Keras 2 files record the channel axis by its number
            raise InputError(f"{path}: BatchNormalization {name} normalises axis {axis}; only the channel axis (-1).")
        return ({"name": name, "type": "batchnorm", "channels": channels, "eps": c["epsilon"],
                 "momentum": 1.0 - c["momentum"], "center": c["center"], "scale": c["scale"]}, channels)
    if kind in POOL:
        pool_type, _ = POOL[kind]
        return ({"name": name, "type": pool_type, "pool": c["pool_size"], "strides": c["strides"] or c["pool_size"],
                 "padding": c["padding"]}, channels)
    if kind in GLOBAL:
        if c.get("keepdims"):
            raise InputError(f"{path}: {kind} {name} keeps its dimensions; not ported.")
        return {"name": name, "type": GLOBAL[kind]}, channels
    if kind in WITHOUT_WEIGHTS:
        act = "relu" if kind == "ReLU" else c.get("activation", "linear")
        if kind == "ReLU" and (c.get("max_value") is not None or c.get("negative_slope")):
            raise InputError(f"{path}: ReLU {name} has a max_value or negative slope; not ported.")
        return {"name": name, "type": WITHOUT_WEIGHTS[kind], "activation": act}, channels
    raise InputError(f"{path}: layer {name} ({kind}) has no PyTorch port here; ported layers: Conv1-3D, Dense, "
                     "BatchNormalization, Max/AveragePooling, Global pooling, Flatten, Dropout, Activation, ReLU.")


def activation(c: dict, name: str, path: Path) -> str:
    from pipeline.learning.ported import ACTIVATIONS

    act = c.get("activation", "linear")
    act = act if isinstance(act, str) else act.get("config", {}).get("name", str(act))
    if act not in ACTIVATIONS:
        raise InputError(f"{path}: layer {name} uses activation {act!r}; ported: {sorted(ACTIVATIONS)}.")
    return act


def flatten_width(layers: list[dict], input_shape: list[int]) -> list[dict]:
    """Fill in each dense layer's input width after a flatten, by running the ported layers on zeros."""
    from pipeline.learning.ported import keras_network

    for i, layer in enumerate(layers):
        if layer["type"] == "dense" and i and any(l["type"] == "flatten" for l in layers[:i]):
            x = torch.zeros(1, *input_shape)
            with torch.no_grad():
                layer["in"] = int(keras_network(layers=layers[:i]).eval()(x).shape[1])
    return layers


def port(path: Path) -> dict:
    """{layers (description), state (PyTorch layout), input_shape (C, *spatial), config} of a Keras file."""
    config, weights = read(path)
    keras_layers = layer_list(config, path)
    raw = config.get("config", {}).get("layers", [])
    shapes = [config.get("config", {}).get("build_input_shape"), keras_layers[0].get("build_config", {}).get("input_shape"),
              *(layer["config"].get(key) for layer in raw for key in ("batch_shape", "batch_input_shape"))]
    build = next((shape for shape in shapes if shape), None)  # Keras 3's, then Keras 2's InputLayer
    if not build or any(n is None for n in build[1:]):
        raise InputError(f"{path}: the model's input shape {build} is not fixed; save it built on a fixed shape.")
    input_shape = [build[-1], *build[1:-1]]
    described, channels = [], input_shape[0]
    for layer in keras_layers:
        entry, channels = port_layer(layer, channels, path, len(build))
        described.append(entry)
    described = flatten_width(described, input_shape)
    state = {}
    for entry in described:
        arrays = weights.get(entry["name"], [])
        state.update(tensors(entry, arrays, path))
    return {"layers": described, "state": state, "input_shape": input_shape, "config": config}


def tensors(entry: dict, arrays: list[np.ndarray], path: Path) -> dict[str, torch.Tensor]:
    """One ported layer's weights under its state-dict names, in PyTorch's layout."""
    key, kind = module_name(entry["name"]), entry["type"]
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
    if kind == "conv":
        dims = len(entry["kernel"])
        kernel = np.transpose(arrays[0], (dims + 1, dims, *range(dims)))
        return {f"{key}.weight": as_tensor(kernel), **({f"{key}.bias": as_tensor(arrays[1])} if entry["bias"] else {})}
    if kind == "dense":
        return {f"{key}.weight": as_tensor(arrays[0].T), **({f"{key}.bias": as_tensor(arrays[1])} if entry["bias"] else {})}
    if kind == "batchnorm":
        rest = list(arrays)
        gamma = rest.pop(0) if entry["scale"] else np.ones(entry["channels"])
        beta = rest.pop(0) if entry["center"] else np.zeros(entry["channels"])
        if len(rest) != 2:
            raise InputError(f"{path}: BatchNormalization {entry['name']} has {len(arrays)} weight arrays; "
                             "expected gamma, beta, moving mean and variance.")
        return {f"{key}.weight": as_tensor(gamma), f"{key}.bias": as_tensor(beta),
                f"{key}.running_mean": as_tensor(rest[0]), f"{key}.running_var": as_tensor(rest[1])}
    if arrays:
        raise InputError(f"{path}: layer {entry['name']} has weights, but a {kind} layer should have none.")
    return {}


def keras_output(path: Path, x: torch.Tensor) -> np.ndarray | None:
    """The Keras model's own output on ``x`` (B, C, *spatial), or None where Keras 3 with its torch
    backend is not installed (TensorFlow is never imported: KERAS_BACKEND is set to torch)."""
    import importlib.util
    import os

    if importlib.util.find_spec("keras") is None:
        return None
    os.environ.setdefault("KERAS_BACKEND", "torch")
    if os.environ["KERAS_BACKEND"] != "torch":
        return None
    import keras

    model = keras.saving.load_model(str(path), compile=False)
    out = model(np.ascontiguousarray(x.movedim(1, -1).numpy()), training=False)
    return np.asarray(keras.ops.convert_to_numpy(out))
