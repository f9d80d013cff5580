"""Write the study grid once: the template T1w and its brain mask at the configured resolution, or
(applying a model package) the package's own grid files, so new images meet the same grid."""

from __future__ import annotations

import argparse
from pathlib import Path


from pipeline.common import atomic, package
from pipeline.common.cli import add_config
from pipeline.intake.template import brain_mask_on_grid, template_on_grid


def write_grid(resolution: float, shape: tuple[int, int, int], template_out: Path, mask_out: Path) -> None:
    """Save the template (float32, [0, 1]) and brain mask (uint8) on the ``resolution`` mm grid of ``shape``."""
    template_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.nib_save(template_on_grid(resolution, shape), template_out)
    atomic.nib_save(brain_mask_on_grid(resolution, shape), mask_out)


def copy_package_grid(folder: Path, template_out: Path, mask_out: Path) -> None:
    """Copy a verified model package's grid template and mask (``pipeline.common.package``)."""
    package.verify(folder)
    template_out.parent.mkdir(parents=True, exist_ok=True)
    atomic.copyfile(folder / package.GRID_TEMPLATE, template_out)
    atomic.copyfile(folder / package.GRID_MASK, mask_out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_config(parser)  # preprocess (resolution, shape); package: a model package folder whose grid to copy, or null
    parser.add_argument("--template", type=Path, required=True)
    parser.add_argument("--mask", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.config.get("package"):  # apply mode: the package's own grid
        from pipeline.common.errors import InputError

        with InputError.exit_cleanly():
            copy_package_grid(Path(args.config["package"]), args.template, args.mask)
    else:
        grid = args.config["preprocess"]
        write_grid(float(grid["resolution"]), tuple(grid["shape"]), args.template, args.mask)


if __name__ == "__main__":
    main()
