"""A study's preprocessed images from the work folder to the output folder (issue #28, item 3).

``python -m pipeline.intake.publish --manifest manifest.tsv --config '{…}' --preproc-dir WORK/derivatives/pipeline
--out-dir OUTPUT_DIR/derivatives/pipeline``: with a work folder (config ``work_dir``, the BIDS-App
command's ``--work-dir``) preprocessing writes in ``WORK/derivatives/pipeline``, its arrays (``.npy``,
read by every later stage) beside its images; this writes the BIDS derivative dataset a person
reads into the output folder: ``dataset_description.json`` and ``.bidsignore``
(``pipeline.intake.derivatives``) and, for every image of the manifest, every file preprocessing
wrote but the arrays and its exclusion record: the images on the template grid and their sidecars,
the transforms, the brain mask, the label image, the QC figure. Each is a hard link to the work
folder's file where both folders are on one file system (no second copy on disk), else a copy;
an empty file (a sample preprocessing excluded) is left out. The dataset passes
``bids-validator-deno`` as the work folder's does (``tests/test_workflow.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.common import atomic
from pipeline.common.cli import add_config, channel_names
from pipeline.common.errors import InputError
from pipeline.common.paths import preprocessed
from pipeline.common.tables import read_tsv
from pipeline.intake.derivatives import write_dataset_files

KEPT_IN_WORK = ("array", "label_array")  # what only the workflow reads again


def link_or_copy(source: Path, final: Path) -> None:
    """``final`` as a hard link to ``source`` (a copy across file systems), written atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic.path(final) as tmp:
            os.link(source, tmp)
    except OSError:  # another file system, or one without hard links
        atomic.copyfile(source, final)


def publish(manifest: Path, preproc_dir: Path, out_dir: Path, channels: list[str], label: bool,
            raw_dir: Path) -> list[Path]:
    """Write ``out_dir`` (description, .bidsignore, every image's published files); return the files."""
    write_dataset_files(out_dir, raw_dir)
    written = []
    for row in read_tsv(manifest).itertuples(index=False):
        sources = preprocessed(str(preproc_dir), row.subdir, row.image_id, channels, label)
        targets = preprocessed(str(out_dir), row.subdir, row.image_id, channels, label)
        for role, source in sources.items():
            if role in KEPT_IN_WORK or not Path(source).is_file() or Path(source).stat().st_size == 0:
                continue
            link_or_copy(Path(source), Path(targets[role]))
            written.append(Path(targets[role]))
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config(parser)  # bids_dir, channels, label_image
    parser.add_argument("--manifest", type=Path, required=True, help="ingest's manifest.tsv")
    parser.add_argument("--preproc-dir", type=Path, required=True, help="the work folder's derivatives/pipeline")
    parser.add_argument("--out-dir", type=Path, required=True, help="the output folder's derivatives/pipeline")
    args = parser.parse_args(argv)
    if args.preproc_dir.resolve() == args.out_dir.resolve():
        sys.exit("--preproc-dir and --out-dir are one folder: nothing to publish (no work_dir).")
    with InputError.exit_cleanly():
        written = publish(args.manifest, args.preproc_dir, args.out_dir, channel_names(args.config),
                          bool(args.config.get("label_image")), Path(args.config["bids_dir"]))
    print(f"{len(written)} files in {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
