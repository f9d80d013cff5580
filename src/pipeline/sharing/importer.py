"""Import a model trained elsewhere as an ordinary model package (layout: ``pipeline.common.package``)::

    bids-deepstudy import SOURCE --out PACKAGE [network] [input] [output] [--license L] [...]

SOURCE is a PyTorch state dict (``.pt``/``.pth``/``.p``/``.bin``), a ``.safetensors`` file or a
Hugging Face style folder, a MONAI bundle (folder or ``.zip``), a Keras ``.h5``/``.keras`` file, or
an ``.npz`` of name → array with ``--mapping`` (``pipeline.sharing.foreign``, ``bundle``, ``kerasport``).
The network is a registered architecture (``--architecture NAME --arch-args JSON``), user code
(``--factory module:function --factory-args JSON``, said so in the card), the bundle's own
``network_def``, or the Keras model ported to PyTorch. Loading is strict (``foreign.fit``).

The declared input becomes the package's recipe (template space, voxel size, grid shape or crop,
brain extraction, intensity normalisation, channels in order); where this pipeline's preprocessing
cannot make it, ``apply`` and fine-tuning refuse it and name the difference
(``pipeline.intake.recipe.unproducible``). The declared output (a scalar ``output × scale + shift``,
class logits, soft-label bins whose expected value is the prediction, or segmentation labels) is the
package's target coder (``pipeline.learning.coder``).

Parity: the package, reloaded from its files as ``apply`` loads it, is run on a reference input
(``--reference-input``, default a seeded normal image of the declared shape) and compared with the
source's own output: ``--reference-output`` (computed where the model came from), else MONAI's
bundle network or Keras's forward pass (Keras 3 with its torch backend, when installed); a PyTorch
state dict without ``--reference-output`` is compared with the network that loaded it. Max abs
difference ≤ ``TOLERANCE`` or nothing is written; the figure goes into ``spec.json``, ``metrics.json``
and the model card. The package is written in a temporary folder renamed to PACKAGE at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline import __version__
from pipeline.common import atomic
from pipeline.common.config import resolved
from pipeline.common.errors import InputError
from pipeline.common.paths import SPACE
from pipeline.intake import recipe
from pipeline.learning.coder import TargetCoder
from pipeline.learning.models import build_model
from pipeline.learning.saved import rebuild
from pipeline.common import package
from pipeline.sharing import bundle, foreign, kerasport, modelcard, onnxcheck, segexport

TOLERANCE = onnxcheck.TOLERANCE
FOLD = "fold-1"
OUTPUTS = ("scalar", "logits", "bins", "labels")
TASK_OF = {"scalar": "regression", "bins": "regression", "logits": "classification", "labels": "segmentation"}


def source_kind(source: Path) -> str:
    """bundle, keras, npz, safetensors or torch, from the file's suffix or the folder's contents."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source} does not exist.")
    if source.is_dir():
        if (source / "configs" / "metadata.json").is_file():
            return "bundle"
        if any((source / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
            return "safetensors"
        raise InputError(f"{source} is a folder but neither a MONAI bundle (configs/metadata.json) nor a Hugging Face "
                         "style folder (model.safetensors + config.json).")
    suffix = source.suffix.lower()
    kinds = {".zip": "bundle", ".h5": "keras", ".hdf5": "keras", ".keras": "keras", ".npz": "npz",
             ".safetensors": "safetensors", **{s: "torch" for s in foreign.TORCH_SUFFIXES}}
    if suffix not in kinds:
        raise InputError(f"{source}: unknown kind of checkpoint {suffix!r}; import .pt/.pth/.p/.bin (PyTorch state "
                         "dict), .safetensors, a MONAI bundle (folder or .zip), .h5/.keras (Keras) or .npz (+ --mapping).")
    return kinds[suffix]


def read_source(source: Path, kind: str, network: dict, workdir: Path) -> dict:
    """{state, architecture, network description, source_forward (x → output, or None), extra}."""
    found = {"extra": {}, "source_forward": None}
    if kind == "bundle":
        read = bundle.read(source, workdir)
        found.update(state=read["state"], architecture={"name": "monai_bundle", "args": {"network_def": read["network_def"]}},
                     what="the bundle's network_def")
        found["extra"] = {"metadata": read["metadata"], "outputs": bundle.declared_outputs(read["metadata"])}
        found["source_forward"] = lambda x: bundle_forward(read["folder"], read["state"], x)
    elif kind == "keras":
        ported = kerasport.port(source)
        found.update(state=ported["state"], architecture={"name": "keras_port", "args": {"layers": ported["layers"]}},
                     what="the Keras model ported to PyTorch", input_shape=ported["input_shape"])
        found["source_forward"] = lambda x: kerasport.keras_output(source, x)
    else:
        if kind == "torch":
            state = foreign.read_torch(source)
        elif kind == "npz":
            state = foreign.read_npz(source)
        elif Path(source).is_dir():
            state, found["extra"]["config"] = foreign.huggingface_folder(Path(source))
        else:
            state = foreign.read_safetensors(source)
        if network.get("factory"):
            architecture = {"name": "user_code", "args": {"factory": network["factory"],
                                                           "kwargs": network.get("kwargs") or {}}}
        elif network.get("name"):
            architecture = {"name": network["name"], "args": network.get("args") or {}}
        else:
            raise InputError(f"{source} holds weights only: name its network with --architecture NAME (bids-deepstudy "
                             "networks) and --arch-args, or --factory module:function.")
        found.update(state=state, architecture=architecture, what=f"{architecture['name']} {architecture['args']}")
    found["architecture"]["spatial_dims"] = 3
    return found


def bundle_forward(folder: Path, state: dict, x: torch.Tensor) -> np.ndarray:
    """The bundle's own network (MONAI's ConfigParser on its inference config) with its weights, on ``x``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(next(folder / c for c in bundle.CONFIGS if (folder / c).is_file())))
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(foreign.strip_prefixes(state, set(network.state_dict()))[0])
    with torch.no_grad():
        return network.eval()(x).numpy()


def coder_of(output: dict) -> TargetCoder:
    """The package's target coder for the declared output."""
    kind = output["type"]
    if kind == "bins":
        return TargetCoder("regression", bins=[float(b) for b in output["bins"]])
    if kind == "scalar":
        return TargetCoder("regression", mean=float(output.get("shift", 0.0)), std=float(output.get("scale", 1.0)))
    if not output.get("classes"):
        raise InputError(f"--output {kind} needs --classes: the class (or label) names in output order.")
    return TargetCoder(TASK_OF[kind], classes=[str(c) for c in output["classes"]])


class Decoded(nn.Module):
    """The network and its output decoding in one module (the ONNX graph): (B, C, X, Y, Z) → the
    prediction in target units (B, 1), or class probabilities (B, K)."""

    def __init__(self, network: nn.Module, coder: TargetCoder):
        super().__init__()
        self.network, self.kind = network, "bins" if coder.bins else coder.task
        self.register_buffer("centres", torch.tensor(coder.bins or [0.0], dtype=torch.float32))
        self.scale, self.shift = float(coder.std), float(coder.mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        if self.kind == "classification":
            return torch.softmax(out, dim=1)
        if self.kind == "bins":
            return (torch.softmax(out, dim=1) * self.centres).sum(1, keepdim=True)
        return out * self.scale + self.shift


def declared_recipe(inputs: dict) -> dict:
    """The package's ``preprocessing.json`` from the declared input (the schema's defaults for the rest)."""
    preprocess = resolved(["preprocess"], {"resolution": inputs["voxel_size"], "shape": list(inputs["shape"]),
                                           "brain_extraction": inputs.get("brain_extraction") or "none",
                                           **({"transform": inputs["transform"]} if inputs.get("transform") else {})})
    channels = {name: {"suffix": name} for name in inputs["channels"]}
    made = recipe.from_config(preprocess, channels, {"datatype": "anat"})
    intensity = inputs.get("intensity", "zscore")
    made.update(space=inputs.get("space") or SPACE, crop=inputs.get("crop"), intensity=intensity,
                normalisation=recipe.INTENSITIES[intensity], imported=True)
    if made["space"] != SPACE:
        made["template"] = f"{made['space']} (declared at import)"
    return made


def run_noting_feature_maps(network: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, str | None]:
    """The network's output on ``x``, and the last module whose output is a feature map of more
    than one voxel (Grad-CAM's layer), noted on the same pass."""
    found, hooks = [], []
    for name, module in network.named_modules():
        if name and not list(module.children()):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: found.append(name) if torch.is_tensor(o) and o.dim() == x.dim()
                and o.shape[2:].numel() > 1 else None))
    try:
        with torch.no_grad():
            out = network(x).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return out, (found[-1] if found else None)


def reference_input(path: Path | None, shape: list[int], seed: int = 0) -> torch.Tensor:
    if path is None:
        return torch.from_numpy(np.random.default_rng(seed).normal(0, 1, (1, *shape)).astype(np.float32))
    x = np.load(path, allow_pickle=False).astype(np.float32)
    x = x[None] if x.ndim == len(shape) else x
    if tuple(x.shape[1:]) != tuple(shape):
        raise InputError(f"--reference-input {path} has shape {x.shape}; the declared input is (B, {', '.join(map(str, shape))}).")
    return torch.from_numpy(x)


def compare(ours: np.ndarray, theirs: np.ndarray, what: str) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    if ours.size != theirs.size:
        raise InputError(f"The package's output has shape {ours.shape}, {what} {theirs.shape}: not the same model.")
    return float(np.abs(ours.reshape(-1) - theirs.reshape(-1)).max())


def import_package(source: Path, out_dir: Path, network: dict, inputs: dict, output: dict, terms: dict,
                   mapping: Path | None = None, reference: tuple[Path | None, Path | None] = (None, None),
                   target: str = "prediction") -> dict:
    """Write the package ``out_dir`` from ``source`` (see the module docstring); return its spec.
    ``network``: {name, args} or {factory, kwargs} (unused for bundles and Keras); ``inputs``:
    {channels, space, voxel_size, shape, crop, brain_extraction, intensity, transform};
    ``output``: {type, classes | bins | scale, shift}; ``terms``: {license, redistribution}."""
    started = time.perf_counter()
    source, out_dir = Path(source), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} exists and is not empty; choose a new folder for the package.")
    kind = source_kind(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        found = read_source(source, kind, network, Path(tmp) / "source")
        if kind == "bundle" and "classes" not in output and found["extra"]["outputs"].get("classes"):
            output = {**output, "classes": found["extra"]["outputs"]["classes"]}
        coder = coder_of(output)
        shape = [len(inputs["channels"]), *inputs["shape"]]
        if found.get("input_shape") and list(found["input_shape"]) != shape:
            raise InputError(f"{source}: the Keras model takes inputs of shape (channels, *grid) {found['input_shape']}, "
                             f"the declared input is {shape}: declare --channels and --shape as the model's.")
        architecture = found["architecture"]
        try:
            built = build_model(architecture["name"], shape[0], coder.outputs, 3, **architecture["args"])
        except (KeyError, ValueError, TypeError, ImportError, AttributeError) as exc:
            raise InputError(f"Cannot build the network {architecture['name']} {architecture['args']}: {exc}") from exc
        state = found["state"]
        if mapping is not None:
            state = foreign.apply_mapping(state, foreign.read_mapping(mapping), mapping)
        fitted, prefix = foreign.fit(state, built, mapping or source, found["what"])
        built.load_state_dict(fitted)
        x = reference_input(reference[0], shape)
        folder = Path(tmp) / "package"
        folder.mkdir()
        write_tensors(folder, fitted, shape)
        segmentation = coder.task == "segmentation"
        model = rebuild(architecture, shape[0], coder.outputs, None, package_state(folder), segmentation)
        ours, layer = run_noting_feature_maps(model, x)
        if ours.ndim < 2 or ours.shape[1] != coder.outputs:
            raise InputError(f"{source}: the network gives {tuple(ours.shape)} (batch, outputs, …), but the declared "
                             f"output has {coder.outputs} ({output['type']}, {coder.classes or coder.bins or 'one value'}): "
                             "declare as many classes, labels or bins as the network has outputs.")
        parity = parity_entry(ours, built.eval(), reference[1], found["source_forward"], x, kind)
        spec = write_documents(folder, source, kind, architecture, coder, shape, inputs, output, terms, target,
                               parity, prefix, mapping, found, model if segmentation else built, layer)
        spec["onnx"] = write_onnx(folder, model, built, coder, x, Path(tmp))
        spec["import_seconds"] = round(time.perf_counter() - started, 2)
        atomic.write_text(folder / package.SPEC, json.dumps(spec, indent=2) + "\n")
        atomic.write_text(folder / package.CARD, modelcard.render_imported(spec, json.loads(
            (folder / package.RECIPE).read_text()), recipe.unproducible(declared_recipe(inputs))))
        package.write_checksums(folder)
        package.load(folder)
        if out_dir.exists():
            out_dir.rmdir()
        folder.rename(out_dir)
        atomic.fsync_dir(out_dir.parent)
    return spec


def package_state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / package.weights_file(FOLD))


def write_tensors(folder: Path, state: dict, shape: list[int]) -> None:
    """The weights, and a zero "mean training image" (integrated gradients' baseline: none is known)."""
    from safetensors.torch import save_file

    (folder / "weights").mkdir()
    with atomic.path(folder / package.weights_file(FOLD)) as tmp:
        save_file(state, tmp)
    (folder / "statistics").mkdir()
    with atomic.path(folder / package.TRAIN_MEAN) as tmp:
        save_file({FOLD: torch.zeros(shape)}, tmp)


def parity_entry(ours, built: nn.Module, reference_output: Path | None, source_forward, x, kind: str) -> dict:
    """The parity figure against the best reference there is (``built``: the network the source's
    weights were loaded into, the last resort); InputError above ``TOLERANCE``."""
    if reference_output is not None:
        theirs, against = np.load(reference_output, allow_pickle=False), f"--reference-output {reference_output.name}"
    else:
        theirs = source_forward(x) if source_forward else None
        against = {"bundle": "MONAI's bundle network (ConfigParser on the bundle's inference config)",
                   "keras": "the Keras model's own forward pass (Keras 3, torch backend)"}.get(kind)
        if theirs is None:
            with torch.no_grad():
                theirs = built(x).numpy()
            against = ("the network the source's weights were loaded into (no independent reference: "
                       "give --reference-output)")
    difference = compare(ours, theirs, against)
    if not np.isfinite(difference) or difference > TOLERANCE:
        raise InputError(f"The imported package differs from {against} by {difference:.3g} on the reference input "
                         f"(tolerance {TOLERANCE}): it does not compute what the source computes. Check the "
                         "declared input shape, the network's arguments and the mapping's layouts.")
    return {"max_abs_difference": difference, "against": against, "tolerance": TOLERANCE,
            "reference_input": f"one image {list(x.shape[1:])}", "independent": "no independent" not in against}


def write_documents(folder: Path, source: Path, kind: str, architecture: dict, coder: TargetCoder, shape: list[int],
                    inputs: dict, output: dict, terms: dict, target: str, parity: dict, prefix: str,
                    mapping: Path | None, found: dict, network: nn.Module, layer: str | None) -> dict:
    """spec.json, preprocessing.json, normalisation.json, metrics.json and the grid; returns the spec."""
    from pipeline.intake.grid import write_grid

    made = declared_recipe(inputs)
    segmentation = coder.task == "segmentation"
    explain = None
    if not segmentation:
        explain = resolved(["explain"], {})
        explain["gradcam_layer"] = layer or explain["gradcam_layer"]
    spec = {
        "format": package.FORMAT, "format_version": package.FORMAT_VERSION,
        "architecture": architecture, "sampler": None, "task": coder.task, "target": target,
        "classes": coder.classes, "positive_class": None,
        "input": {"shape": shape, "channels": list(inputs["channels"]), "dtype": "float32",
                  "axes": f"(batch, channel, x, y, z): voxels of the declared grid (RAS+), {made['normalisation']}"},
        "outputs": coder.outputs, "folds": [FOLD], "ensemble": "one network (imported)", "explain": explain,
        **(segexport.spec_entries([network], coder.classes) if segmentation else {}),
        "output": {k: v for k, v in output.items() if v is not None},
        "license": terms.get("license") or modelcard.UNSPECIFIED, "redistribution": terms.get("redistribution", True),
        "source": {"kind": kind, "file": source.name, "sha256": package.sha256(source) if source.is_file() else None,
                   "prefix_stripped": prefix or None, "mapping": mapping.name if mapping else None,
                   "user_code": architecture["name"] == "user_code", **found["extra"]},
        "parity": parity,
        "software": {"pipeline": __version__, **{name: version(name) for name in ("torch", "safetensors")}},
    }
    normalisation = {"input": made["normalisation"], "target": {FOLD: coder.state()}, "bias_correction": {}}
    metrics = {"test": {}, "validation": {}, "parity": parity}
    for name, doc in ((package.SPEC, spec), (package.RECIPE, made), (package.NORMALISATION, normalisation),
                      (package.METRICS, metrics)):
        atomic.write_text(folder / name, json.dumps(doc, indent=2, default=float) + "\n")
    write_grid(made["resolution"], tuple(made["shape"]), folder / package.GRID_TEMPLATE, folder / package.GRID_MASK)
    return spec


def write_onnx(folder: Path, model: nn.Module, network: nn.Module, coder: TargetCoder, x: torch.Tensor, tmp: Path) -> dict:
    """model.onnx: the network with its decoding (a segmentation network: its logits), checked on ``x``."""
    path = folder / package.ONNX
    if coder.task == "segmentation":
        with atomic.path(tmp / "reference.npy") as array:
            np.save(array, x[0].numpy())
        return segexport.network_onnx([model], {}, [str(tmp / "reference.npy")], path)
    decoded = Decoded(network, coder).eval()
    onnxcheck.write(decoded, x, path, "prediction")
    difference = onnxcheck.difference(path, decoded, [x])
    if difference > TOLERANCE:
        raise InputError(f"ONNX Runtime differs from PyTorch by {difference:.2g} on the reference input "
                         f"(tolerance {TOLERANCE}); this network does not export faithfully.")
    return {"file": package.ONNX, "opset": onnxcheck.OPSET, "input": "image", "output": "prediction",
            "max_abs_difference": difference, "checked_on": "the reference input"}


def json_argument(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def bins_argument(args) -> list[float] | None:
    """Bin centres from --bins (the centres) or --bin-range START STOP STEP (SFCN: 42 82 1 → 40 bins,
    centres 42.5 … 81.5)."""
    if args.bins:
        return list(args.bins)
    if args.bin_range:
        start, stop, step = args.bin_range
        count = int(round((stop - start) / step))
        return [start + step * (i + 0.5) for i in range(count)]
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="the checkpoint: file, Hugging Face folder or MONAI bundle")
    parser.add_argument("--out", type=Path, required=True, help="the package folder to write (new)")
    net = parser.add_argument_group("network (weights-only sources)")
    net.add_argument("--architecture", help="a registered network (bids-deepstudy networks)")
    net.add_argument("--arch-args", type=json_argument, default={}, help="its arguments, JSON")
    net.add_argument("--factory", help="user code instead: module:function building the network")
    net.add_argument("--factory-args", type=json_argument, default={}, help="the factory's keyword arguments, JSON")
    net.add_argument("--mapping", type=Path, help="rename/re-lay tensors: {rules: [{match, name, layout|transpose}], ignore}")
    given = parser.add_argument_group("declared input")
    given.add_argument("--channels", nargs="+", default=["T1w"], help="BIDS suffixes in channel order (default T1w)")
    given.add_argument("--space", default=SPACE, help=f"template space (default {SPACE}, this pipeline's)")
    given.add_argument("--voxel-size", type=float, required=True, help="isotropic voxel size, mm")
    given.add_argument("--shape", type=int, nargs=3, required=True, metavar=("X", "Y", "Z"), help="grid shape")
    given.add_argument("--crop", help="the crop of the template grid the model takes, e.g. 11:171,13:205,0:160")
    given.add_argument("--brain-extraction", default="none", help="brain extraction method, or none")
    given.add_argument("--intensity", choices=sorted(recipe.INTENSITIES), default="zscore",
                       help="intensity normalisation (zscore in the brain: this pipeline's; mean: SFCN's; minmax)")
    given.add_argument("--transform", help="registration transform (default: the schema's)")
    out = parser.add_argument_group("declared output")
    out.add_argument("--output", choices=OUTPUTS, required=True)
    out.add_argument("--target", default="prediction", help="what is predicted (e.g. age)")
    out.add_argument("--classes", nargs="+", help="class or label names, output order")
    out.add_argument("--bins", type=float, nargs="+", help="soft-label bin centres (--output bins)")
    out.add_argument("--bin-range", type=float, nargs=3, metavar=("START", "STOP", "STEP"),
                     help="bins of STEP from START to STOP (SFCN: 42 82 1)")
    out.add_argument("--scale", type=float, default=1.0, help="scalar output: prediction = output × scale + shift")
    out.add_argument("--shift", type=float, default=0.0)
    parser.add_argument("--license", help="the model's licence (SPDX id or text)")
    parser.add_argument("--no-redistribution", action="store_true", help="its licence forbids redistribution")
    parser.add_argument("--reference-input", type=Path, help=".npy (C, X, Y, Z) to check parity on")
    parser.add_argument("--reference-output", type=Path, help=".npy: the source's own output on it")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        network = ({"factory": args.factory, "kwargs": args.factory_args} if args.factory
                   else {"name": args.architecture, "args": args.arch_args} if args.architecture else {})
        inputs = {"channels": args.channels, "space": args.space, "voxel_size": args.voxel_size, "shape": args.shape,
                  "crop": args.crop, "brain_extraction": args.brain_extraction, "intensity": args.intensity,
                  "transform": args.transform}
        output = {"type": args.output, "classes": args.classes, "bins": bins_argument(args),
                  "scale": args.scale if args.output == "scalar" else None,
                  "shift": args.shift if args.output == "scalar" else None}
        if args.output == "bins" and not output["bins"]:
            raise InputError("--output bins needs --bins CENTRES… or --bin-range START STOP STEP.")
        output = {k: v for k, v in output.items() if v is not None}
        spec = import_package(args.source, args.out, network, inputs, output,
                              {"license": args.license, "redistribution": not args.no_redistribution}, args.mapping,
                              (args.reference_input, args.reference_output), args.target)
    parity = spec["parity"]
    print(f"package {args.out}: {spec['architecture']['name']} from {spec['source']['kind']}; max abs difference "
          f"{parity['max_abs_difference']:.3g} against {parity['against']}; {spec['import_seconds']} s", file=sys.stderr)
    for line in recipe.unproducible(json.loads((args.out / package.RECIPE).read_text())):
        print(f"note: apply will refuse this package until its input can be made here: {line}", file=sys.stderr)


if __name__ == "__main__":
    main()
