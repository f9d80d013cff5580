"""Write the study grid once: the template T1w and its brain mask at the configured resolution, or
(applying a model package) the package's own grid files, so new images meet the same grid."""

from __future__ import annotations

import argparse
from pathlib import Path


from pipeline.common import atomic
from pipeline.intake.template import brain_mask_on_grid, template_on_grid


def write_grid(resolution: float, shape: tuple[int, int, int], template_out: Path, mask_out: Path) -> None:
    """Save the template (float32, [0, 1]) and brain mask (uint8) on the ``resolution`` mm grid of ``shape``."""
    template_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.nib_save(template_on_grid(resolution, shape), template_out)
    atomic.nib_save(brain_mask_on_grid(resolution, shape), mask_out)


def copy_package_grid(folder: Path, template_out: Path, mask_out: Path) -> None:
    """Copy a verified model package's grid template and mask (``pipeline.package``)."""
    from pipeline.sharing import package

    package.verify(folder)
    template_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.copyfile(folder / package.GRID_TEMPLATE, template_out)
    atomic.copyfile(folder / package.GRID_MASK, mask_out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--resolution", type=float, help="isotropic voxel size, mm (with --shape)")
    source.add_argument("--from-package", type=Path, help="copy the grid of this model package folder")
    parser.add_argument("--shape", type=int, nargs=3, help="grid shape in voxels")
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.from_package:
        from pipeline.common.errors import InputError

        with InputError.exit_cleanly():
            copy_package_grid(args.from_package, args.template, args.mask)
    elif args.shape is None:
        parser.error("--resolution needs --shape")
    else:
        write_grid(args.resolution, tuple(args.shape), args.template, args.mask)


if __name__ == "__main__":
    main()
