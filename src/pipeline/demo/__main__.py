"""``python -m pipeline.demo``: the command line of the simulated cohort (``pipeline.demo.cohort``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import demo
from pipeline.common.errors import InputError
from pipeline.demo.cohort import make_demo
from pipeline.demo.head import WholeHead
from pipeline.demo.lesion import LESION_SITES, Lesion


def main(argv=None) -> None:
    # prog and description: those of the former module pipeline/demo.py (same usage, help and messages)
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=demo.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where to write the BIDS dataset (must be empty or absent)")
    parser.add_argument("--n-subjects", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-resolution", type=float, default=1.5,
                        help="isotropic grid (mm) on which the anatomy is simulated")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUT_DIR")
    lesion = parser.add_argument_group("patients' lesion (default: the temporal white-matter lesion)")
    lesion.add_argument("--lesion-site", choices=sorted(LESION_SITES), default="temporal-wm")
    lesion.add_argument("--lesion-radius", type=float, metavar="MM", help="nominal radius (each patient's: "
                        "x uniform(0.8, 1.2)); default: the site's (temporal-wm 10, deep-gm, thalamus and hippocampus 5)")
    lesion.add_argument("--lesion-contrast", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of the fraction of intensity lost at the core (default 0.45 0.65)")
    lesion.add_argument("--lesion-jitter", type=float, default=0.0, metavar="MM",
                        help="each patient's lesion centre moves uniform(±MM) per axis (default 0)")
    head = parser.add_argument_group("whole-head images (default: brain-only; pipeline.demo.head)")
    head.add_argument("--whole-head", action="store_true", help="CSF, skull, scalp, face, eyes and neck around "
                      "the brain, in a 176 x 256 x 256 mm field of view")
    head.add_argument("--deface", action="store_true", help="with --whole-head: zero the face")
    head.add_argument("--voxel-mm", type=float, nargs=2, metavar=("LOW", "HIGH"),
                      help="with --whole-head: each image's voxel size is uniform in this range (default 0.9 1.2)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with InputError.exit_cleanly():
        chosen = Lesion.from_options(args.lesion_site, args.lesion_radius, args.lesion_contrast, args.lesion_jitter)
        make_demo(args.out_dir, args.n_subjects, args.seed, args.sim_resolution, args.overwrite, chosen,
                  whole_head_options(args.whole_head, args.deface, args.voxel_mm))
    print(f"wrote {args.n_subjects} simulated participants to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def whole_head_options(whole_head: bool, deface: bool, voxel_mm) -> WholeHead | None:
    """The ``--whole-head`` options, or None (brain-only images); refuses the others without it."""
    if not whole_head:
        if deface or voxel_mm:
            raise InputError("--deface and --voxel-mm apply to whole-head images only; add --whole-head.")
        return None
    if voxel_mm is None:
        return WholeHead(deface)
    low, high = voxel_mm
    if not 0.5 <= low <= high <= 6:
        raise InputError(f"--voxel-mm needs 0.5 <= LOW <= HIGH <= 6 (mm), got {low} {high}.")
    return WholeHead(deface, (float(low), float(high)))


if __name__ == "__main__":
    main()
