"""Apply a registered model package to a BIDS dataset (BIDS-Apps convention)::

    python -m pipeline.apply BIDS_DIR OUTPUT_DIR participant --model owner/name[:version]
                             [--participant-label 01 02] [--registry R] [--cores N]

Fetches the package into ``OUTPUT_DIR/models/<owner>/<name>/<version>`` (checksums verified), writes
``OUTPUT_DIR/config.yaml`` (the package's preprocessing recipe and image selection, the package's
explanation settings, ``apply.package``) and runs the study's own Snakefile in its apply mode:
ingest (no target) → preprocess (the package's grid and recipe) → predict → maps → report.
Outputs: ``predictions.tsv`` (and ``predict/fold-K/``), ``explain/maps/`` (template and native
space), ``report.html``, beside the preprocessed images under ``derivatives/pipeline/``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.common import atomic
from pipeline.sharing import package
from pipeline.intake import recipe
from pipeline.sharing import registry
from pipeline.common.errors import InputError

from pipeline.common.locations import SNAKEFILE


def apply_config(bids_dir: Path, output_dir: Path, pkg: package.Package, name: str, labels: list[str],
                 methods: list[str] | None) -> dict:
    """The workflow config of an apply run: paths, the package's recipe and explain settings."""
    explain = dict(pkg.spec["explain"])
    if methods:
        explain["methods"] = methods
    return {
        "bids_dir": str(bids_dir.resolve()), "results_dir": str(output_dir.resolve()),
        "target": pkg.spec["target"], "task": pkg.spec["task"],
        **recipe.config_keys(pkg.recipe),
        "participants": {"include": labels, "exclude": []},
        "explain": {**explain, "groundtruth": None},
        "apply": {"package": str(pkg.folder.resolve()), "name": name},
    }


def run_workflow(config_file: Path, output_dir: Path, cores: int, extra: list[str]) -> int:
    """Run the Snakefile on ``config_file`` in ``output_dir``; return Snakemake's exit status."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(output_dir),
               "--configfile", str(config_file), "--cores", str(cores), *extra]
    return subprocess.run(command, env=env).returncode


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bids_dir", type=Path, help="the BIDS dataset (read only)")
    parser.add_argument("output_dir", type=Path, help="where predictions, maps and the report go")
    parser.add_argument("analysis_level", choices=["participant"], help="BIDS-Apps level: participant")
    parser.add_argument("--model", required=True, help="package name: owner/name[:version]")
    parser.add_argument("--participant-label", nargs="+", default=[], help="participants (with or without sub-)")
    parser.add_argument("--registry", help=f"registry folder or fsspec URL (default: ${registry.ENVIRONMENT}, "
                                           f"else {registry.DEFAULT})")
    parser.add_argument("--methods", nargs="+", help="attribution methods (default: the package's)")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--snakemake-args", nargs=argparse.REMAINDER, default=[],
                        help="further Snakemake arguments (e.g. -n), last on the line")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if not args.bids_dir.is_dir():
            raise InputError(f"BIDS_DIR {args.bids_dir} is not a folder.")
        where = registry.location(args.registry)
        ref = registry.parse_name(args.model)
        fs, root = registry.open_registry(where)
        ref = registry.resolve(fs, root, ref)
        ref, folder = registry.fetch(str(ref), where, args.output_dir / "models" / ref.owner / ref.name / ref.version)
        pkg = package.load(folder)
        config = apply_config(args.bids_dir, args.output_dir, pkg, str(ref), args.participant_label, args.methods)
    config_file = args.output_dir / "config.yaml"
    atomic.write_text(config_file, yaml.safe_dump(config, sort_keys=False))
    print(f"applying {ref} ({folder}) to {args.bids_dir}; config {config_file}", file=sys.stderr)
    sys.exit(run_workflow(config_file, args.output_dir, args.cores, args.snakemake_args))


if __name__ == "__main__":
    main()
