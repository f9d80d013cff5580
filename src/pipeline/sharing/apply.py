"""Apply a model package to a BIDS dataset (BIDS-Apps convention)::

    bids-deepstudy apply BIDS_DIR OUTPUT_DIR participant --model MODEL [--version V]
                             [--participant-label 01 02] [--session-label 1] [--registry R]
                             [--work-dir DIR] [--cores N] [--device cpu|cuda] [--dry-run]
                             [--maps none | --maps occlusion,gradient]
                             [--calibrate-on TABLE [--calibrate-column C] [--calibrate-participants 01 02 ...]]

The options it shares with ``bids-deepstudy run``'s BIDS-App form have the same meaning and
defaults (``pipeline.common.bidsapp``: ``--cores all``, ``--work-dir ./work``).
MODEL is a package folder or a ``model.tar.gz`` on disk (an existing path wins), else a registry
name ``owner/name[:version]`` (``--version V`` is the same as ``:V``; default: the highest). A
registry package is fetched into ``WORK_DIR/models/<owner>/<name>/<version>``, an archive is
unpacked into ``WORK_DIR/models/archive-<sha256 prefix>``, a folder is used where it is; each is
verified (checksums, safetensors) before use. Then it writes ``WORK_DIR/config.yaml`` (the
package's preprocessing recipe and image selection, the package's explanation settings,
``apply.package``) and runs the study's own Snakefile in its apply mode, in the work folder
(``.snakemake/`` goes there; a dry run, ``--dry-run``, does all of this in a temporary folder
when the work folder does not exist yet, and writes nothing):
ingest (no target) → preprocess (the package's grid and recipe) → predict → maps → report → output.
Every stage writes in the work folder: ``predictions.tsv`` (and ``predict/fold-K/``), ``explain/maps/``
(template and native space), the preprocessed images and arrays under ``derivatives/pipeline/``.
OUTPUT_DIR is one BIDS derivative dataset (``pipeline.sharing.applyout``: the preprocessed images,
the maps with BIDS names, participants and scans tables of the predictions) and ``report.html``.
``--maps none`` predicts only (no ``predict_maps`` job); ``--maps a,b`` computes those methods
(``saliency`` is ``gradient``). ``--calibrate-on`` (a regression package) recalibrates the
predictions to this site without training: the brain-age linear correction fitted on the
labelled participants of TABLE only (``pipeline.sharing.calibrate``) → ``calibration.json``,
``predictions_calibrated.tsv`` and a report section; the calibration participants are never scored.
A segmentation package labels the images instead (``pipeline.sharing.segpredict``): ``labels/``
(the folds' majority vote, template and native grid), ``predictions.tsv`` listing them (with Dice
and HD95 given ``--label-image``), ``predict/fold-K/`` in the work folder; the label maps in
OUTPUT_DIR's dataset; ``report.html``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.common import atomic, bidsapp
from pipeline.common import package
from pipeline.sharing import tarball
from pipeline.intake import recipe
from pipeline.sharing import registry
from pipeline.common.errors import InputError
from pipeline.common import launch
from pipeline.common.locations import SNAKEFILE  # noqa: F401  (tests build apply runs from it)


def apply_config(bids_dir: Path, output_dir: Path, pkg: package.Package, name: str, labels: list[str],
                 methods: list[str] | None, session: str = "all", label_image: dict | None = None,
                 bids_validation: bool = True, maps: bool = True, calibration: dict | None = None,
                 work_dir: Path | None = None, device: str | None = None) -> dict:
    """The workflow config of an apply run: paths, the package's recipe and explain settings (none
    for a segmentation package: the schema's defaults, unused); ``session``: config ``sessions``
    (all, first, last or one label); ``label_image``: config ``label_image`` (a segmentation
    package's label maps are then scored against it; its ``labels`` default to the package's);
    ``bids_validation``: config ``bids_validation`` (``--skip-bids-validation`` sets it false);
    ``maps``: config ``apply.maps`` (false: predictions only); ``calibration``: config
    ``apply.calibration`` ({table, column, participants}, checked here: ``calibration_config``);
    ``work_dir``: config ``work_dir``; ``device``: config ``device`` (``cuda`` also sets ``gpu``)."""
    refusals = recipe.unproducible(pkg.recipe)
    if refusals:
        raise InputError(f"Package {pkg.folder} expects input this pipeline's preprocessing cannot make "
                         f"({'; '.join(refusals)}). Prepare the images as its model card says and run it outside "
                         "the workflow, or import it with an input declaration this pipeline can make.")
    explain = dict(pkg.spec["explain"] or {})
    if methods and pkg.spec["explain"] is None:  # --maps none asks for nothing a segmentation package lacks
        raise InputError(f"--maps/--methods choose explanation maps, but package {pkg.folder} is a {pkg.spec['task']} "
                         "package, which has no explanation maps; leave them out.")
    if calibration is not None:
        calibration = calibration_config(pkg, calibration, labels)
    if methods:
        explain["methods"] = methods
    if label_image is not None:
        if pkg.spec["task"] != "segmentation":
            raise InputError(f"--label-image scores label maps, but package {pkg.folder} predicts {pkg.spec['task']}.")
        label_image = {"labels": list(pkg.spec["classes"]), **label_image}
    return {
        "bids_dir": str(bids_dir.resolve()), "results_dir": str(output_dir.resolve()),
        **({"work_dir": str(Path(work_dir).resolve())} if work_dir is not None else {}),
        **({"device": device} if device else {}), **({"gpu": True} if device == "cuda" else {}),
        "target": pkg.spec["target"], "task": pkg.spec["task"],
        **recipe.config_keys(pkg.recipe),
        "participants": {"include": labels, "exclude": []},
        "sessions": session,
        "bids_validation": bids_validation,
        "explain": {**explain, "groundtruth": None},
        **({"label_image": label_image} if label_image else {}),
        "apply": {"package": str(pkg.folder.resolve()), "name": name, "maps": maps, "calibration": calibration},
    }


def calibration_config(pkg: package.Package, calibration: dict, labels: list[str]) -> dict:
    """Config ``apply.calibration`` checked before any job runs: a regression package, a readable
    table with the column, labelled calibration participants among those applied to."""
    from pipeline.intake.ids import with_sub_prefix
    from pipeline.sharing.calibrate import MINIMUM, targets

    if pkg.spec["task"] != "regression":
        raise InputError(f"--calibrate-on recalibrates a regression package's predictions; package {pkg.folder} "
                         f"predicts {pkg.spec['task']}.")
    table = Path(calibration["table"]).expanduser().resolve()
    if not table.is_file():
        raise InputError(f"--calibrate-on {calibration['table']}: no such file; give a TSV with participant_id and "
                         "the target column (e.g. the dataset's participants.tsv).")
    column = calibration.get("column") or pkg.spec["target"]
    known = targets(table, column)
    chosen = sorted({with_sub_prefix(p) for p in calibration.get("participants") or []}) or sorted(known.index)
    unlabelled = [p for p in chosen if p not in known.index]
    if unlabelled:
        raise InputError(f"--calibrate-participants {', '.join(unlabelled)}: no {column} in {table}.")
    applied = {with_sub_prefix(p) for p in labels}
    outside = [p for p in chosen if applied and p not in applied]
    if outside:
        raise InputError(f"Calibration participant(s) {', '.join(outside)} are not among --participant-label; add them "
                         "(their images must be predicted to fit the correction).")
    if len(chosen) < MINIMUM:
        raise InputError(f"Calibration needs at least {MINIMUM} labelled participants; {table} gives {len(chosen)}.")
    return {"table": str(table), "column": column, "participants": list(calibration.get("participants") or [])}


def maps_argument(text: str) -> list[str]:
    """``--maps``: ``none`` → [], else comma-separated attribution methods (``saliency`` = ``gradient``)."""
    from pipeline.results.attribution import METHODS

    if text.strip().lower() == "none":
        return []
    chosen = [{"saliency": "gradient"}.get(m.strip(), m.strip()) for m in text.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: give none, or methods separated by commas from: "
                                         f"{', '.join(METHODS)} (saliency = gradient)")
    return chosen


def run_workflow(config_file: Path, directory: Path, cores: int | str, extra: list[str], readable: bool = False) -> int:
    """Run the Snakefile on ``config_file`` in ``directory`` (the work folder); return Snakemake's exit
    status. ``readable``: a dry run shown as ``pipeline.common.launch.plan``."""
    return launch.snakemake(["--directory", str(directory), "--configfile", str(config_file),
                             "--cores", str(cores), *extra], readable=readable)


def is_path(model: str) -> bool:
    """Whether ``--model`` names a package on disk (an existing folder or file) rather than a registry name."""
    return Path(model).expanduser().exists()


def local_package(model: Path, models_dir: Path) -> tuple[str, Path]:
    """(name recorded in the config, verified package folder) of a package folder or ``.tar.gz`` on disk.
    An archive is unpacked (after ``tarball.unpack``'s checks) into ``models_dir/archive-<sha256[:16]>``,
    reused when that folder is already there."""
    model = model.expanduser().resolve()
    if model.is_dir():
        return str(model), package.load(model).folder
    digest = package.sha256(model)
    dest = models_dir / f"archive-{digest[:16]}"
    if not dest.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
            folder = tarball.unpack(model, Path(tmp))
            package.load(folder)
            shutil.move(str(folder), str(dest))
    return f"{model} (sha256 {digest})", package.load(dest).folder


def registry_package(model: str, version: str | None, where: str, models_dir: Path) -> tuple[str, Path]:
    """(resolved ``owner/name:version``, verified package folder) fetched from the registry ``where``."""
    ref = registry.parse_name(model)
    if version is not None:
        if ref.version not in (None, version):
            raise InputError(f"--model {model} names version {ref.version} but --version is {version}: give one.")
        ref = ref._replace(version=version)
    fs, root = registry.open_registry(where)
    ref = registry.resolve(fs, root, ref)
    ref, folder = registry.fetch(str(ref), where, models_dir / ref.owner / ref.name / ref.version)
    return str(ref), folder


def label_image_argument(text: str) -> dict:
    """``--label-image``'s JSON object (config ``label_image``)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        value, problem = None, str(exc)
    else:
        problem = "" if isinstance(value, dict) else f"a {type(value).__name__}, not an object"
    if problem:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON object ({problem}); give config label_image as JSON, e.g. "
            '\'{"derivatives": "derivatives/tissue", "filters": {"suffix": "dseg", "desc": "tissue"}}\'')
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bidsapp.add_arguments(parser, levels=("participant",))
    parser.add_argument("--model", required=True,
                        help="a package folder or model.tar.gz on disk, else a registry name owner/name[:version]")
    parser.add_argument("--version", help="registry version of --model (default: the highest registered)")
    parser.add_argument("--registry", help=f"registry folder or fsspec URL (default: ${registry.ENVIRONMENT}, "
                                           f"else {registry.DEFAULT})")
    parser.add_argument("--maps", type=maps_argument, metavar="none|METHOD,METHOD",
                        help="explanation maps: none (predictions only), or attribution methods separated by commas, "
                             "e.g. occlusion,gradient (default: the package's)")
    parser.add_argument("--methods", nargs="+", help="attribution methods, space-separated (as --maps a,b)")
    calibrate = parser.add_argument_group("recalibration of a regression package to this site, without training")
    calibrate.add_argument("--calibrate-on", type=Path, metavar="TABLE",
                           help="TSV with participant_id and the target (e.g. BIDS_DIR/participants.tsv): the linear "
                                "correction predicted = a + b*true is fitted on its labelled participants, applied "
                                "to the others")
    calibrate.add_argument("--calibrate-column", help="the target column of TABLE (default: the package's target)")
    calibrate.add_argument("--calibrate-participants", nargs="+", metavar="LABEL",
                           help="fit on these participants only (default: every one with a value in TABLE); the "
                                "others with a value are scored, raw and calibrated")
    parser.add_argument("--label-image", type=label_image_argument, metavar="JSON",
                        help="a segmentation package: each image's label image to score the label maps against, "
                             "as config label_image, e.g. '{\"derivatives\": \"derivatives/tissue\", "
                             "\"filters\": {\"suffix\": \"dseg\"}}' (labels: the package's)")
    parser.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[],
                        help="further Snakemake arguments (e.g. -n), last on the line")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if not args.bids_dir.is_dir():
            raise InputError(f"BIDS_DIR {args.bids_dir} is not a folder.")
        work = bidsapp.work_folder(args.work_dir, args.output_dir)
        slots = bidsapp.gpu_slots(args, {})
    with tempfile.TemporaryDirectory(prefix="bids-deepstudy-dry-run-") as scratch:
        status = prepare_and_run(args, work, Path(scratch) if args.dry_run else None, slots)
    sys.exit(status)


def prepare_and_run(args: argparse.Namespace, work: Path, scratch: Path | None, slots: list[str]) -> int:
    """Fetch or unpack the package into the work folder, write its config there and run Snakemake in
    it. A dry run (``scratch``, a temporary folder) writes nothing: the config goes to ``scratch``,
    and so do the package (unless the work folder holds it already) and Snakemake's state (unless
    the work folder exists)."""
    with InputError.exit_cleanly():
        models_dir = work / "models"
        if scratch is not None and not models_dir.is_dir():
            models_dir = scratch / "models"
        if is_path(args.model):
            if args.version is not None:
                raise InputError(f"--version picks a registry version, but --model {args.model} is a package on disk.")
            name, folder = local_package(Path(args.model), models_dir)
        else:
            name, folder = registry_package(args.model, args.version, registry.location(args.registry), models_dir)
        pkg = package.load(folder)
        if args.maps is not None and args.methods:
            raise InputError("Give --maps or --methods, not both.")
        methods = args.maps or args.methods
        calibration = None
        if args.calibrate_on is not None:
            calibration = {"table": str(args.calibrate_on), "column": args.calibrate_column,
                           "participants": args.calibrate_participants or []}
        elif args.calibrate_column or args.calibrate_participants:
            raise InputError("--calibrate-column and --calibrate-participants need --calibrate-on TABLE.")
        config = apply_config(args.bids_dir, args.output_dir, pkg, name, args.participant_label, methods,
                              args.session_label or "all", args.label_image, not args.skip_bids_validation,
                              maps=args.maps != [], calibration=calibration, work_dir=work, device=args.device)
    config_file = (scratch or work) / "config.yaml"
    directory = scratch if scratch is not None and not work.exists() else work
    if scratch is None:
        bidsapp.claim(work, args.output_dir)  # creates it; a package folder on disk unpacks nothing there first
    atomic.write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    print(f"applying {name} ({folder}) to {args.bids_dir}; config {config_file}", file=sys.stderr)
    extra = [*slots, *(["-n"] if args.dry_run else []), *args.snakemake_args]
    readable = launch.readable_dry_run(extra) and not args.print_commands
    return run_workflow(config_file, directory, args.cores, extra, readable)


if __name__ == "__main__":
    main()
