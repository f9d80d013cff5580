"""Config checks with messages a user can act on: the key, what is wrong, what is allowed.

``snakemake.utils.validate`` reports one JSON-schema error with the schema dumped around it. This
module reports every error first, each naming the key (``train.batch_size``) and saying what to
set: an unknown key lists the valid keys at its level (with the closest one); a value outside an
``enum`` lists the choices (``train.model``: the model registry); a bound names the bound and the
key's description. Checks across keys (``cross``: functions of the config filled in with the
schema's defaults → problem lines) run when the schema finds nothing. The workflow runs it, with the
stages' cross-key checks (``pipeline.check``), before ``validate`` (which then fills in defaults).
"""

from __future__ import annotations

import argparse
import difflib
from pathlib import Path
from typing import Callable, Iterable

import yaml
from jsonschema import Draft202012Validator

from pipeline.common.config import fill
from pipeline.common.config import schema as config_schema
from pipeline.common.errors import InputError
from pipeline.common.locations import SCHEMA


def key_name(path) -> str:
    """``['train', 'batch_size']`` → ``train.batch_size`` (list indices as ``[i]``)."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def message(error) -> list[str]:
    """One line per problem of a jsonschema ``error``."""
    where = key_name(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    described = f" ({schema['description'].rstrip('.')})" if schema.get("description") else ""
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        valid = sorted(schema.get("properties", {}))
        unknown = [k for k in error.instance if k not in valid]
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" Did you mean `{key_name([*error.absolute_path, close[0]])}`?" if close else ""
            level = f"under `{where}`" if where else "at the top level"
            lines.append(f"config key `{key_name([*error.absolute_path, key])}` is not known.{hint} "
                         f"Valid keys {level}: {', '.join(valid)}.")
        return lines
    if error.validator == "required":
        missing = error.message.split("'")[1] if error.message.count("'") >= 2 else ""
        if "default" in schema.get("properties", {}).get(missing, {}):
            return []  # validate fills it in
        return [f"config {'`' + where + '` ' if where else ''}lacks a required key: {error.message}. "
                "Add it (config/README.md describes every key)."]
    if error.validator == "enum":
        return [f"config `{where}` is {error.instance!r}; choose one of: {', '.join(map(str, error.validator_value))}"
                f"{described}."]
    return [f"config `{where or '(top level)'}`: {error.message}{described}. Set a valid value."]


def problems(config: dict, schema: dict) -> list[str]:
    """Every problem of ``config`` against ``schema``, in key order."""
    errors = sorted(Draft202012Validator(schema).iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))
    return [line for error in errors for line in message(error)]


def check(config: dict, schema_path: Path = SCHEMA, cross: Iterable[Callable[[dict], list[str]]] = ()) -> None:
    """InputError listing every problem of ``config`` (none: returns quietly): the schema's, else
    those of each ``cross`` check on the config filled in with the schema's defaults."""
    schema = config_schema() if Path(schema_path) == SCHEMA else yaml.safe_load(Path(schema_path).read_text())
    found = problems(config, schema)
    if not found:
        filled = fill(schema, config)
        found = [line for each in cross for line in each(filled)]
    if found:
        raise InputError("The config has errors:\n  " + "\n  ".join(found))


def main(argv=None, cross: Iterable[Callable[[dict], list[str]]] = ()) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="config YAML (e.g. config/config.yaml)")
    parser.add_argument("--schema", type=Path, default=SCHEMA)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if not args.config.is_file():
            raise InputError(f"{args.config}: no such config file. Start from config/study.yaml "
                             "(a study on your own data) or config/config.yaml (the demo).")
        check(yaml.safe_load(args.config.read_text()) or {}, args.schema, cross)
    print(f"{args.config}: no problems")


if __name__ == "__main__":
    main()
