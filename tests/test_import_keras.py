"""Keras weights ported to PyTorch compute what Keras computes (Keras 3 on its torch backend: a test-only dependency)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("KERAS_BACKEND", "torch")
keras = pytest.importorskip("keras")

from pipeline.common.errors import InputError  # noqa: E402
from pipeline.learning.saved import package_coder, package_model  # noqa: E402
from pipeline.common import package  # noqa: E402
from pipeline.sharing.importer import import_package  # noqa: E402

GRID = (9, 11, 9)  # odd sizes: "same" padding then pads unevenly, as TensorFlow does
INPUTS = {"channels": ["T1w"], "voxel_size": 8.0, "shape": list(GRID)}


def keras_model(head: str = "flatten"):
    """A small 3-D Keras network exercising every kind of ported layer, with random weights and
    BatchNorm statistics (epsilon and momentum not the defaults)."""
    layers = keras.layers
    stack = [keras.Input((*GRID, 1)),
             layers.Conv3D(4, 3, padding="same", activation="relu"),
             layers.BatchNormalization(epsilon=0.01, momentum=0.9),
             layers.MaxPooling3D(2, padding="same"),
             layers.Conv3D(5, (3, 2, 3), strides=2, padding="same", use_bias=False),
             layers.Activation("tanh"),
             layers.AveragePooling3D(2, strides=1, padding="same"),
             layers.Conv3D(3, 1, padding="valid")]
    stack += ([layers.Flatten(), layers.Dropout(0.3), layers.Dense(6, activation="elu"), layers.Dense(2)]
              if head == "flatten" else [layers.GlobalAveragePooling3D(), layers.Dense(1)])
    model = keras.Sequential(stack)
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in v.path else
                       rng.normal(0, 0.5, w.shape).astype("float32") for w, v in zip(model.get_weights(), model.weights)])
    return model


@pytest.mark.parametrize("suffix, head", [(".h5", "flatten"), (".keras", "global")])
def test_a_keras_model_ports_to_pytorch_with_parity(tmp_path, suffix, head):
    model = keras_model(head)
    path = tmp_path / f"model{suffix}"
    model.save(path)
    x = np.random.default_rng(1).normal(0, 1, (1, 1, *GRID)).astype(np.float32)
    theirs = keras.ops.convert_to_numpy(model(np.moveaxis(x, 1, -1), training=False))
    output = {"type": "logits", "classes": ["a", "b"]} if head == "flatten" else {"type": "scalar", "scale": 2.0}
    spec = import_package(path, tmp_path / "package", {}, INPUTS, output, {"license": "Apache-2.0"})
    assert spec["architecture"]["name"] == "keras_port" and "Keras model's own forward" in spec["parity"]["against"]
    assert spec["parity"]["max_abs_difference"] <= 1e-4
    pkg = package.load(tmp_path / "package")
    with torch.no_grad():
        ours = package_model(pkg, "fold-1")(torch.from_numpy(x)).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4
    norm = next(layer for layer in spec["architecture"]["args"]["layers"] if layer["type"] == "batchnorm")
    assert norm["eps"] == pytest.approx(0.01) and norm["momentum"] == pytest.approx(0.1)
    if head == "global":
        assert np.allclose(package_coder(pkg, "fold-1").decode(torch.from_numpy(ours)), ours[:, 0] * 2.0)


def test_a_keras_model_declared_on_another_grid_or_with_an_unported_layer_is_refused(tmp_path):
    model = keras_model()
    model.save(tmp_path / "model.h5")
    with pytest.raises(InputError, match=r"takes inputs of shape .*\[1, 9, 11, 9\].*declared input is \[1, 10, 11, 9\]"):
        import_package(tmp_path / "model.h5", tmp_path / "a", {}, {**INPUTS, "shape": [10, 11, 9]},
                       {"type": "scalar"}, {})
    lstm = keras.Sequential([keras.Input((*GRID, 1)), keras.layers.Conv3D(2, 3), keras.layers.UpSampling3D(2)])
    lstm.save(tmp_path / "up.h5")
    with pytest.raises(InputError, match=r"up.h5: layer up_sampling3d .*UpSampling3D.* has no PyTorch port"):
        import_package(tmp_path / "up.h5", tmp_path / "b", {}, INPUTS, {"type": "scalar"}, {})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "cut.h5").write_bytes((tmp_path / "model.h5").read_bytes()[:5000])
    with pytest.raises(InputError, match="cut.h5 is not a readable Keras model file: truncated or corrupt"):
        import_package(tmp_path / "cut.h5", tmp_path / "c", {}, INPUTS, {"type": "scalar"}, {})
