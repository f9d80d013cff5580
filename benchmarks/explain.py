"""Occlusion sensitivity per subject: this pipeline's stage vs captum vs MONAI vs the bare forward passes.

One image of the demo's default study grid (the MNI152 template at 4 mm, 40 x 48 x 40 voxels,
z-scored inside the brain mask, 0 outside, as preprocessing writes it), the default network
(``simple_cnn``), occlusion windows of 8 voxels every 4 (the demo's stride; its window is now 6,
which evaluates as many windows per image), one run, side by side:

* **pipeline**: ``pipeline.results.attribution.occlusion`` (equal to captum's map; windows that cannot
  change the input are counted but not evaluated);
* **captum**: ``captum.attr.Occlusion`` with the same windows, ``perturbations_per_eval`` tuned
  (the best of several is reported);
* **MONAI**: ``monai.visualize.OcclusionSensitivity`` with 8-voxel masks at 50 % overlap (stride 4),
  constant 0 replacement, no activation;
* **forward only**: as many forward passes as captum evaluates windows, in batches of 64: the cost
  floor of any occlusion that evaluates every window.

Usage: ``python benchmarks/explain.py [--threads 2] [--repeats 3]``; prints a Markdown table (median
of the repeats). On a CUDA machine everything runs on the GPU, and a mixed-precision row is added.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch

from pipeline.results.attribution import occlusion, window_starts
from pipeline.learning.models import build_model
from pipeline.intake.template import brain_mask_on_grid, template_on_grid

RESOLUTION, SHAPE, WINDOW, STRIDE = 4.0, (40, 48, 40), 8, 4


def subject_image(device: torch.device) -> torch.Tensor:
    """(1, 1, X, Y, Z) z-scored template on the study grid, 0 outside the brain."""
    data = template_on_grid(RESOLUTION, SHAPE).get_fdata()
    brain = brain_mask_on_grid(RESOLUTION, SHAPE).get_fdata() > 0
    z = np.where(brain, (data - data[brain].mean()) / data[brain].std(), 0.0)
    return torch.from_numpy(z.astype(np.float32))[None, None].to(device)


def timed(function, repeats: int) -> float:
    """Median wall time of ``function()`` over ``repeats`` runs (after one warm-up), seconds."""
    function()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 1).to(device).eval()
    x = subject_image(device)
    windows = math.prod(len(window_starts(n, WINDOW, STRIDE)) for n in SHAPE)
    informative = sum(bool((x[0, 0, a:a + WINDOW, b:b + WINDOW, c:c + WINDOW] != 0).any())
                      for a in window_starts(SHAPE[0], WINDOW, STRIDE)
                      for b in window_starts(SHAPE[1], WINDOW, STRIDE)
                      for c in window_starts(SHAPE[2], WINDOW, STRIDE))

    from captum.attr import Occlusion
    from monai.visualize import OcclusionSensitivity

    def forward_only():
        with torch.no_grad():
            for start in range(0, windows, 64):
                model(x.expand(min(64, windows - start), -1, -1, -1, -1).contiguous())

    def captum(per_eval: int):
        return lambda: Occlusion(model).attribute(x, sliding_window_shapes=(1, WINDOW, WINDOW, WINDOW),
                                                  strides=(1, STRIDE, STRIDE, STRIDE), baselines=0.0, target=0,
                                                  perturbations_per_eval=per_eval)

    monai = OcclusionSensitivity(model, mask_size=WINDOW, n_batch=64, mode=0.0, overlap=0.5, activate=False,
                                 verbose=False)
    rows = {"forward only (captum's window count)": timed(forward_only, args.repeats),
            "pipeline occlusion": timed(lambda: occlusion(model, x, 0, WINDOW, STRIDE, batch=64), args.repeats)}
    captum_times = {n: timed(captum(n), args.repeats) for n in (16, 64, 128)}
    best = min(captum_times, key=captum_times.get)
    rows[f"captum Occlusion (perturbations_per_eval={best})"] = captum_times[best]
    with torch.no_grad():
        rows["MONAI OcclusionSensitivity"] = timed(lambda: monai(x), args.repeats)
    if device.type == "cuda":
        def mixed():
            with torch.autocast("cuda", dtype=torch.float16):
                occlusion(model, x, 0, WINDOW, STRIDE, batch=256)
        rows["pipeline occlusion, float16 autocast, batches of 256"] = timed(mixed, args.repeats)

    floor = rows["forward only (captum's window count)"]
    print(f"{device.type}, {args.threads} threads; grid {SHAPE} at {RESOLUTION:g} mm, window {WINDOW}, "
          f"stride {STRIDE}: {windows} windows, {informative} touch the brain; median of {args.repeats}\n")
    print("| method | seconds per subject | × forward only |\n|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} | {seconds / floor:.2f} |")
    print("\ncaptum perturbations_per_eval: " + ", ".join(f"{n}: {t:.2f} s" for n, t in captum_times.items()))


if __name__ == "__main__":
    main()
