"""Foreign checkpoints as plain {name: tensor} dicts, read without running any of their code.

- PyTorch (``.pt``, ``.pth``, ``.p``, ``.bin``): ``torch.load(weights_only=True)`` only; a bare
  state dict or one inside ``{"state_dict": …}``, ``{"model": …}`` (also ``model_state_dict``,
  ``network``, ``net``). A pickled whole model or a TorchScript archive is refused with how to
  export a state dict instead.
- safetensors: a file, or a Hugging Face style folder (``model.safetensors`` + ``config.json``).
- a MONAI bundle, folder or zip: ``configs/metadata.json``, ``configs/inference.json`` (its
  ``network_def``, references resolved to values here, expressions refused) and
  ``models/model.pt`` (or ``model.safetensors``).
- ``.npz``: name → array, renamed by a mapping file (``apply_mapping``).

``fit`` matches a dict to a network strictly: DataParallel's ``module.`` and Lightning's
``model.`` prefixes are tried automatically; any missing, unexpected or wrongly shaped tensor
stops the import with one message that lists them all and the closest names on the other side.
"""

from __future__ import annotations

import difflib
import json
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from pipeline.common.errors import InputError

TORCH_SUFFIXES = (".pt", ".pth", ".p", ".bin", ".ckpt")
CONTAINERS = ("state_dict", "model", "model_state_dict", "network", "net")
PREFIXES = ("module.", "model.")
EXPORT_HINT = ("Export its weights as a state dict where the model is defined: "
               "`torch.save(model.state_dict(), 'weights.pt')`, and import that with the network's definition "
               "(--architecture NAME or --factory module:function).")
LAYOUTS = {"io": (1, 0), "hwio": (3, 2, 0, 1), "dhwio": (4, 3, 0, 1, 2)}  # TF/Keras kernels → PyTorch's


def read_torch(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in a PyTorch checkpoint (tensors only)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise InputError(f"{path} is empty (0 bytes): the download or copy was cut short. Get the file again.")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            raise InputError(f"{path} is a TorchScript archive (compiled code, not weights); it is never loaded "
                             f"here. {EXPORT_HINT}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path} holds pickled Python objects, not only tensors (e.g. a whole model saved instead "
                         f"of its state_dict()); unpickling could run any code, so it is refused. {EXPORT_HINT}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path} is not a readable PyTorch checkpoint: truncated or corrupt ({exc}). "
                         "Get the file again and compare its checksum with the published one.") from exc
    return tensors_of(loaded, path)


def tensors_of(loaded, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap the usual containers down to a dict of tensors."""
    while isinstance(loaded, dict) and not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        inner = next((loaded[k] for k in CONTAINERS if isinstance(loaded.get(k), dict)), None)
        if inner is None:
            kinds = {k: type(v).__name__ for k, v in loaded.items() if not isinstance(v, torch.Tensor)}
            raise InputError(f"{path} is a dict whose entries {sorted(kinds)[:8]} are not tensors, and none of "
                             f"{list(CONTAINERS)} holds the weights. {EXPORT_HINT}")
        loaded = inner
    if not isinstance(loaded, dict) or not loaded:
        raise InputError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors. {EXPORT_HINT}")
    return dict(loaded)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable safetensors file: truncated or corrupt ({exc}). "
                         "Get the file again.") from exc


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or PyTorch file."""
    return read_safetensors(path) if Path(path).suffix == ".safetensors" else read_torch(path)


def huggingface_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, config.json) of a Hugging Face style folder."""
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise InputError(f"{folder} has no model.safetensors (nor pytorch_model.bin); a Hugging Face style folder "
                         "holds its weights there, beside config.json.")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return read_weights(weights), config


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    except ValueError as exc:
        raise InputError(f"{path}: an .npz of name → array is read without pickles; {exc}") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path} is not a readable .npz archive: truncated or corrupt ({exc}).") from exc


def read_mapping(path: Path) -> dict:
    """A mapping file (JSON or YAML): ``rules`` [{match: regex, name: replacement, layout | transpose}],
    ``ignore`` [regex]."""
    import yaml

    try:
        mapping = yaml.safe_load(Path(path).read_text())
        rules = [{**r, "pattern": re.compile(r["match"])} for r in mapping.get("rules", [])]
        ignore = [re.compile(p) for p in mapping.get("ignore", [])]
    except (OSError, yaml.YAMLError, AttributeError, KeyError, TypeError, re.error) as exc:
        raise InputError(f"{path} is not a mapping file ({exc}): give {{rules: [{{match: REGEX, name: NAME, "
                         "layout: dhwio|hwio|io or transpose: [axes]}], ignore: [REGEX]}}.") from exc
    for rule in rules:
        if rule.get("layout") is not None and rule["layout"] not in LAYOUTS:
            raise InputError(f"{path}: layout {rule['layout']!r} of rule {rule['match']!r} is not one of "
                             f"{sorted(LAYOUTS)}; give `transpose: [axes]` for any other.")
    return {"rules": rules, "ignore": ignore}


def apply_mapping(state: dict[str, torch.Tensor], mapping: dict, where: Path) -> dict[str, torch.Tensor]:
    """Rename (the first matching rule's ``name``, with regex groups) and re-lay each tensor; names
    no rule matches and no ``ignore`` pattern covers stop the import, listed."""
    out, unmatched = {}, []
    for name, tensor in state.items():
        rule = next((r for r in mapping["rules"] if r["pattern"].fullmatch(name)), None)
        if rule is None:
            if not any(p.fullmatch(name) for p in mapping["ignore"]):
                unmatched.append(name)
            continue
        axes = rule.get("transpose") or LAYOUTS.get(rule.get("layout"))
        if axes is not None:
            if len(axes) != tensor.dim():
                raise InputError(f"{where}: rule {rule['match']!r} transposes {name} {tuple(tensor.shape)} with "
                                 f"{len(axes)} axes {list(axes)}; it has {tensor.dim()}.")
            tensor = tensor.permute(*axes)
        out[rule["pattern"].sub(rule["name"], name)] = tensor.contiguous()
    if unmatched:
        raise InputError(f"{where} leaves {len(unmatched)} tensor(s) unmatched: {', '.join(unmatched)}. Add a rule "
                         "for each (match → name), or list the ones to drop under `ignore`.")
    return out


def strip_prefixes(state: dict, expected: set[str]) -> tuple[dict, str]:
    """``state`` with the prefix (``module.``, ``model.``, both, or none) that matches most of ``expected``."""
    best, best_prefix, best_score = state, "", len(set(state) & expected)
    for prefix in (*PREFIXES, "module.model.", "model.module."):
        if all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix):]: v for k, v in state.items()}
            score = len(set(stripped) & expected)
            if score > best_score or (score == best_score and prefix == "module."):  # DataParallel's, always
                best, best_prefix, best_score = stripped, prefix, score
    return best, best_prefix


def closest(name: str, others) -> str:
    near = difflib.get_close_matches(name, list(others), n=2, cutoff=0.5)
    return f" (closest: {', '.join(near)})" if near else ""


def fit(state: dict[str, torch.Tensor], network: torch.nn.Module, source: Path, what: str) -> tuple[dict, str]:
    """``state`` matched strictly to ``network`` (prefixes stripped, dtypes made the network's,
    BatchNorm's ``num_batches_tracked`` counters filled with 0 where a framework has none); returns
    it and the prefix stripped. ``what`` names the network in the message."""
    expected = network.state_dict()
    state, prefix = strip_prefixes(state, set(expected))
    for key in expected:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(expected[key])
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        lines = [f"missing {k} {tuple(expected[k].shape)}{closest(k, unexpected)}" for k in missing]
        lines += [f"unexpected {k} {tuple(state[k].shape)}{closest(k, missing)}" for k in unexpected]
        lines += [f"wrong shape {k}: checkpoint {tuple(state[k].shape)}, network {tuple(expected[k].shape)}"
                  for k in shapes]
        raise InputError(f"{source} does not fit {what}: {len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(shapes)} wrongly shaped tensor(s):\n  " + "\n  ".join(lines) + "\nCheck the network "
                         "(--architecture and --arch-args, or --factory) against the checkpoint, or rename its "
                         "tensors with a --mapping file (README, 'Models trained elsewhere').")
    return {k: state[k].to(expected[k].dtype).contiguous() for k in expected}, prefix
