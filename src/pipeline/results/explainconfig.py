"""Config ``explain`` checked before any job runs (``pipeline.check``), and the layers Grad-CAM reads.

``explain.gradcam_layer`` names a module of the network the user configured (``train.model``, e.g.
``features.2``), whatever ``train.sampler``: a slice or patch model's wrapper is resolved to its
network (``sampler.views_of``). The check builds each network the explain stage will see on
PyTorch's meta device (no weights, no memory) and lists its layers; torch is imported only then.
The layers are kept in the user's cache (``pipeline.common.locations.USER_CACHE``) by the network's
settings, the code that builds it and the torch and MONAI versions, so later checks and Snakemake
starts of the same network need no torch.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

from pipeline.common import codegraph, jsoncache
from pipeline.common.errors import InputError
from pipeline.common.locations import USER_CACHE

LAYER_CACHE = USER_CACHE / "layers.json"


def layer_choices(network) -> list[str]:
    """Names of the modules worth giving Grad-CAM: convolutions and the blocks that hold modules."""
    from torch.nn.modules.conv import _ConvNd

    return [name for name, module in network.named_modules()
            if name and (isinstance(module, _ConvNd) or next(module.children(), None) is not None)]


def unknown_layer(layer: str, choices: list[str], owner: str) -> str:
    """The message for a Grad-CAM ``layer`` that a network (described by ``owner``, with the layer
    ``choices``) lacks."""
    close = difflib.get_close_matches(layer, choices, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return (f"config `explain.gradcam_layer` is {layer!r}, a layer {owner} does not have.{hint} Names are those "
            f"of the configured network, whatever `train.sampler`; choose one of: {', '.join(choices)}.")


def find_layer(network, layer: str, owner: str = "the model"):
    """The module of ``network`` named ``layer`` (``named_modules``); InputError listing the choices."""
    modules = dict(network.named_modules())
    if not layer or layer not in modules:  # "" is the whole network: no spatial activations
        raise InputError(unknown_layer(layer, layer_choices(network), owner))
    return modules[layer]


def meta_network(name: str, in_channels: int, spatial_dims: int, args: dict):
    """The registered network ``name`` built on the meta device: its modules, no weights."""
    import torch

    from pipeline.learning.models import build_model

    with torch.device("meta"):
        return build_model(name, in_channels, 1, spatial_dims, **args)


def package_network(arch: dict, in_channels: int):
    """A package's network (its spec's ``architecture``) on the meta device."""
    from pipeline.learning.models import recorded_args

    return meta_network(arch["name"], in_channels, arch.get("spatial_dims", 3), recorded_args(arch["name"], arch["args"]))


def explained_networks(config: dict) -> Iterator[tuple[str, dict, Callable[[], object]]]:
    """(owner, settings, build) of every network the explain stage sees: the package's in apply mode,
    else ``train.model`` and each of ``train.variants`` that changes the network; ``settings`` is
    what the network is built from (its key in the layer cache)."""
    if config["apply"]:
        try:
            spec = json.loads((Path(config["apply"]["package"]) / "spec.json").read_text())
        except (OSError, ValueError):
            return  # the workflow reports an unreadable package, naming it
        arch = spec["architecture"]
        yield (f"the package's network ({arch['name']})", {"architecture": arch, "input": spec["input"]},
               lambda: package_network(arch, spec["input"]["shape"][0]))
        return
    from pipeline.learning.variants import hyperparameters

    train, seen = config["train"], set()
    for variant in [None, *train["variants"]]:
        hyper = hyperparameters(train, variant)
        owner = f"`train.variants.{variant}`" if variant else "`train.model`"
        network = (hyper["model"], json.dumps(hyper["model_args"], sort_keys=True), json.dumps(hyper["sampler"]))
        if network in seen:
            continue
        seen.add(network)
        settings = {"model": hyper["model"], "model_args": hyper["model_args"], "sampler": hyper["sampler"],
                    "channels": len(config["channels"])}
        yield (f"{owner} ({hyper['model']})", settings,
               lambda h=hyper: meta_network(h["model"], len(config["channels"]), spatial_dims(h["sampler"]),
                                            h["model_args"]))


def problems(config: dict) -> list[str]:
    """Problems of config ``explain`` (the config filled in with the schema's defaults) that no
    single key shows: a stride beyond the window, a Grad-CAM layer the network lacks."""
    explain, found = config["explain"], []
    if explain["stride"] > explain["window"]:
        found.append(f"config `explain.stride` ({explain['stride']}) is larger than `explain.window` "
                     f"({explain['window']}): voxels between two windows would never be occluded. "
                     "Set a valid value: a stride of at most the window.")
    if "gradcam" not in explain["methods"] or config["task"] == "segmentation":
        return found
    for owner, settings, build in explained_networks(config):
        layers = network_layers(settings, build)
        if "error" in layers:
            found.append(f"config {owner}: the network cannot be built to check `explain.gradcam_layer` "
                         f"({layers['error']}). Set a valid value.")
        elif explain["gradcam_layer"] not in layers["modules"] or not explain["gradcam_layer"]:
            found.append(unknown_layer(explain["gradcam_layer"], layers["choices"], owner))
    return found


def spatial_dims(sampler: dict) -> int:
    from pipeline.learning.sampler import build_sampler

    return build_sampler(sampler).spatial_dims


def network_layers(settings: dict, build: Callable[[], object]) -> dict:
    """``{"modules": every module name, "choices": layer_choices}`` of the network ``build`` makes
    from ``settings``, or ``{"error": why it cannot be built}``; from the layer cache when the same
    settings, code and library versions were seen before."""
    code = codegraph.fingerprint("pipeline.learning.models", "pipeline.learning.sampler")
    versions = {name: library_version(name) for name in ("torch", "monai")}
    key = hashlib.sha256(json.dumps([settings, code, versions], sort_keys=True, default=str).encode()).hexdigest()
    cache = jsoncache.read(LAYER_CACHE)
    cache = cache if isinstance(cache, dict) else {}
    if key in cache:
        return cache[key]
    try:
        network = build()
        layers = {"modules": [name for name, _ in network.named_modules()], "choices": layer_choices(network)}
    except (KeyError, ValueError, TypeError) as exc:
        layers = {"error": str(exc)}
    try:
        jsoncache.write(LAYER_CACHE, {**(cache if len(cache) < 500 else {}), key: layers})
    except OSError:
        pass  # an unwritable cache only costs the next check the same time
    return layers


def library_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
