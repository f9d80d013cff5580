"""The preprocessed images as a BIDS-Derivatives dataset: its ``dataset_description.json``, its
``.bidsignore`` and the BIDS URIs its sidecars name their sources by.

Standard library only. ``results/derivatives/pipeline`` (with config ``work_dir``, both the work
folder's and the one published from it, ``pipeline.intake.publish``) passes ``bids-validator-deno``
with no error (``tests/test_workflow.py``, ``tests/test_bidsapp.py``): a
description with ``DatasetType: derivative``, ``GeneratedBy`` this package and its version, and
``SourceDatasets`` and ``DatasetLinks`` naming the raw dataset (``raw``), so that ``Sources`` read
``bids:raw:sub-01/anat/sub-01_T1w.nii.gz``. The files BIDS has no place for yet (the ``.npy``
arrays the loader reads, the QC PNGs, the ANTs ``.mat`` transforms and preprocessing's exclusion
records) stay where they are and are declared in ``.bidsignore`` (``IGNORED``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import __version__
from pipeline.common import atomic

NAME = "bids-deepstudy"  # the distribution (pyproject.toml), as GeneratedBy names it
RAW = "raw"  # the DatasetLinks key of the input dataset
# Files of the derivatives tree that BIDS does not describe (yet), as .bidsignore patterns.
IGNORED = (
    "*.npy",  # the (C, X, Y, Z) float32 arrays the loader memory-maps
    "*.png",  # preprocessing's QC figure (bids-validator-deno 3.0.2 does not honour "*_desc-qc_*.png")
    "*_xfm.mat",  # ANTs affine transforms (BIDS transforms, BEP014, are not in the specification yet)
    "*_desc-preproc_excluded.tsv",  # preprocessing's exclusion record of each sample
)


def bids_uri(path: str | os.PathLike, raw_dir: str | os.PathLike, key: str = RAW) -> str:
    """``path`` inside the dataset ``raw_dir`` as a BIDS URI, ``bids:raw:sub-01/anat/…`` (``key``:
    its DatasetLinks key); a path outside it as an absolute ``file://`` URI (BIDS allows any URI there)."""
    path, root = Path(path).resolve(), Path(raw_dir).resolve()
    try:
        relative = path.relative_to(root)
    except ValueError:
        return path.as_uri()
    return f"bids:{key}:{relative.as_posix()}"


PREPROCESSING = "Registration to MNI152NLin2009aSym and intensity normalisation (the Steps of each sidecar)"


def dataset_description(raw_dir: str | os.PathLike, name: str = "Preprocessed images", what: str = PREPROCESSING,
                        links: dict[str, str | os.PathLike] | None = None) -> dict:
    """The ``dataset_description.json`` of a derivatives folder made from the raw dataset ``raw_dir``
    (and from the datasets ``links``: {DatasetLinks key: folder}, e.g. the preprocessed images):
    ``GeneratedBy`` this package doing ``what``; ``SourceDatasets`` and ``DatasetLinks`` name each
    source by its ``file://`` URI, so that sidecars' ``Sources`` can read ``bids:<key>:sub-…``."""
    sources = {RAW: raw_dir, **(links or {})}
    uris = {key: Path(folder).resolve().as_uri() for key, folder in sources.items()}
    return {
        "Name": name,
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": NAME, "Version": __version__, "Description": what}],
        "SourceDatasets": [{"URL": uri} for uri in uris.values()],
        "DatasetLinks": uris,
    }


def write_dataset_files(root: str | os.PathLike, raw_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``root``'s ``dataset_description.json`` and ``.bidsignore``; return their paths."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {"description": root / "dataset_description.json", "bidsignore": root / ".bidsignore"}
    atomic.write_text(paths["description"], json.dumps(dataset_description(raw_dir), indent=2) + "\n")
    atomic.write_text(paths["bidsignore"], "".join(f"{pattern}\n" for pattern in IGNORED))
    return paths
