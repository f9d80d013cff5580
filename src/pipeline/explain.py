"""Explanation maps per test image, in template and native space, plus group maps (captum).

Per test image: occlusion sensitivity (captum ``Occlusion``, baseline 0 = the brain mean of the
z-scored image) and gradient saliency (captum ``Saliency``, |d output / d input|), each saved as
``…_space-MNI152NLin2009aSym_desc-<method>_saliency.nii.gz`` on the study grid and as
``…_space-T1w_desc-<method>_saliency.nii.gz`` on the subject's native T1w grid (inverse
preprocessing transform). Group maps: voxel-wise mean of |attribution| over test images.
The attributed output is the prediction (regression) or the predicted class's logit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from captum.attr import Occlusion, Saliency

from pipeline.data import load_batch, study_table
from pipeline.errors import InputError
from pipeline.preprocess import derivative_paths, to_native
from pipeline.template import SPACE
from pipeline.train import load_model

METHODS = ("occlusion", "gradient")


def target_index(model, x: torch.Tensor, task: str) -> int:
    """Output to attribute: 0 for regression, the predicted class for classification."""
    if task != "classification":
        return 0
    with torch.no_grad():
        return int(model(x).argmax(1))


def occlusion(model, x: torch.Tensor, target: int, window: int, stride: int, batch: int = 64) -> np.ndarray:
    """(X, Y, Z) occlusion attribution of one (1, 1, X, Y, Z) image: mean output drop over covering windows."""
    attr = Occlusion(model).attribute(x, sliding_window_shapes=(1, window, window, window),
                                      strides=(1, stride, stride, stride), baselines=0.0, target=target,
                                      perturbations_per_eval=batch)
    return attr[0, 0].detach().numpy()


def saliency(model, x: torch.Tensor, target: int) -> np.ndarray:
    """(X, Y, Z) absolute input gradient of one (1, 1, X, Y, Z) image."""
    return Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)[0, 0].detach().numpy()


def map_paths(out_dir: Path, subdir: str, image_id: str, method: str) -> dict[str, Path]:
    """Template-space and native-space map paths of one image (BIDS-derivative names)."""
    stem = Path(out_dir) / "maps" / subdir / "anat" / image_id
    return {"template": Path(f"{stem}_space-{SPACE}_desc-{method}_saliency.nii.gz"),
            "native": Path(f"{stem}_space-T1w_desc-{method}_saliency.nii.gz")}


def top_fraction_enrichment(attribution: np.ndarray, region: np.ndarray, brain: np.ndarray, top: float = 0.05) -> float:
    """How many times more of the top ``top`` fraction of |attribution| in ``brain`` lies in ``region`` than chance."""
    values = np.abs(attribution[brain])
    cutoff = np.quantile(values, 1 - top)
    hits = region[brain][values >= cutoff].mean()
    chance = region[brain].mean()
    return float(hits / chance)


def explain(table: pd.DataFrame, model_path: Path, grid_mask: Path, preproc_dir: Path, out_dir: Path,
            window: int, stride: int, native: bool = True) -> pd.DataFrame:
    """Write every test image's maps and the group maps; return the index of written maps."""
    model, coder, _ = load_model(model_path)
    (out_dir / "maps").mkdir(parents=True, exist_ok=True)
    affine = nib.load(str(grid_mask)).affine
    test = table[table["split"] == "test"]
    sums = {m: 0.0 for m in METHODS}
    rows = []
    for i, row in enumerate(test.itertuples(index=False), 1):
        x = load_batch([row.array])
        target = target_index(model, x, coder.task)
        maps = {"occlusion": occlusion(model, x, target, window, stride),
                "gradient": saliency(model, x, target)}
        inverse = derivative_paths(preproc_dir, row.subdir, row.image_id)["inverse"]
        for method, data in maps.items():
            paths = map_paths(out_dir, row.subdir, row.image_id, method)
            paths["template"].parent.mkdir(parents=True, exist_ok=True)
            img = nib.Nifti1Image(data.astype(np.float32), affine)
            nib.save(img, paths["template"])
            if native:
                nib.save(to_native(img, Path(row.path), inverse), paths["native"])
            sums[method] = sums[method] + np.abs(data)
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "method": method,
                         "target_index": target, "template": str(paths["template"]),
                         "native": str(paths["native"]) if native else ""})
        print(f"[{i}/{len(test)}] {row.image_id}", file=sys.stderr)
    for method in METHODS:
        group = (sums[method] / len(test)).astype(np.float32)
        nib.save(nib.Nifti1Image(group, affine), group_path(out_dir, method))
    index = pd.DataFrame(rows)
    index.to_csv(out_dir / "maps.tsv", sep="\t", index=False)
    return index


def group_path(out_dir: Path, method: str) -> Path:
    return Path(out_dir) / f"group_space-{SPACE}_desc-{method}_mean.nii.gz"


def plot_group(out_dir: Path, template: Path) -> None:
    """Glass-brain and orthogonal-slice PNGs of each group map over the study template."""
    import matplotlib

    matplotlib.use("Agg")
    from nilearn import plotting

    for method in METHODS:
        img = group_path(out_dir, method)
        vmax = float(np.quantile(nib.load(str(img)).get_fdata(), 0.999))
        title = f"mean |{method}| attribution, test set"
        display = plotting.plot_stat_map(str(img), bg_img=str(template), title=title, threshold=vmax * 0.3,
                                         vmax=vmax, cmap="inferno", cut_coords=(0, -17, 15), draw_cross=False)
        display.savefig(str(out_dir / f"group_desc-{method}_slices.png"), dpi=90)
        display.close()
        display = plotting.plot_glass_brain(str(img), title=title, threshold=vmax * 0.3, vmax=vmax, cmap="inferno")
        display.savefig(str(out_dir / f"group_desc-{method}_glass.png"), dpi=90)
        display.close()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    parser.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    parser.add_argument("--window", type=int, default=8, help="occlusion window, voxels")
    parser.add_argument("--stride", type=int, default=4, help="occlusion stride, voxels")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with InputError.exit_cleanly():
        table = study_table(args.manifest, args.splits, args.preproc_dir)
        explain(table, args.model, args.mask, args.preproc_dir, args.out_dir, args.window, args.stride)
    plot_group(args.out_dir, args.template)


if __name__ == "__main__":
    main()
