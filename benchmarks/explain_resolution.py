"""Seconds per image of every explanation method at the 4 mm demo grid, 2 mm and 1.5 mm, and how
far coarse-to-fine occlusion (``explain.occlusion_keep``) departs from the full map.

    python benchmarks/explain_resolution.py [--threads 2] [--grids 4 2 1.5] [--keep 0.3]
                                            [--model results/train/fold-1/model.pt --array …npy]

**Timing**: one image per grid (the MNI152 template on a grid covering the demo's field of view:
40 x 48 x 40 at 4 mm, 80 x 96 x 80 at 2 mm, 107 x 128 x 107 at 1.5 mm; z-scored in the brain,
0 outside, as preprocessing writes it) through an untrained ``simple_cnn`` of the default recipe
(time does not depend on the weights), each method with the default settings in millimetres:
occlusion windows of 24 mm every 16 mm (6 every 4 at 4 mm), full and with ``--keep``, SmoothGrad 16
samples, integrated gradients 32 steps, Grad-CAM on ``features.2``. One run each.

**Agreement** (with ``--model`` and ``--array``, e.g. the demo study's fold-1 model and one of its
test images): the trained model's full occlusion map against coarse to fine at ``--keep`` and
lower: Pearson r over the brain and the overlap (Dice) of the two maps' top 5 % of |attribution|.
Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pipeline.intake.template import brain_mask_on_grid, template_on_grid
from pipeline.learning.loader import load_batch
from pipeline.learning.models import build_model
from pipeline.learning.saved import load_model
from pipeline.results.attribution import METHODS, Settings, attribute, occlusion

FIELD_MM = (160, 192, 160)  # the demo grid's field of view (40 x 48 x 40 at 4 mm)
WINDOW_MM, STRIDE_MM = 24, 16


def subject_image(resolution: float) -> tuple[torch.Tensor, np.ndarray]:
    """(1, 1, X, Y, Z) z-scored template on the grid of ``resolution`` mm, and its brain mask."""
    shape = tuple(round(f / resolution) for f in FIELD_MM)
    data = template_on_grid(resolution, shape).get_fdata()
    brain = brain_mask_on_grid(resolution, shape).get_fdata() > 0
    z = np.where(brain, (data - data[brain].mean()) / data[brain].std(), 0.0)
    return torch.from_numpy(z.astype(np.float32))[None, None], brain


def settings_at(resolution: float) -> Settings:
    return Settings.of({"window": round(WINDOW_MM / resolution), "stride": round(STRIDE_MM / resolution)})


def timing(resolutions: list[float], keep: float, full_occlusion: list[float]) -> list[str]:
    rows = ["| grid | voxels | " + " | ".join(METHODS) + f" | occlusion, keep {keep} |", "|---" * (len(METHODS) + 3) + "|"]
    for resolution in resolutions:
        x, _ = subject_image(resolution)
        torch.manual_seed(0)
        model = build_model("simple_cnn", 1, 1, norm="batch", dropout=0).eval()
        settings = settings_at(resolution)
        seconds = []
        for method in [*METHODS, "refined"]:
            if method == "occlusion" and resolution not in full_occlusion:
                seconds.append(float("nan"))
                continue
            chosen = replace(settings, occlusion_keep=keep) if method == "refined" else settings
            start = time.perf_counter()
            attribute(model, x, 0, ["occlusion" if method == "refined" else method], chosen, torch.zeros_like(x),
                      classification=False)
            seconds.append(time.perf_counter() - start)
            print(f"{resolution} mm {method}: {seconds[-1]:.1f} s", flush=True)
        shape = "×".join(map(str, x.shape[2:]))
        rows.append(f"| {resolution:g} mm | {shape} | " + " | ".join("not run" if s != s else f"{s:.1f}" for s in seconds)
                    + " |")
    return rows


def agreement(model_path: Path, array: Path, mask: Path | None, keeps: list[float], settings: Settings) -> list[str]:
    model, _, _ = load_model(model_path)
    x = load_batch([str(array)])
    brain = np.load(array)[0] != 0 if mask is None else np.asarray(__import__("nibabel").load(mask).dataobj) > 0
    start = time.perf_counter()
    full = occlusion(model, x, 0, settings.window, settings.stride)
    full_seconds = time.perf_counter() - start
    rows = ["| occlusion | seconds | Pearson r with the full map | top-5 % overlap (Dice) |", "|---|---|---|---|",
            f"| full | {full_seconds:.1f} | 1 | 1 |"]
    top = lambda a: np.abs(a[brain]) >= np.quantile(np.abs(a[brain]), 0.95)  # noqa: E731
    for keep in keeps:
        start = time.perf_counter()
        fine = occlusion(model, x, 0, settings.window, settings.stride, keep=keep)
        seconds = time.perf_counter() - start
        r = np.corrcoef(full[brain], fine[brain])[0, 1]
        a, b = top(full), top(fine)
        rows.append(f"| keep {keep} | {seconds:.1f} | {r:.3f} | {2 * (a & b).sum() / (a.sum() + b.sum()):.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grids", type=float, nargs="*", default=[4.0, 2.0, 1.5])
    parser.add_argument("--keep", type=float, default=0.3)
    parser.add_argument("--full-occlusion", type=float, nargs="*", default=[4.0, 2.0],
                        help="grids (mm) where the full occlusion map is timed too (minutes per image below 2 mm)")
    parser.add_argument("--model", type=Path, help="a trained model.pt (agreement table)")
    parser.add_argument("--array", type=Path, help="one preprocessed .npy image on that model's grid")
    parser.add_argument("--mask", type=Path, help="the study grid's brain mask (default: the image's non-zero voxels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} thread(s)")
    if args.model and args.array:
        print("\n".join(agreement(args.model, args.array, args.mask, [round(args.keep / k, 3) for k in (1, 2, 3)],
                                  Settings.of({}))))
    if args.grids:
        print("\n".join(timing(args.grids, args.keep, args.full_occlusion)))


if __name__ == "__main__":
    main()
