"""The study's configuration: the schema (``workflow/schemas/config.schema.yaml``) is the one home
of every key, its meaning and its default.

The workflow validates the config and fills in the defaults (Snakemake's ``validate``); every
stage receives, with ``--config``, the resolved keys it reads as one JSON object
(``stage_config``). Code that is called without the workflow (a test, a notebook) fills its
section from the same schema with ``resolved``, never from defaults of its own.

A stage's ``main`` turns its section into one settings object, a frozen dataclass whose fields
are the section's keys (``build``: what the config leaves out is the schema's default, filled
here and nowhere else), and passes that down; the library functions read its attributes.

>>> resolved(["train"], {"epochs": 3})["epochs"], resolved(["train"], {})["batch_size"] > 0
(3, True)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path
from typing import Mapping, TypeVar

from pipeline.common.errors import InputError
from pipeline.common.locations import SCHEMA


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    import yaml

    return yaml.load(SCHEMA.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 10× faster


def read_file(path: Path, named: str | None = None) -> dict:
    """A config file as a mapping; InputError naming it (as ``named``, default its path) when it is
    missing, not YAML or not a mapping."""
    import yaml

    if not path.is_file():
        raise InputError(f"{named or path}: no such config file. Start from config/study.yaml "
                         "(a study on your own data) or config/config.yaml (the demo).")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{path} is not valid YAML: {exc}. Fix the line it names.") from None
    if config is not None and not isinstance(config, dict):
        raise InputError(f"{path} holds a {type(config).__name__}, not a mapping of config keys; "
                         "start from config/study.yaml.")
    return config or {}


def section(path: list[str]) -> dict:
    """The schema of the config section at ``path`` (e.g. ``["train"]``, ``["train", "augmentation"]``)."""
    node = schema()
    for key in path:
        node = node["properties"][key]
    return node


def fill(node: dict, value: dict) -> dict:
    """``value`` with every missing key that has a schema default filled in, nested objects too
    (what Snakemake's ``validate(..., set_default=True)`` does)."""
    out = dict(value)
    for key, prop in node.get("properties", {}).items():
        if key not in out and "default" in prop:
            out[key] = copy.deepcopy(prop["default"])
        if isinstance(out.get(key), dict) and "properties" in prop:
            out[key] = fill(prop, out[key])
    return out


def resolved(path: list[str], given: dict) -> dict:
    """The config section at ``path`` from ``given`` and the schema's defaults; a key the schema does
    not know is an error that names it and the known ones."""
    node = section(path)
    known = set(node.get("properties", {}))
    unknown = sorted(set(given) - known)
    if unknown and node.get("additionalProperties") is False:
        raise InputError(f"Unknown setting(s) {unknown} in config `{'.'.join(path)}`; known: {sorted(known)}")
    return fill(node, given)


T = TypeVar("T")


def build(cls: type[T], path: list[str], given: Mapping) -> T:
    """The settings dataclass ``cls`` of the config section at ``path`` (``[]``: the top-level
    keys): each field the key of its name, from ``given`` or else the schema's default
    (``resolved``, which also refuses a key the section does not know). A field without a schema
    default (a value the workflow derives, e.g. ingest's ``target`` in apply mode) must be given.
    A field that is no key of the section keeps the dataclass's own default (e.g. attribution's
    ``seed``); a section key never does."""
    values = resolved(path, dict(given))
    keys = set(section(path).get("properties", {}))
    fields = [f for f in dataclasses.fields(cls) if f.name in keys or f.name in values]
    missing = [f.name for f in fields if f.name not in values]
    if missing:
        where = ".".join(path) or "(top level)"
        raise InputError(f"config `{where}` lacks {missing}, which have no default; set them.")
    return cls(**{f.name: values[f.name] for f in fields})


def defaults(path: list[str]):
    """The default of the key at ``path`` (a whole section filled from its parts' defaults)."""
    node = section(path)
    return fill(node, copy.deepcopy(node.get("default", {}))) if "properties" in node else node.get("default")


def stage_config(config: dict, keys: list[str], **derived) -> str:
    """The JSON a stage's ``--config`` receives: the config's ``keys`` and the workflow's ``derived``
    values (decisions the Snakefile makes, e.g. apply mode's task)."""
    return json.dumps({**{k: config[k] for k in keys}, **derived}, sort_keys=True)
