"""The model zoo a user can see: what a registry holds, and what one package expects and predicts.

    bids-deepstudy models list [--registry R] [--json]
    bids-deepstudy inspect PACKAGE [--version V] [--registry R] [--json]

``models list``: one row per registered package: its name, versions, and from its highest version
the task, target, input recipe (channels, space, voxel size, grid, brain extraction) and licence,
read from the archive's ``spec.json`` and ``preprocessing.json`` without unpacking anything else
(the checksums are checked by ``fetch`` and ``inspect``, not here). ``inspect``: a package folder,
a ``.tar.gz`` (checked and unpacked into a temporary folder) or a registry name ``owner/name[:version]``
(fetched into one), verified as ``apply`` verifies it, then described: what it expects (grid,
voxel size, space, channels, brain extraction, normalisation), what it predicts (task, target,
classes or output type), its parity figures (ONNX Runtime against PyTorch; for an imported model
the package against its source, ``n/a`` when the package has none), licence and provenance.
Our own packages and imported ones (``bids-deepstudy import``) are described alike; a key an
older or foreign package lacks is shown as ``n/a``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

from pipeline.common.errors import InputError
from pipeline.common import package
from pipeline.sharing import tarball
from pipeline.sharing import registry

NA = "n/a"
OUTPUT_TYPES = {"regression": "scalar", "classification": "class probabilities (softmax of logits)",
                "segmentation": "label maps"}
MAX_DOCUMENT_BYTES = 1 << 20  # a spec or recipe larger than this is not read from an archive


def documents_in_archive(opened, where: str) -> dict:
    """``spec.json`` and ``preprocessing.json`` of a package archive (a binary file object), read
    as the archive streams past; nothing is written or extracted."""
    wanted, found = {package.SPEC, package.RECIPE}, {}
    try:
        with tarfile.open(fileobj=opened, mode="r|gz") as tar:
            for member in tar:
                name = member.name.split("/", 1)[-1]
                if name in wanted and member.isfile() and member.size <= MAX_DOCUMENT_BYTES:
                    found[name] = json.loads(tar.extractfile(member).read())
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{where} is not a readable package archive ({exc}).") from exc
    missing = sorted(wanted - set(found))
    if missing:
        raise InputError(f"{where} holds no {', '.join(missing)}; it is not a model package.")
    return found


def recipe_summary(recipe: dict) -> str:
    """``T1w; MNI152NLin2009aSym 4 mm, grid 16x16x16; brain extraction none``."""
    grid = "x".join(map(str, recipe.get("shape", []))) or NA
    crop = f", crop {recipe['crop']}" if recipe.get("crop") else ""
    resolution = f"{recipe['resolution']:g} mm" if isinstance(recipe.get("resolution"), (int, float)) else NA
    return (f"{'+'.join(recipe.get('channels', [])) or NA}; {recipe.get('space', NA)} {resolution}, grid {grid}{crop}; "
            f"brain extraction {recipe.get('brain_extraction', 'none')}")


def registry_rows(where: str) -> list[dict]:
    """One row per registered package (details of its highest version), sorted by name."""
    fs, root = registry.open_registry(where)
    names = sorted({tuple(Path(p).parts[-4:-2]) for p in fs.glob(f"{root}/*/*/*/{registry.ARCHIVE}.sha256")})
    rows = []
    for owner, name in names:
        ref = registry.Ref(owner, name, None)
        known = registry.versions(fs, root, ref)
        archive = f"{root}/{owner}/{name}/{known[-1]}/{registry.ARCHIVE}"
        try:
            with fs.open(archive, "rb") as opened:
                docs = documents_in_archive(opened, archive)
        except InputError as exc:  # one damaged archive does not hide the others
            rows.append({"name": f"{owner}/{name}", "versions": known, "task": f"unreadable: {exc}", "target": NA,
                         "input": NA, "license": NA, "imported": NA})
            continue
        spec, recipe = docs[package.SPEC], docs[package.RECIPE]
        rows.append({"name": f"{owner}/{name}", "versions": known, "task": spec.get("task", NA),
                     "target": spec.get("target", NA), "input": recipe_summary(recipe),
                     "license": spec.get("license", NA), "imported": bool(spec.get("source"))})
    return rows


def output_of(spec: dict) -> dict:
    """What the network's outputs are: the declared output of an imported package, else the task's."""
    declared = spec.get("output") if isinstance(spec.get("output"), dict) else {}
    kind = declared.get("type") or OUTPUT_TYPES.get(spec.get("task"), NA)
    described = {"type": kind, "outputs": spec.get("outputs", NA)}
    if kind == "bins" and declared.get("bins"):
        bins = declared["bins"]
        described.update(type="soft-label bins (the prediction is their expected value)", bins=len(bins),
                         bin_range=[min(bins), max(bins)])
    for key in ("scale", "shift"):
        if key in declared:
            described[key] = declared[key]
    return described


def parity_of(spec: dict) -> dict:
    """The parity figures: ONNX Runtime against PyTorch, and (imported) the package against its source."""
    onnx = spec.get("onnx") if isinstance(spec.get("onnx"), dict) else {}
    source = spec.get("parity") if isinstance(spec.get("parity"), dict) else {}
    return {"onnx_max_abs_difference": onnx.get("max_abs_difference", NA),
            "source_max_abs_difference": source.get("max_abs_difference", NA),
            "source_reference": source.get("against", NA), "source_tolerance": source.get("tolerance", NA)}


def headline(metrics: dict, task: str) -> dict:
    """The package's own test metric with its interval (none for an imported package)."""
    ensemble = (metrics.get("test") or {}).get("ensemble") or {}
    name = {"classification": "roc_auc", "segmentation": "dice_mean"}.get(task, "mae")
    if name not in ensemble:
        return {"test_metric": NA}
    return {"test_metric": name, "value": ensemble[name], "ci": ensemble.get(f"{name}_ci", NA),
            "participants": ensemble.get("n", NA)}


def describe(pkg: package.Package, name: str) -> dict:
    """Everything ``inspect`` shows, as plain data."""
    from pipeline.intake import recipe as recipes

    spec, rec = pkg.spec, pkg.recipe
    unproducible = getattr(recipes, "unproducible", lambda _: [])(rec)  # what our preprocessing cannot make
    source = spec.get("source") if isinstance(spec.get("source"), dict) else None
    return {
        "package": {"name": name, "format_version": spec.get("format_version"),
                    "architecture": spec.get("architecture", {}).get("name", NA),
                    "architecture_args": spec.get("architecture", {}).get("args", {}),
                    "folds": len(spec.get("folds", [])), "ensemble": spec.get("ensemble", NA)},
        "expects": {"channels": spec.get("input", {}).get("channels", rec.get("channels", NA)),
                    "space": rec.get("space", NA), "template": rec.get("template", NA),
                    "voxel_size_mm": rec.get("resolution", NA), "grid": rec.get("shape", NA),
                    "crop": rec.get("crop") or NA, "brain_extraction": rec.get("brain_extraction", "none"),
                    "normalisation": rec.get("normalisation", NA), "registration": rec.get("transform", NA),
                    "bias_field_correction": rec.get("n4", NA),
                    "input_tensor": ["B", *spec.get("input", {}).get("shape", [])],
                    "our_preprocessing_makes_it": not unproducible, "cannot_make": unproducible},
        "predicts": {"task": spec.get("task", NA), "target": spec.get("target", NA),
                     "classes": spec.get("classes") or NA, "positive_class": spec.get("positive_class") or NA,
                     "output": output_of(spec)},
        "performance": headline(pkg.metrics, spec.get("task")),
        "parity": parity_of(spec),
        "license": {"license": spec.get("license", NA), "redistribution": spec.get("redistribution", True)},
        "provenance": ({"imported_from": source} if source else
                       {"trained_by": "pipeline", "software": spec.get("software", NA)}),
        "explain": spec.get("explain") or NA,
    }


def shown(value) -> str:
    """A value for reading: numbers to 4 significant digits, lists and mappings inline."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: NA}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(shown(v) for v in value) + "]" if value else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {shown(v)}" for k, v in value.items()) or "none"
    return str(value)


def text(description: dict) -> str:
    """``describe``'s data as indented sections."""
    lines = []
    for section, entries in description.items():
        lines.append(f"{section}:")
        if not isinstance(entries, dict):
            lines.append(f"  {shown(entries)}")
            continue
        lines += [f"  {key.replace('_', ' ')}: {shown(value)}" for key, value in entries.items()]
    return "\n".join(lines)


def open_package(model: str, version: str | None, where: str, tmp: Path) -> tuple[str, package.Package]:
    """(name shown, verified package) of a folder, an archive or a registry name."""
    path = Path(model).expanduser()
    if path.exists():
        if version is not None:
            raise InputError(f"--version picks a registry version, but {model} is a package on disk.")
        folder = path if path.is_dir() else tarball.unpack(path, tmp)
        return str(path), package.load(folder)
    ref = registry.parse_name(model)
    if version is not None:
        ref = ref._replace(version=version)
    ref, folder = registry.fetch(str(ref), where, tmp / "fetched")
    return str(ref), package.load(folder)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    registry_help = f"registry folder or fsspec URL (default: ${registry.ENVIRONMENT}, else {registry.DEFAULT})"
    listing = commands.add_parser("list", help="the registry's packages")
    listing.add_argument("--registry", help=registry_help)
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect = commands.add_parser("inspect", help="what a package expects and predicts")
    inspect.add_argument("package", help="a package folder or .tar.gz, else a registry name owner/name[:version]")
    inspect.add_argument("--version", help="registry version (default: the highest)")
    inspect.add_argument("--registry", help=registry_help)
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    where = registry.location(args.registry)
    with InputError.exit_cleanly():
        if args.command == "list":
            rows = registry_rows(where)
            if args.json:
                print(json.dumps(rows, indent=2))
            elif not rows:
                print(f"no packages in {where}", file=sys.stderr)
            else:
                import pandas as pd

                table = pd.DataFrame(rows).assign(versions=lambda t: t["versions"].map(", ".join))
                print(table.to_string(index=False))
            return
        with tempfile.TemporaryDirectory() as tmp:
            name, pkg = open_package(args.package, args.version, where, Path(tmp))
            description = describe(pkg, name)
            print(json.dumps(description, indent=2, default=str) if args.json else text(description))


if __name__ == "__main__":
    main()
