"""``python -m pipeline.demo``: the command line of the simulated cohort (``pipeline.demo.cohort``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pipeline import demo
from pipeline.common.errors import InputError
from pipeline.demo.cohort import make_demo
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
                        "x uniform(0.8, 1.2)); default: the site's (temporal-wm 10, deep-gm 5)")
    lesion.add_argument("--lesion-contrast", type=float, nargs=2, metavar=("LOW", "HIGH"),
                        help="range of the fraction of intensity lost at the core (default 0.45 0.65)")
    lesion.add_argument("--lesion-jitter", type=float, default=0.0, metavar="MM",
                        help="each patient's lesion centre moves uniform(±MM) per axis (default 0)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with InputError.exit_cleanly():
        chosen = Lesion.from_options(args.lesion_site, args.lesion_radius, args.lesion_contrast, args.lesion_jitter)
        make_demo(args.out_dir, args.n_subjects, args.seed, args.sim_resolution, args.overwrite, chosen)
    print(f"wrote {args.n_subjects} simulated participants to {args.out_dir} "
          f"in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
