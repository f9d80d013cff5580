"""Preprocessing of one whole-head image: each step's time with the tools called directly (the
floor), the pipeline's time for the same chain, its overhead over the floor, and a job's peak memory.

    python benchmarks/preprocess.py [--image T1W.nii.gz] [--threads 2] [--resolution 2] [--repeats 1]

Without ``--image`` a 1 mm whole-head phantom (``python -m pipeline.demo --whole-head --voxel-mm 1 1``)
is written to a temporary folder. The chain is the default recipe for real scans
(``config/study.yaml``): deepbet extraction, N4 (shrink 4), rigid-then-affine registration at 2 mm,
anti-aliased resampling onto the grid, z-score, writing.

* **floor**: deepbet, ANTs N4, ANTs registration (the two stages, the same settings), ANTs
  smoothing and resampling, nibabel/numpy writing, each timed on its own in this process;
* **pipeline**: ``pipeline.intake.preprocess.preprocess`` in this process (the same chain plus
  reorientation, scaling, the working template, masks, QC scores, sidecars and the QC PNG);
* **job**: ``python -m pipeline.intake.preprocess`` as Snakemake runs it, in a fresh process (imports
  included), with its peak resident memory.

ITK runs on one thread in all three, as in the pipeline, whose registration is reproducible only
single-threaded (``ants.config.set_ants_deterministic`` sets ITK's thread count to 1 before its
first use); ``--threads`` is deepbet's (torch). On 2 cores Snakemake runs two such jobs at once.

Prints a Markdown table (docs/benchmarks.md, *Preprocessing a whole-head image*).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def phantom(folder: Path) -> Path:
    """A 1 mm whole-head phantom image (176-ish x 256 x 256 voxels)."""
    from pipeline.demo.cohort import make_demo
    from pipeline.demo.head import WholeHead

    make_demo(folder, n_subjects=2, seed=5, sim_resolution=1.0, head=WholeHead(voxel_mm=(1.0, 1.0)))
    return sorted(folder.rglob("sub-*_T1w.nii*"))[0]


def timed(steps: dict, name: str, fn):
    start = time.perf_counter()
    result = fn()
    steps[name] = steps.get(name, 0.0) + time.perf_counter() - start
    return result


def floor(image: Path, grid: dict, working: Path, work: Path) -> dict:
    """Seconds of each step with the tools called directly, in the pipeline's order."""
    import ants
    import nibabel as nib
    import numpy as np
    import torch
    from deepbet import BrainExtraction

    ants.config.set_ants_deterministic(True, 1)  # as the pipeline: ITK on one thread (exact reruns), before its first use
    steps: dict[str, float] = {}
    img = timed(steps, "read", lambda: nib.load(str(image)))
    data = timed(steps, "read", lambda: np.asarray(img.dataobj, dtype=np.float32))
    torch.set_num_threads(int(os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"]))
    _, mask, _ = timed(steps, "brain extraction (deepbet)",
                       lambda: BrainExtraction(no_gpu=True).run(nib.Nifti1Image(data, img.affine, img.header)))
    native = timed(steps, "read", lambda: ants.image_read(str(image)))
    brain = native.new_image_like((np.asarray(mask.dataobj) > 0).astype(np.float32))  # file voxel order, both
    corrected = timed(steps, "N4 (inside the brain mask)", lambda: ants.n4_bias_field_correction(
        native, mask=brain, shrink_factor=4, convergence={"iters": [50, 50, 30], "tol": 1e-6}))
    moving = corrected * brain
    fixed, target = ants.image_read(str(grid["template"])), ants.image_read(str(working))

    def register():
        levels = {"aff_random_sampling_rate": 0.25, "aff_smoothing_sigmas": (2, 1)}
        rigid = ants.registration(fixed=target, moving=moving, type_of_transform="Rigid", aff_shrink_factors=(4, 2),
                                  aff_iterations=(100, 50), outprefix=f"{work}/floor_rigid_", **levels)
        return ants.registration(fixed=target, moving=moving, type_of_transform="Affine", aff_shrink_factors=(4, 2, 1),
                                 aff_iterations=(100, 50, 25), initial_transform=rigid["fwdtransforms"],
                                 outprefix=f"{work}/floor_affine_", aff_random_sampling_rate=0.25,
                                 aff_smoothing_sigmas=(2, 1, 0))["fwdtransforms"]

    forward = timed(steps, "registration (rigid, affine)", register)
    sigma = list(np.sqrt(np.clip(max(fixed.spacing) ** 2 - np.square(moving.spacing), 0, None)) / 2.3548)
    warped = timed(steps, "resampling (anti-aliased)", lambda: ants.apply_transforms(
        fixed, ants.smooth_image(moving, sigma, sigma_in_physical_coordinates=True), forward))
    grid_img = nib.Nifti1Image(warped.numpy(), nib.load(str(grid["template"])).affine)
    timed(steps, "writing", lambda: (nib.save(grid_img, str(work / "floor.nii.gz")),
                                     np.save(work / "floor.npy", warped.numpy()[None]),
                                     nib.save(nib.Nifti1Image(np.asarray(mask.dataobj, dtype=np.uint8), img.affine),
                                              str(work / "floor_mask.nii.gz"))))
    return steps


def pipeline_seconds(image: Path, grid: dict, settings: dict, work: Path, threads: int) -> float:
    """Seconds of ``preprocess`` (the whole chain, in this process)."""
    from pipeline.common.paths import derivative_paths
    from pipeline.intake.preprocess import preprocess

    out = derivative_paths(work / "pipeline", "sub-001", "sub-001")
    start = time.perf_counter()
    preprocess([image], grid["template"], grid["mask"], out, settings=settings, threads=threads)
    return time.perf_counter() - start


def job(image: Path, grid: dict, settings: dict, work: Path, threads: int) -> tuple[float, float]:
    """Seconds and peak resident memory (MB) of ``python -m pipeline.intake.preprocess`` in a fresh process."""
    config = json.dumps({"preprocess": settings, "channels": {"T1w": {"suffix": "T1w"}}, "on_error": "stop"})
    command = [sys.executable, "-m", "pipeline.intake.preprocess", str(image), "--config", config, "--template",
               str(grid["template"]), "--mask", str(grid["mask"]), "--out-dir", str(work / "job"), "--subdir",
               "sub-001", "--image-id", "sub-001", "--threads", str(threads)]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, help="a whole-head T1w (default: a 1 mm phantom)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=float, default=2.0, help="study grid (mm); 2: config/study.yaml")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the fastest is kept")
    args = parser.parse_args(argv)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)  # before ants is imported
    import nibabel as nib

    from pipeline.intake.grid import write_grid
    from pipeline.intake.template import template_on_grid

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        image = args.image or phantom(work / "bids")
        shape = tuple(int(round(n * 4 / args.resolution)) for n in (40, 48, 40))  # the demo's field of view
        grid = {"template": work / "tpl.nii.gz", "mask": work / "mask.nii.gz"}
        write_grid(args.resolution, shape, grid["template"], grid["mask"])
        working_mm = min(2.0, args.resolution)
        working = work / "working.nii.gz"
        nib.save(template_on_grid(working_mm, tuple(int(round(n * args.resolution / working_mm)) for n in shape)), working)
        settings = {"resolution": args.resolution, "shape": list(shape), "transform": "Affine", "n4": True,
                    "n4_shrink_factor": 4, "seed": 1, "antialias": True, "brain_extraction": "deepbet",
                    "registration_resolution": 2.0, "qc_min": None}
        jobs, floors, ours = [], [], []
        for _ in range(args.repeats):  # interleaved: a slower spell of the machine hits all three alike
            jobs.append(job(image, grid, settings, work, args.threads))
            floors.append(floor(image, grid, working, work))
            ours.append(pipeline_seconds(image, grid, settings, work, args.threads))
        job_s, peak_mb = min(jobs)
        steps, ours = min(floors, key=lambda s: sum(s.values())), min(ours)
        shape_in = nib.load(str(image)).shape
    total = sum(steps.values())
    print(f"image {shape_in} voxels, grid {args.resolution:g} mm {shape}, {args.threads} threads, "
          f"fastest of {args.repeats} interleaved runs; all runs (s): job {[round(j[0], 1) for j in jobs]}, "
          f"floor {[round(sum(f.values()), 1) for f in floors]}\n")
    print("| step | tools alone (s) |\n|---|---|")
    for name, seconds in steps.items():
        print(f"| {name} | {seconds:.1f} |")
    print(f"| **floor (sum)** | **{total:.1f}** |")
    print(f"| pipeline `preprocess()`, same process | {ours:.1f} (overhead {100 * (ours / total - 1):+.0f} %) |")
    print(f"| job `python -m pipeline.intake.preprocess`, fresh process | {job_s:.1f} (overhead {100 * (job_s / total - 1):+.0f} %), "
          f"peak {peak_mb:.0f} MB |")


if __name__ == "__main__":
    main()
