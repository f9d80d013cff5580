"""Brain extraction before registration: accuracy and time of each method on the demo phantoms.

    python benchmarks/brain_extraction.py DEMO_DIR [--methods none deepbet brainextractor]
        [--resolution 4] [--n4] [--threads 2] [--out results.tsv]

DEMO_DIR is a cohort of ``python -m pipeline.demo`` (brain-only, or ``--whole-head``); its ground
truth gives each image's true brain on its own grid (``*_desc-brain_mask.nii.gz`` for whole-head
cohorts, the tissue labels > 0 otherwise). Per image and method:

* ``none`` and ``deepbet``: the whole preprocessing chain (``pipeline.intake.preprocess``) onto the
  study grid; the brain mask it writes (for ``none``: the template's, carried back through the
  registration, i.e. a template-based ANTs mask) against the truth, the seconds of the chain and
  its QC ``correlation_with_template``;
* ``brainextractor`` (FSL BET re-implemented in Python; not a dependency: install it apart, e.g.
  ``pip install --target DIR brainextractor trimesh pyrender`` and ``PYTHONPATH=DIR``): the mask
  alone, against the truth, and its seconds.

Dice, recall (the share of the true brain kept) and precision, one row per image and method, then
the median per method.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from pipeline.intake.brainmask import dice

SHAPES = {8.0: (20, 24, 20), 4.0: (40, 48, 40), 2.0: (80, 96, 80)}


def truth_of(image: Path, root: Path) -> np.ndarray:
    """The true brain of a demo image, on its grid."""
    stem, subdir = image.name.split("_T1w")[0], image.parent.relative_to(root)
    mask = root / "derivatives" / "groundtruth" / subdir / f"{stem}_desc-brain_mask.nii.gz"
    if not mask.exists():
        mask = root / "derivatives" / "tissue" / subdir / f"{stem}_desc-tissue_dseg.nii.gz"
    return np.asarray(nib.load(mask).dataobj) > 0


def bet_mask(image: Path) -> np.ndarray:
    """brainextractor's mask (its defaults) on the image's grid."""
    from brainextractor import BrainExtractor

    img = nib.load(str(image))
    extractor = BrainExtractor(img=nib.Nifti1Image(img.get_fdata(dtype=np.float32), img.affine))
    extractor.run()
    with tempfile.TemporaryDirectory() as tmp:
        extractor.save_mask(f"{tmp}/mask.nii.gz")
        return np.asarray(nib.load(f"{tmp}/mask.nii.gz").dataobj) > 0


def measure(image: Path, root: Path, method: str, grid: tuple[Path, Path], settings: dict, threads: int,
            work: Path) -> dict:
    """One image's row for ``method``."""
    from pipeline.common.paths import derivative_paths
    from pipeline.intake.preprocess import preprocess

    truth = truth_of(image, root)
    start, qc = time.perf_counter(), {}
    if method == "brainextractor":
        mask = bet_mask(image)
    else:
        out = derivative_paths(work / method, "sub-x", image.name.split("_T1w")[0])
        qc = preprocess([image], *grid, out, settings={**settings, "brain_extraction": method}, threads=threads)["QC"]
        mask = np.asarray(nib.load(out["brain_mask"]).dataobj) > 0
    seconds = time.perf_counter() - start
    kept = int((mask & truth).sum())
    return {"image": image.name, "method": method, "seconds": round(seconds, 1), "dice": round(dice(mask, truth), 4),
            "recall": round(kept / max(int(truth.sum()), 1), 4), "precision": round(kept / max(int(mask.sum()), 1), 4),
            "correlation_with_template": qc.get("correlation_with_template")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo", type=Path)
    parser.add_argument("--methods", nargs="+", default=["none", "deepbet"])
    parser.add_argument("--resolution", type=float, default=4.0, choices=sorted(SHAPES))
    parser.add_argument("--n4", action="store_true", help="run N4 (the default config does; slow on 1 mm heads)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    from pipeline.intake.grid import write_grid

    images = sorted(args.demo.glob("sub-*/**/anat/*_T1w.nii*"))
    settings = {"resolution": args.resolution, "shape": list(SHAPES[args.resolution]), "n4": args.n4}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        grid = (Path(tmp) / "template.nii.gz", Path(tmp) / "mask.nii.gz")
        write_grid(args.resolution, SHAPES[args.resolution], *grid)
        for image in images:
            for method in args.methods:
                rows.append(measure(image, args.demo, method, grid, settings, args.threads, Path(tmp)))
                print("\t".join(str(v) for v in rows[-1].values()), file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, sep="\t", index=False)
    summary = table.groupby("method")[["seconds", "dice", "recall", "precision", "correlation_with_template"]]
    print(summary.median().round(3).to_string())
    print("minimum:\n" + summary.min().round(3).to_string())


if __name__ == "__main__":
    main()
