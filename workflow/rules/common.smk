import functools
import json
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate


validate(config, schema="../schemas/config.schema.yaml")

RESULTS = config["results_dir"]
BIDS = config["bids_dir"]
PREPROC = f"{RESULTS}/derivatives/pipeline"
GRID = f"{RESULTS}/grid"
SPACE = "MNI152NLin2009aSym"
SRC = Path(workflow.basedir).parent / "src" / "pipeline"

# Jobs run `python -m pipeline.<stage>` with the python on PATH (the activated venv or the rule's
# conda environment); this checkout's package is put first on its import path.
shell.prefix(f"export PYTHONPATH={SRC.parent}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; ")
sys.path.insert(0, str(SRC.parent))
from pipeline.fingerprint import tree_fingerprint
from pipeline.snakemake_compat import fix_group_components

# Cluster profiles batch preprocessing with --group-components; Snakemake 9 needs a fix for that
# in a workflow with a checkpoint (see pipeline/snakemake_compat.py).
fix_group_components()


def source(*modules):
    """Source files of the package modules a job runs; listed as inputs, editing them reruns the job."""
    return [str(SRC / f"{m}.py") for m in modules]


@functools.lru_cache
def _read_manifest(path, mtime):
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)


def manifest():
    """The ingest checkpoint's manifest (one row per image)."""
    path = checkpoints.ingest.get().output.manifest
    return _read_manifest(path, Path(path).stat().st_mtime_ns)


def source_image(wildcards):
    """Native T1w path of one image id, looked up in the manifest."""
    rows = manifest()
    match = rows.loc[rows["image_id"] == wildcards.image, "path"]
    if match.empty:
        raise ValueError(f"image {wildcards.image} is not in the manifest")
    return match.iloc[0]


def preprocessed(kind):
    """Input function: the preprocessed ``kind`` file of every image in the manifest."""
    names = {"array": "desc-preproc_T1w.npy", "qc": "desc-qc_T1w.png"}

    def paths(wildcards):
        rows = manifest()
        return [
            f"{PREPROC}/{s}/anat/{i}_space-{SPACE}_{names[kind]}"
            for s, i in zip(rows["subdir"], rows["image_id"])
        ]

    return paths


def preproc_root(wildcards, input):
    """The derivatives root, recovered from the first preprocessed array of the manifest."""
    first = manifest().iloc[0]
    path = input.arrays[0]
    return path[: path.index(f"/{first['subdir']}/anat/")]


def parent_of(name):
    """Param function: the folder of output ``name``."""
    return lambda wildcards, output: str(Path(output[name]).parent)
