"""Explanation maps of the test images, per fold and across folds, in template and native space.

``fold``: per test image, occlusion sensitivity (captum's definition: the mean output drop over
the windows covering a voxel when the window is set to the baseline 0, the brain mean of the
z-scored image) and gradient saliency (captum ``Saliency``: |d output / d input|, summed over
channels), each saved as ``…_space-MNI152NLin2009aSym_desc-<method>_saliency.nii.gz`` on the
study grid and as ``…_space-<reference>_desc-<method>_saliency.nii.gz`` on the subject's native
grid (inverse preprocessing transform); the fold's group map is the voxel-wise mean |attribution|.
``group``: the mean of the folds' group maps, with glass-brain and slice PNGs (nilearn).
The attributed output is the prediction (regression) or the predicted class's logit.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from captum.attr import Saliency

from pipeline.data import load_batch, study_table
from pipeline.errors import InputError
from pipeline.paths import explanation_maps, group_map
from pipeline.preprocess import derivative_paths, to_native
from pipeline.train import load_model

METHODS = ("occlusion", "gradient")


def target_index(model, x: torch.Tensor, task: str) -> int:
    """Output to attribute: 0 for regression, the predicted class for classification."""
    if task != "classification":
        return 0
    with torch.no_grad():
        return int(model(x).argmax(1))


def window_starts(size: int, window: int, stride: int) -> range:
    """Start voxels of the occlusion windows along one axis, as captum places them: every
    ``stride`` from 0 until a window reaches the end (the last one may be cut by the edge)."""
    if window > size:
        raise InputError(f"The occlusion window ({window} voxels) is larger than the image axis ({size}); "
                         "lower `explain.window` in config.")
    return range(0, math.ceil((size - window) / stride) * stride + 1, stride)


@torch.no_grad()
def occlusion(model, x: torch.Tensor, target: int, window: int, stride: int, batch: int = 64,
              baseline: float = 0.0) -> np.ndarray:
    """(X, Y, Z) occlusion attribution of one (1, C, X, Y, Z) image, equal to captum's ``Occlusion``
    with a (C, window, window, window) sliding window, ``stride`` and ``baseline``.

    A window whose voxels all equal the baseline already (outside the brain) leaves the input
    unchanged, so its output drop is exactly zero: it is counted but not evaluated.
    """
    shape = x.shape[2:]
    reference = model(x)[0, target]
    attribution = torch.zeros(shape, dtype=torch.float64)
    counts = torch.zeros(shape, dtype=torch.float64)
    informative = []
    for corner in itertools.product(*(window_starts(n, window, stride) for n in shape)):
        box = tuple(slice(c, c + window) for c in corner)
        counts[box] += 1
        if (x[(0, slice(None), *box)] != baseline).any():
            informative.append(box)
    for start in range(0, len(informative), batch):
        boxes = informative[start:start + batch]
        occluded = x.repeat(len(boxes), 1, 1, 1, 1)
        for j, box in enumerate(boxes):
            occluded[(j, slice(None), *box)] = baseline
        drops = reference - model(occluded)[:, target]
        for drop, box in zip(drops.double(), boxes):
            attribution[box] += drop
    return (attribution / counts).float().numpy()


def saliency(model, x: torch.Tensor, target: int) -> np.ndarray:
    """(X, Y, Z) absolute input gradient of one (1, C, X, Y, Z) image, summed over channels."""
    grads = Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    return grads[0].sum(0).detach().numpy()


def top_fraction_enrichment(attribution: np.ndarray, region: np.ndarray, brain: np.ndarray, top: float = 0.05) -> float:
    """How many times more of the top ``top`` fraction of |attribution| in ``brain`` lies in ``region`` than chance."""
    values = np.abs(attribution[brain])
    cutoff = np.quantile(values, 1 - top)
    hits = region[brain][values >= cutoff].mean()
    chance = region[brain].mean()
    return float(hits / chance)


def explain_fold(table: pd.DataFrame, model_path: Path, grid_mask: Path, preproc_dir: Path, out_dir: Path,
                 window: int, stride: int, channels: list[str]) -> pd.DataFrame:
    """Write every test image's maps and the fold's group maps; return the index of written maps."""
    model, coder, _ = load_model(model_path)
    affine = nib.load(str(grid_mask)).affine
    test = table[table["split"] == "test"]
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    sums = {m: 0.0 for m in METHODS}
    rows = []
    for i, row in enumerate(test.itertuples(index=False), 1):
        x = load_batch([row.array])
        target = target_index(model, x, coder.task)
        maps = {"occlusion": occlusion(model, x, target, window, stride), "gradient": saliency(model, x, target)}
        inverse = derivative_paths(preproc_dir, row.subdir, row.image_id, channels)["inverse"]
        for method, data in maps.items():
            paths = explanation_maps(str(out_dir / "maps"), row.subdir, row.image_id, method, channels[0])
            Path(paths["template"]).parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(data.astype(np.float32), affine)
            nib.save(img, paths["template"])
            nib.save(to_native(img, Path(row.path), inverse), paths["native"])
            sums[method] = sums[method] + np.abs(data)
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "method": method,
                         "target_index": target, **paths})
        print(f"[{i}/{len(test)}] {row.image_id}", file=sys.stderr)
    for method in METHODS:
        nib.save(nib.Nifti1Image((sums[method] / len(test)).astype(np.float32), affine), group_map(str(out_dir), method))
    index = pd.DataFrame(rows)
    index.to_csv(out_dir / "maps.tsv", sep="\t", index=False)
    return index


def combine_folds(fold_dirs: list[Path], out_dir: Path) -> dict[str, Path]:
    """Mean over folds of each method's group map (all folds explain the same test images)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for method in METHODS:
        images = [nib.load(group_map(str(d), method)) for d in fold_dirs]
        mean = np.mean([np.asarray(img.dataobj, dtype=np.float32) for img in images], axis=0)
        written[method] = Path(group_map(str(out_dir), method))
        nib.save(nib.Nifti1Image(mean.astype(np.float32), images[0].affine), written[method])
    return written


def plot_group(out_dir: Path, template: Path, n_folds: int) -> None:
    """Glass-brain and orthogonal-slice PNGs of each group map over the study template."""
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    for method in METHODS:
        img = group_map(str(out_dir), method)
        vmax = float(np.quantile(nib.load(img).get_fdata(), 0.999))
        title = f"mean |{method}| attribution, test set, {n_folds} fold(s)"
        display = plotting.plot_stat_map(img, bg_img=str(template), title=title, threshold=vmax * 0.3,
                                         vmax=vmax, cmap="inferno", cut_coords=(0, -17, 15), draw_cross=False)
        display.savefig(str(out_dir / f"group_desc-{method}_slices.png"), dpi=90)
        display.close()
        display = plotting.plot_glass_brain(img, title=title, threshold=vmax * 0.3, vmax=vmax, cmap="inferno")
        display.savefig(str(out_dir / f"group_desc-{method}_glass.png"), dpi=90)
        display.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    fold = commands.add_parser("fold", help="maps of the test images by one fold's model")
    fold.add_argument("--manifest", type=Path, required=True)
    fold.add_argument("--splits", type=Path, required=True)
    fold.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    fold.add_argument("--channels", nargs="+", default=["T1w"])
    fold.add_argument("--preproc-dir", type=Path, required=True)
    fold.add_argument("--model", type=Path, required=True)
    fold.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    fold.add_argument("--window", type=int, default=8, help="occlusion window, voxels")
    fold.add_argument("--stride", type=int, default=4, help="occlusion stride, voxels")
    fold.add_argument("--out-dir", type=Path, required=True)
    fold.add_argument("--threads", type=int, default=1)
    group = commands.add_parser("group", help="mean of the folds' group maps, with PNGs")
    group.add_argument("fold_dirs", type=Path, nargs="+")
    group.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    group.add_argument("--out-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        if args.command == "fold":
            torch.set_num_threads(args.threads)
            table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, args.channels)
            explain_fold(table, args.model, args.mask, args.preproc_dir, args.out_dir, args.window, args.stride,
                         args.channels)
        else:
            combine_folds(args.fold_dirs, args.out_dir)
            plot_group(args.out_dir, args.template, len(args.fold_dirs))


if __name__ == "__main__":
    main()
