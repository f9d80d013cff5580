"""Write the study grid once: the template T1w and its brain mask at the configured resolution."""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib

from pipeline.template import brain_mask_on_grid, template_on_grid


def write_grid(resolution: float, shape: tuple[int, int, int], template_out: Path, mask_out: Path) -> None:
    """Save the template (float32, [0, 1]) and brain mask (uint8) on the ``resolution`` mm grid of ``shape``."""
    template_out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(template_on_grid(resolution, shape), template_out)
    nib.save(brain_mask_on_grid(resolution, shape), mask_out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--resolution", type=float, required=True, help="isotropic voxel size, mm")
    parser.add_argument("--shape", type=int, nargs=3, required=True, help="grid shape in voxels")
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    args = parser.parse_args(argv)
    write_grid(args.resolution, tuple(args.shape), args.template, args.mask)


if __name__ == "__main__":
    main()
