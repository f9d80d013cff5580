"""Import of models trained elsewhere: parity and time per kind of source (docs/benchmarks.md, *Transfer*).

    python benchmarks/import_parity.py [--quick] [--threads 2] [--out results.tsv]

Builds one checkpoint of each kind the way its framework saves it, imports it with
``pipeline.sharing.importer.import_package`` (what ``bids-deepstudy import`` runs) and reports the
package's max abs difference from the source's own output on a reference image, the ONNX check, and
the seconds of the import (reading, strict loading, grid, package files, ONNX export and checks):

* ``torch``: SFCN in its authors' published layout (re-typed here as the reference), DataParallel
  ``module.`` keys, 40 age bins, the paper's widths on its 160x192x160 1 mm input;
* ``safetensors``: the same weights in a Hugging Face style folder;
* ``npz``: the same weights dumped TensorFlow-style (kernels DHWIO, other names) with a mapping file;
* ``bundle``: a MONAI bundle zip of MONAI's DenseNet-121 (2 classes, 96^3), its network built by
  MONAI's ConfigParser as the reference;
* ``keras``: a Keras 3 3-D CNN (conv, BatchNorm, pooling, "same" padding, dense head) on a
  91x109x91 2 mm grid saved as ``.h5``, Keras's own forward pass (torch backend) as the reference
  (skipped where Keras is not installed: ``pip install keras``).

``--quick``: narrow networks and small grids (seconds), for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("KERAS_BACKEND", "torch")


class AuthorsSFCN(nn.Module):
    """SFCN as Peng et al.'s sfcn.py lays it out (the reference implementation, re-typed)."""

    def __init__(self, channel_number, output_dim=40, avg_shape=(5, 6, 5)):
        super().__init__()
        self.feature_extractor = nn.Sequential()
        for i, out in enumerate(channel_number):
            cin = 1 if i == 0 else channel_number[i - 1]
            if i < len(channel_number) - 1:
                layer = nn.Sequential(nn.Conv3d(cin, out, 3, padding=1), nn.BatchNorm3d(out), nn.MaxPool3d(2, stride=2),
                                      nn.ReLU())
            else:
                layer = nn.Sequential(nn.Conv3d(cin, out, 1, padding=0), nn.BatchNorm3d(out), nn.ReLU())
            self.feature_extractor.add_module(f"conv_{i}", layer)
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", nn.AvgPool3d(avg_shape))
        self.classifier.add_module("dropout", nn.Dropout(0.5))
        self.classifier.add_module(f"conv_{len(channel_number)}", nn.Conv3d(channel_number[-1], output_dim, 1))

    def forward(self, x):
        return [F.log_softmax(self.classifier(self.feature_extractor(x)), dim=1)]


def randomised(module: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                scale = 0.1 if tensor.dim() > 1 else 0.5
                values = (torch.rand(tensor.shape, generator=generator) - 0.5) * scale
                tensor.copy_(values.abs() + 0.5 if name.endswith("running_var") else values)
    return module.eval()


def reference(folder: Path, forward, shape) -> tuple[Path, Path]:
    x = np.random.default_rng(0).normal(0, 1, (1, *shape)).astype(np.float32)
    with torch.no_grad():
        y = forward(torch.from_numpy(x))
    np.save(folder / "x.npy", x[0])
    np.save(folder / "y.npy", np.asarray(y))
    return folder / "x.npy", folder / "y.npy"


def sfcn_sources(tmp: Path, quick: bool) -> list[dict]:
    from safetensors.torch import save_file

    widths, grid, pooled = ([4, 4, 8, 8, 8, 4], [64, 64, 64], (2, 2, 2)) if quick else \
        ([32, 64, 128, 256, 256, 64], [160, 192, 160], (5, 6, 5))
    source = randomised(AuthorsSFCN(widths, avg_shape=pooled), 0)
    torch.save(nn.DataParallel(source).state_dict(), tmp / "sfcn.p")
    (tmp / "hf").mkdir()
    save_file(source.state_dict(), tmp / "hf" / "model.safetensors")
    (tmp / "hf" / "config.json").write_text(json.dumps({"model_type": "sfcn"}))
    dump = {}
    for key, value in source.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            array = value.numpy().transpose(2, 3, 4, 1, 0) if value.dim() == 5 else value.numpy()
            dump[key.replace("feature_extractor.", "encoder/").replace("classifier.", "head/").replace(".", "/")] = array
    np.savez(tmp / "sfcn.npz", **dump)
    (tmp / "mapping.yaml").write_text(
        "rules:\n"
        "  - {match: 'encoder/(conv_\\d)/0/weight', name: 'feature_extractor.\\1.0.weight', layout: dhwio}\n"
        "  - {match: 'head/(conv_\\d)/weight', name: 'classifier.\\1.weight', layout: dhwio}\n"
        "  - {match: 'encoder/(conv_\\d)/(\\d)/(\\w+)', name: 'feature_extractor.\\1.\\2.\\3'}\n"
        "  - {match: 'head/(conv_\\d)/bias', name: 'classifier.\\1.bias'}\n")
    x, y = reference(tmp, lambda t: source(t)[0].flatten(1).numpy(), [1, *grid])
    common = {"network": {"name": "sfcn_peng", "args": {"channels": widths}},
              "inputs": {"channels": ["T1w"], "voxel_size": 1.0, "shape": grid},
              "output": {"type": "bins", "bins": [42.5 + i for i in range(40)]}, "reference": (x, y)}
    return [{"source": "torch", "path": tmp / "sfcn.p", "what": f"SFCN {widths}, 40 bins", **common},
            {"source": "safetensors", "path": tmp / "hf", "what": f"SFCN {widths}, 40 bins", **common},
            {"source": "npz", "path": tmp / "sfcn.npz", "what": f"SFCN {widths}, 40 bins", "mapping": tmp / "mapping.yaml",
             **common}]


def bundle_source(tmp: Path, quick: bool) -> dict:
    from monai.bundle import ConfigParser

    grid = [32, 32, 32] if quick else [96, 96, 96]
    net = {"_target_": "DenseNet121", "spatial_dims": 3, "in_channels": 1, "out_channels": "@classes"}
    if quick:
        net = {**net, "_target_": "DenseNet", "init_features": 4, "growth_rate": 4, "block_config": [1, 1]}
    root = tmp / "bundle"
    for sub in ("configs", "models"):
        (root / sub).mkdir(parents=True)
    (root / "configs" / "inference.json").write_text(json.dumps({"classes": 2, "network_def": net}))
    (root / "configs" / "metadata.json").write_text(json.dumps({"version": "0.1.0", "network_data_format": {
        "outputs": {"pred": {"format": "classification", "channel_def": {"0": "control", "1": "patient"}}}}}))
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    network = randomised(parser.get_parsed_content("network_def"), 1)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    with zipfile.ZipFile(tmp / "bundle.zip", "w") as archive:
        for path in root.rglob("*"):
            archive.write(path, Path("bundle") / path.relative_to(root))
    return {"source": "bundle", "path": tmp / "bundle.zip", "what": f"MONAI {net['_target_']}, 2 classes",
            "network": {}, "inputs": {"channels": ["T1w"], "voxel_size": 2.0, "shape": grid},
            "output": {"type": "logits"}, "reference": (None, None)}


def keras_source(tmp: Path, quick: bool) -> dict | None:
    try:
        import keras
    except ImportError:
        return None
    grid, widths = ((24, 28, 24), (4, 8)) if quick else ((91, 109, 91), (16, 32, 64, 64))
    layers = [keras.Input((*grid, 1))]
    for width in widths:
        layers += [keras.layers.Conv3D(width, 3, padding="same", activation="relu"),
                   keras.layers.BatchNormalization(epsilon=1e-3, momentum=0.99), keras.layers.MaxPooling3D(2, padding="same")]
    layers += [keras.layers.GlobalAveragePooling3D(), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(1)]
    model = keras.Sequential(layers)
    rng = np.random.default_rng(2)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype("float32") if "variance" in v.path else
                       rng.normal(0, 0.1, w.shape).astype("float32") for w, v in zip(model.get_weights(), model.weights)])
    model.save(tmp / "keras.h5")
    return {"source": "keras", "path": tmp / "keras.h5", "what": f"Keras 3-D CNN {list(widths)}, scalar", "network": {},
            "inputs": {"channels": ["T1w"], "voxel_size": 2.0, "shape": list(grid)},
            "output": {"type": "scalar", "scale": 10.0, "shift": 50.0}, "reference": (None, None)}


def run(quick: bool) -> pd.DataFrame:
    from pipeline.sharing.importer import import_package

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cases = [*sfcn_sources(tmp, quick), bundle_source(tmp, quick), keras_source(tmp, quick)]
        for case in filter(None, cases):
            started = time.perf_counter()
            spec = import_package(case["path"], tmp / f"package-{case['source']}", case["network"], case["inputs"],
                                  case["output"], {"license": "MIT"}, case.get("mapping"), case["reference"])
            seconds = time.perf_counter() - started
            rows.append({"source": case["source"], "model": case["what"],
                         "input": "x".join(map(str, case["inputs"]["shape"])),
                         "max_abs_difference": spec["parity"]["max_abs_difference"],
                         "against": spec["parity"]["against"].split(" (")[0],
                         "onnx_difference": spec["onnx"]["max_abs_difference"], "import_s": round(seconds, 1)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="narrow networks, small grids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="TSV of the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = run(args.quick)
    if args.out:
        table.to_csv(args.out, sep="\t", index=False)
    print(table.to_markdown(index=False, floatfmt=".2g"))


if __name__ == "__main__":
    main()
