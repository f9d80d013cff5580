"""Fine-tuning: start a fold's network from a fetched model package (config ``train.init_from``).

Rules, each failing with a message that names both sides:

- architecture: the package's network name, arguments and input channels must equal the study's;
- preprocessing: the package's recipe must equal the study's (``pipeline.intake.recipe.COMPARED``);
- weights: study fold K starts from package fold ((K - 1) mod n) + 1 of its n folds;
- head: the output layer (the parameters whose shape depends on the number of outputs) is kept
  when the package predicts the same thing (task, target and class list; a package's soft-label
  bins of this study's regression target count, ``package_bins``: the study then trains and
  predicts their expected value) and ``train.package_head`` is ``keep``; otherwise it starts
  from random weights, with the reason printed: a different number of outputs cannot fit, and
  the same number of different classes (or another target) would mean something else; with ``train.head_init:
  probe`` (default) the new head is then fitted in closed form on the pre-trained features of the
  training images (``probe_head``: a linear probe before fine-tuning, LP-FT);
- ``train.freeze``: ``true`` trains only the last layer with parameters, an integer N the last N;
  a layer name or a list of them (``features``, ``["features.0", "features.1"]``) freezes every
  parameter of those layers and of the layers inside them (matched at dots: ``features.1`` is not
  ``features.10``); a new head is never frozen; frozen BatchNorm layers keep their running
  statistics (momentum 0) and normalise with them in training too (``trainer.train_mode``);
- ``train.backbone_lr_factor``: the head trains at ``learning_rate``, every other (pre-trained)
  parameter at ``learning_rate`` × the factor (``parameter_groups``; 1: one group).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.common import package
from pipeline.intake import recipe
from pipeline.learning.coder import TargetCoder
from pipeline.common.errors import InputError
from pipeline.learning.models import build_model, recorded_args, resolved_args
from pipeline.learning.settings import TrainSettings


def source_fold(fold: str, folds: list[str]) -> str:
    """The package fold that study ``fold`` (``fold-K``) starts from: ((K - 1) mod n) + 1."""
    k = int(fold.removeprefix("fold-"))
    return folds[(k - 1) % len(folds)]


def check_architecture(spec: dict, name: str, args: dict, channels: list[str], where: Path) -> None:
    """The package's network (its recorded arguments, defaults filled in) must be the study's; the
    message names the arguments that differ."""
    package_name, package_args = spec["architecture"]["name"], spec["architecture"]["args"]
    theirs = resolved_args(package_name, recorded_args(package_name, package_args))
    ours = resolved_args(name, args)
    if (package_name, theirs, spec["input"]["channels"]) != (name, ours, list(channels)):
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        shown = [{k: side.get(k) for k in differ} for side in (theirs, ours)]
        raise InputError(f"train.init_from: the package {where} is {package_name} {shown[0]} on channels "
                         f"{spec['input']['channels']}, this study {name} {shown[1]} on channels {list(channels)}. "
                         "Set `train.model`, `train.model_args` and `channels` to the package's.")


def check_preprocessing(theirs: dict, ours: dict, where: Path) -> None:
    differences = recipe.unproducible(theirs) + recipe.mismatches(theirs, ours)
    if differences:
        raise InputError(f"train.init_from: the package {where} was trained on differently prepared images "
                         f"({'; '.join(differences)}). Set the study's `preprocess` keys to the package's "
                         f"({where / package.RECIPE}).")


def head_keys(name: str, args: dict, in_channels: int) -> set[str]:
    """State-dict keys whose shape depends on the number of outputs: the network's head."""
    one, two = (build_model(name, in_channels, n, **args).state_dict() for n in (1, 2))
    return {k for k in one if one[k].shape != two[k].shape}


def output_words(spec: dict) -> str:
    """The package's output in words, with its declared output type when the spec has one
    (``spec["output"]["type"]``, e.g. an imported model's soft-label bins)."""
    declared = spec.get("output") if isinstance(spec.get("output"), dict) else {}
    words = f"{spec['task']} of {spec['target']!r}" + (f" into {spec['classes']}" if spec["classes"] else "")
    centres = declared.get("bins")
    if declared.get("type") == "bins" and isinstance(centres, list) and centres:
        return f"{words} by {len(centres)} soft-label bins centred {min(centres):g}-{max(centres):g}"
    return words


def package_bins(folder: Path, task: str, target: str) -> list[float] | None:
    """The bin centres of a package that predicts this study's regression ``target`` as soft-label
    bins (an imported SFCN), whose head a fine-tuning study can keep; None otherwise."""
    spec = package.load(folder).spec
    declared = spec.get("output") if isinstance(spec.get("output"), dict) else {}
    centres = declared.get("bins")
    if (task, declared.get("type"), spec.get("task"), spec.get("target")) == ("regression", "bins", task, target) \
            and isinstance(centres, list) and centres:
        return [float(c) for c in centres]
    return None


def head_reason(spec: dict, coder: TargetCoder, target: str) -> str | None:
    """Why the package's head cannot be kept (None when it can)."""
    theirs = output_words(spec)
    ours = f"{coder.task} of {target!r}" + (f" into {coder.classes}" if coder.classes else "")
    if spec["outputs"] != coder.outputs:
        return f"the package has {spec['outputs']} output(s) ({theirs}), this study {coder.outputs} ({ours})"
    if (spec["task"], spec["target"], spec["classes"]) != (coder.task, target, coder.classes):
        return f"the package's outputs mean {theirs}, this study's {ours}"
    return None


def layers_with_parameters(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def named_by(name: str, prefix: str) -> bool:
    """Whether parameter ``name`` belongs to layer ``prefix`` (itself or a layer inside it)."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def freeze_layers(model: nn.Module, prefixes: list[str]) -> list[str]:
    """Freeze every parameter of the layers named ``prefixes`` (and of the layers inside them);
    return the names of the parameters left to train. A prefix that names nothing is an error
    listing the network's layers."""
    names = [n for n, _ in model.named_parameters()]
    unknown = [p for p in prefixes if not any(named_by(n, p) for n in names)]
    if unknown:
        layers = sorted({n.rsplit(".", 1)[0] for n in names} | {n.split(".", 1)[0] for n in names})
        raise InputError(f"train.freeze {unknown} names no layer of the network; its layers with parameters: "
                         f"{', '.join(layers)}.")
    frozen = {n for n in names if any(named_by(n, p) for p in prefixes)}
    if len(frozen) == len(names):
        raise InputError(f"train.freeze {prefixes} freezes every parameter of the network; leave a layer to train "
                         "(e.g. the head).")
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    for _, module in layers_with_parameters(model):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.momentum = 0.0  # running statistics stay the package's
    return [n for n in names if n not in frozen]


def freeze_setting(value) -> int | list[str]:
    """Config ``train.freeze`` as a count of trainable last layers (0: none frozen) or a list of layer names."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return 1 if value is True else int(value or 0)


def parameter_groups(network: nn.Module, head: set[str], learning_rate: float, factor: float) -> list[dict]:
    """AdamW's parameter groups: the head's parameters at ``learning_rate``, every other one (the
    pre-trained backbone) at ``learning_rate * factor``; the head's group first (history's ``lr``)."""
    named = list(network.named_parameters())
    groups = [{"name": "head", "params": [p for n, p in named if n in head], "lr": learning_rate},
              {"name": "backbone", "params": [p for n, p in named if n not in head], "lr": learning_rate * factor}]
    return [g for g in groups if g["params"]]


def freeze(model: nn.Module, trainable: int) -> list[str]:
    """Freeze every layer with parameters except the last ``trainable``; return the trainable layers' names."""
    layers = layers_with_parameters(model)
    if trainable >= len(layers):
        raise InputError(f"train.freeze {trainable} leaves nothing frozen: the network has {len(layers)} layers "
                         "with parameters.")
    for _, module in layers[:-trainable]:
        module.requires_grad_(False)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # running statistics stay the package's
    return [n for n, _ in layers[-trainable:]]


def probe_head(model: nn.Module, head: set[str], arrays: list[str], y, coder: TargetCoder) -> str | None:
    """Fit a new head in closed form on the pre-trained features of the training images (a linear
    probe: ridge regression on the normalised target, or logistic regression), so fine-tuning
    starts from a head that already reads the features (LP-FT, Kumar et al. 2022) instead of a
    random one that would pull the pre-trained layers towards noise. Returns what was done, or None
    where it does not apply (a head that is not one linear map of pooled features)."""
    from sklearn.linear_model import LogisticRegression, RidgeCV

    names = {key.rsplit(".", 1)[0] for key in head}
    if len(names) != 1 or coder.task not in ("regression", "classification"):
        return None
    layer = model.get_submodule(names.pop())
    features = []
    hook = layer.register_forward_pre_hook(lambda module, inputs: features.append(inputs[0].detach().flatten(1)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(arrays), 8):
                model(torch.from_numpy(np.stack([np.load(a) for a in arrays[start:start + 8]]).astype(np.float32)))
    finally:
        hook.remove()
        model.train(was_training)
    x, target = torch.cat(features).numpy(), np.asarray(y)
    if x.shape[1] != layer.weight[0].numel():
        return None
    if coder.task == "regression":
        fit = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(x, target)
        weight, bias = fit.coef_[None], np.atleast_1d(fit.intercept_)
    else:
        if len(np.unique(target)) < 2:
            return None
        fit = LogisticRegression(max_iter=2000).fit(x, target)
        weight, bias = fit.coef_, fit.intercept_
        if len(coder.classes) == 2:  # one score for class 1: split it over the two logits
            weight, bias = np.concatenate([-weight, weight]) / 2, np.array([-bias[0], bias[0]]) / 2
        elif len(fit.classes_) != len(coder.classes):
            return None
    with torch.no_grad():
        layer.weight.copy_(torch.as_tensor(weight, dtype=layer.weight.dtype).reshape(layer.weight.shape))
        if layer.bias is not None:
            layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))
    return f"fitted on the pre-trained features of {len(arrays)} training image(s) ({type(fit).__name__})"


def initialise(model: nn.Module, folder: Path, settings: TrainSettings, coder: TargetCoder, target: str,
               channels: list[str], study_recipe: dict, fold: str,
               probe: tuple[list[str], object] | None = None) -> nn.Module:
    """Load a package fold's weights into ``model`` (built from ``settings``, config ``train``),
    following the module's rules.
    A new head is fitted by ``probe_head`` on ``probe`` (training arrays, encoded targets) with
    ``train.head_init: probe``."""
    pkg = package.load(folder)
    check_architecture(pkg.spec, settings.model, settings.model_args, channels, folder)
    check_preprocessing(pkg.recipe, study_recipe, folder)
    start = source_fold(fold, pkg.folds)
    state = pkg.state_dict(start)
    reason = "config train.package_head is new" if settings.package_head == "new" else head_reason(pkg.spec, coder, target)
    if reason:
        head = head_keys(settings.model, settings.model_args, len(channels))
        state = {k: v for k, v in state.items() if k not in head}
        print(f"{fold}: new head ({', '.join(sorted(head))} from random weights): {reason}", file=sys.stderr)  # a probe may follow
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or (set(missing) and not reason):
        raise InputError(f"{folder / package.weights_file(start)} does not fit the network: missing {missing}, "
                         f"unexpected {unexpected}.")
    print(f"{fold}: starting from {folder} {start}", file=sys.stderr)
    if reason and probe is not None and settings.head_init == "probe":
        how = probe_head(model, head, *probe, coder)
        print(f"{fold}: new head {how or 'left random (not one linear map of pooled features)'}", file=sys.stderr)
    setting = freeze_setting(settings.freeze)
    if isinstance(setting, list):
        trained = freeze_layers(model, setting)
        frozen_head = sorted(k for k in head_keys(settings.model, settings.model_args, len(channels))
                             if k in dict(model.named_parameters()) and k not in trained) if reason else []
        if frozen_head:
            raise InputError(f"train.freeze {setting} freezes {', '.join(frozen_head)}, the new head, which starts from "
                             "random weights and must train; name only layers before it.")
        print(f"{fold}: training only {', '.join(trained)}", file=sys.stderr)
    elif setting:
        print(f"{fold}: training only {', '.join(freeze(model, setting))}", file=sys.stderr)
    return model
