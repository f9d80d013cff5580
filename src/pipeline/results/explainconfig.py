"""Config ``explain`` checked before any job runs (``pipeline.configcheck``), and the layers Grad-CAM reads.

``explain.gradcam_layer`` names a module of the network the user configured (``train.model``, e.g.
``features.2``), whatever ``train.sampler``: a slice or patch model's wrapper is resolved to its
network (``sampler.views_of``). The check builds each network the explain stage will see on
PyTorch's meta device (no weights, no memory) and lists its layers; torch is imported only then.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Callable, Iterator

from pipeline.common.errors import InputError


def layer_choices(network) -> list[str]:
    """Names of the modules worth giving Grad-CAM: convolutions and the blocks that hold modules."""
    from torch.nn.modules.conv import _ConvNd

    return [name for name, module in network.named_modules()
            if name and (isinstance(module, _ConvNd) or next(module.children(), None) is not None)]


def unknown_layer(layer: str, network, owner: str) -> str:
    """The message for a Grad-CAM ``layer`` that ``network`` (described by ``owner``) lacks."""
    choices = layer_choices(network)
    close = difflib.get_close_matches(layer, choices, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return (f"config `explain.gradcam_layer` is {layer!r}, a layer {owner} does not have.{hint} Names are those "
            f"of the configured network, whatever `train.sampler`; choose one of: {', '.join(choices)}.")


def find_layer(network, layer: str, owner: str = "the model"):
    """The module of ``network`` named ``layer`` (``named_modules``); InputError listing the choices."""
    modules = dict(network.named_modules())
    if not layer or layer not in modules:  # "" is the whole network: no spatial activations
        raise InputError(unknown_layer(layer, network, owner))
    return modules[layer]


def meta_network(name: str, in_channels: int, spatial_dims: int, args: dict):
    """The registered network ``name`` built on the meta device: its modules, no weights."""
    import torch

    from pipeline.learning.models import build_model

    with torch.device("meta"):
        return build_model(name, in_channels, 1, spatial_dims, **args)


def explained_networks(config: dict) -> Iterator[tuple[str, Callable[[], object]]]:
    """(owner, build) of every network the explain stage sees: the package's in apply mode, else
    ``train.model`` and each of ``train.variants`` that changes the network."""
    if config.get("apply"):
        try:
            spec = json.loads((Path(config["apply"]["package"]) / "spec.json").read_text())
        except (OSError, ValueError):
            return  # the workflow reports an unreadable package, naming it
        from pipeline.learning.models import recorded_args

        arch = spec["architecture"]
        yield (f"the package's network ({arch['name']})",
               lambda: meta_network(arch["name"], spec["input"]["shape"][0], arch.get("spatial_dims", 3),
                                    recorded_args(arch["name"], arch["args"])))
        return
    from pipeline.learning.sampler import build_sampler

    train, seen = config["train"], set()
    for variant in [None, *train.get("variants", {})]:
        hyper = {**train, **(train["variants"][variant] if variant else {})}
        owner = f"`train.variants.{variant}`" if variant else "`train.model`"
        network = (hyper["model"], json.dumps(hyper["model_args"], sort_keys=True), json.dumps(hyper["sampler"]))
        if network in seen:
            continue
        seen.add(network)
        yield (f"{owner} ({hyper['model']})",
               lambda h=hyper: meta_network(h["model"], len(config["channels"]), build_sampler(h["sampler"]).spatial_dims,
                                            h["model_args"]))


def problems(config: dict) -> list[str]:
    """Problems of config ``explain`` (the config filled in with the schema's defaults) that no
    single key shows: a stride beyond the window, a Grad-CAM layer the network lacks."""
    explain, found = config["explain"], []
    if explain["stride"] > explain["window"]:
        found.append(f"config `explain.stride` ({explain['stride']}) is larger than `explain.window` "
                     f"({explain['window']}): voxels between two windows would never be occluded. "
                     "Set a valid value: a stride of at most the window.")
    if "gradcam" not in explain["methods"] or config.get("task") == "segmentation":
        return found
    for owner, build in explained_networks(config):
        try:
            network = build()
        except (KeyError, ValueError, TypeError) as exc:
            found.append(f"config {owner}: the network cannot be built to check `explain.gradcam_layer` ({exc}). "
                         "Set a valid value.")
            continue
        try:
            find_layer(network, explain["gradcam_layer"], owner)
        except InputError as exc:
            found.append(str(exc))
    return found
