"""What the workflow's rules read while Snakemake plans the jobs: their input and param functions.

``workflow/rules/common.smk`` binds these to the study's config and to the ``ingest`` checkpoint in
one-line functions (``source_images(wildcards)`` …); the work is done here, where it can be read and
tested without Snakemake. None of it runs in a job: no job's code fingerprint holds this module.

* ``code``: a rule's code input, the fingerprint file of the module its command runs;
* ``ingest_tables``, ``dataset_fingerprint``: what ingestion reads besides the images (an edit of a
  table, or a file added or removed, reruns it);
* ``read_manifest`` and the per-sample lookups (``source_images``, ``preprocessed``,
  ``exclusion_records``, ``preproc_root``): the ingest checkpoint's manifest, one row per sample,
  turned into paths;
* ``package_spec``: apply mode's package, read and checked against the config's recipe at parse time;
* ``parent_of``, ``parents_of``: params that are the folders of a rule's outputs or inputs.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pandas as pd

from pipeline.common.codegraph import fingerprint_file
from pipeline.common.fingerprint import tree_fingerprint
from pipeline.common.package import RECIPE as RECIPE_FILE
from pipeline.common.package import SPEC as SPEC_FILE
from pipeline.common.paths import exclusion_record
from pipeline.common.paths import preprocessed as preprocessed_paths
from pipeline.intake import recipe

CODE_FINGERPRINTS = Path(".snakemake") / "pipeline-code"  # in the folder Snakemake runs in


def code(module: str, folder: Path = CODE_FINGERPRINTS) -> str:
    """The fingerprint file of the code ``python -m pipeline.<module>`` runs (``module``:
    ``intake.ingest``): that module and every package module it imports, docstrings and comments
    left out (``pipeline.common.codegraph``). Listed as an input: editing that code reruns the jobs
    that run it; editing a docstring or comment does not."""
    return str(fingerprint_file(f"pipeline.{module}", folder))


def ingest_tables(bids_dir: str, non_bids: dict | None, target_source: str) -> list[str]:
    """The tables ingest reads: ``participants.tsv`` (or ``non_bids.table``; an absolute path
    replaces ``bids_dir``) and, with ``target_source: sessions``, every ``sub-*_sessions.tsv``.
    Absent ones are left out: ingest's own error names them."""
    root = Path(bids_dir)
    if non_bids:
        tables = [root / non_bids["table"]]
    else:
        tables = [root / "participants.tsv"]
        if target_source == "sessions":
            tables += sorted(root.glob("sub-*/sub-*_sessions.tsv"))
    return [str(t) for t in tables if t.exists()]


def dataset_fingerprint(bids_dir: str, derivatives: list[str]) -> str:
    """The listing fingerprint of the dataset and of each ``derivatives`` folder under it (the
    label images', the brain masks'): names and sizes, not times; a missing folder counts as empty."""
    roots = [Path(bids_dir), *(Path(bids_dir) / d for d in derivatives)]
    return ":".join(tree_fingerprint(r, mtimes=False) if r.is_dir() else "" for r in roots)


@functools.lru_cache
def _read_manifest(path: str, mtime: int) -> pd.DataFrame:
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False).set_index("image_id", drop=False)


def read_manifest(path: str) -> pd.DataFrame:
    """Ingest's ``manifest.tsv`` (one row per sample, every column a string), indexed by
    ``image_id``; read once per version of the file, however many input functions ask."""
    return _read_manifest(str(path), Path(path).stat().st_mtime_ns)


def source_images(rows: pd.DataFrame, image: str, channels: list[str]) -> list[str]:
    """The native images of sample ``image``, one per channel (the reference first)."""
    if image not in rows.index:
        raise ValueError(f"image {image} is not in the manifest")
    row = rows.loc[image]
    return [row["path"], *(row[f"path_{c}"] for c in channels[1:])]


def preprocessed(rows: pd.DataFrame, folder: str, role: str, channels: list[str], label: bool) -> list[str]:
    """The preprocessed ``role`` file (``array``, ``qc``, ``label_array`` …) of every sample of
    ``rows`` under ``folder`` (``pipeline.common.paths.preprocessed``), in the manifest's order."""
    return [preprocessed_paths(folder, s, i, channels, label)[role] for s, i in zip(rows["subdir"], rows["image_id"])]


def exclusion_records(rows: pd.DataFrame, folder: str) -> list[str]:
    """Preprocessing's exclusion record of every sample of ``rows`` under ``folder``."""
    return [exclusion_record(folder, s, i) for s, i in zip(rows["subdir"], rows["image_id"])]


def preproc_root(rows: pd.DataFrame, arrays: list[str]) -> str:
    """The derivatives folder of the preprocessed ``arrays`` (the first one's path up to its
    sample's ``sub-X[/ses-Y]/anat/``): the same in the work folder and in a published copy."""
    first, path = rows.iloc[0], arrays[0]
    return path[: path.index(f"/{first['subdir']}/anat/")]


def package_spec(folder: str, study_recipe: dict) -> dict:
    """Apply mode: the ``spec.json`` of the package in ``folder``, once its ``preprocessing.json``
    is known to be one this pipeline makes and the one ``study_recipe`` (the config's) describes;
    ValueError naming the package and each difference otherwise."""
    try:
        spec, package_recipe = (json.loads((Path(folder) / name).read_text()) for name in (SPEC_FILE, RECIPE_FILE))
    except (OSError, ValueError) as exc:
        raise ValueError(f"apply.package {folder} is not a readable model package ({exc}); fetch one with "
                         "bids-deepstudy fetch, or run bids-deepstudy apply.") from exc
    refusals = recipe.unproducible(package_recipe)
    if refusals:
        raise ValueError(f"apply.package {folder} expects input this pipeline's preprocessing cannot make: "
                         f"{'; '.join(refusals)}.")
    differences = recipe.mismatches(package_recipe, study_recipe)
    if differences:
        raise ValueError(f"config `preprocess`/`channels` differ from the recipe of apply.package {folder}: "
                         f"{'; '.join(differences)}. Use the package's (bids-deepstudy apply writes them).")
    return spec


def parent_of(name: str):
    """Param function: the folder of output ``name`` (of its first file, for a list)."""
    return lambda wildcards, output: str(Path(output[name] if isinstance(output[name], str) else output[name][0]).parent)


def parents_of(name: str):
    """Param function: the folders of the files of input ``name``, in order, each once."""
    return lambda wildcards, input: list(dict.fromkeys(str(Path(path).parent) for path in input[name]))
