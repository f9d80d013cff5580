"""A MONAI bundle (folder or zip) as a network definition, weights and metadata.

The bundle layout is MONAI's: ``configs/metadata.json``, ``configs/inference.json`` (or ``.yaml``)
with ``network_def``, ``models/model.pt`` (or ``models/model.safetensors``). A zip is extracted
into a temporary folder after its members are checked (no links, no paths outside it). The
``network_def``'s ``@`` references are resolved to the values they name; ``$`` expressions (Python
the bundle parser would evaluate) are refused, and only MONAI classes are built
(``pipeline.learning.models.check_bundle_definition``), so importing a bundle runs none of its code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

from pipeline.common.errors import InputError
from pipeline.sharing import foreign

CONFIGS = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")


def extract(archive: Path, dest: Path) -> Path:
    """Extract a bundle zip into ``dest``; return the bundle folder (the one holding ``configs/``)."""
    try:
        with zipfile.ZipFile(archive) as zipped:
            for info in zipped.infolist():
                path = PurePosixPath(info.filename)
                if path.is_absolute() or ".." in path.parts or (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InputError(f"{archive} holds {info.filename!r}, a link or a path outside its folder. "
                                     "Refusing to extract it.")
            zipped.extractall(dest)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputError(f"{archive} is not a readable zip archive: truncated or corrupt ({exc}).") from exc
    found = sorted(p.parent.parent for p in Path(dest).rglob("configs/metadata.json"))
    if not found:
        raise InputError(f"{archive} holds no configs/metadata.json: not a MONAI bundle.")
    return found[0]


def read_config(path: Path) -> dict:
    import yaml

    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)


def resolve(value, config: dict, where: str, depth: int = 0):
    """``value`` with every ``@id`` reference replaced by the (resolved) config entry it names."""
    if depth > 20:
        raise InputError(f"{where}: references nest more than 20 deep (a cycle?).")
    if isinstance(value, dict):
        return {k: resolve(v, config, f"{where}.{k}", depth) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, config, f"{where}[{i}]", depth) for i, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("@"):
        entry = config
        for part in value[1:].split("::"):
            if not isinstance(entry, (dict, list)):
                raise InputError(f"{where} refers to {value}, which the bundle's inference config does not define.")
            try:
                entry = entry[int(part)] if isinstance(entry, list) else entry[part]
            except (KeyError, IndexError, ValueError) as exc:
                raise InputError(f"{where} refers to {value}, which the bundle's inference config does not "
                                 "define.") from exc
        return resolve(entry, config, value, depth + 1)
    if isinstance(value, str) and value.startswith(("$", "%")):
        raise InputError(f"{where} is the expression {value!r}: bundle expressions are Python and are not run "
                         "at import. Replace it with its value in the bundle's network_def.")
    return value


def read(source: Path, workdir: Path) -> dict:
    """{folder, metadata, network_def (resolved), state (tensors), weights (file)} of a bundle."""
    folder = extract(source, workdir) if Path(source).is_file() else Path(source)
    meta_path = folder / "configs" / "metadata.json"
    config_path = next((folder / c for c in CONFIGS if (folder / c).is_file()), None)
    if not meta_path.is_file() or config_path is None:
        raise InputError(f"{source} is not a MONAI bundle: it needs configs/metadata.json and "
                         "configs/inference.json (with network_def).")
    config = read_config(config_path)
    if "network_def" not in config:
        raise InputError(f"{config_path} has no network_def; a bundle's inference config defines its network there.")
    weights = next((folder / "models" / n for n in ("model.pt", "model.safetensors") if (folder / "models" / n).is_file()),
                   None)
    if weights is None:
        raise InputError(f"{source} has no models/model.pt (nor models/model.safetensors): the bundle's weights.")
    return {"folder": folder, "metadata": json.loads(meta_path.read_text()), "weights": weights,
            "network_def": resolve(config["network_def"], config, "network_def"),
            "state": foreign.read_weights(weights)}


def declared_outputs(metadata: dict) -> dict:
    """What the bundle's metadata says of its output: {task, classes} where it says it."""
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    first = next(iter(outputs.values()), {}) if isinstance(outputs, dict) else {}
    names = first.get("channel_def") or {}
    classes = [str(names[k]) for k in sorted(names, key=lambda k: int(k))] if names else None
    task = {"segmentation": "segmentation", "classification": "classification"}.get(first.get("format"))
    return {k: v for k, v in {"task": task, "classes": classes}.items() if v}
