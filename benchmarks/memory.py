"""Peak memory of training and explanation against cohort size: it should follow the batch, not N.

    python benchmarks/memory.py [--sizes 200 2000] [--shape 32 32 32] [--batch 8] [--stages ...] [--linear-mb 2000]

For each size N, writes N synthetic (1, X, Y, Z) float32 volumes into a temporary folder in the
preprocessed cache format (``.npy``, what ``pipeline.learning.loader.ArrayLoader`` memory-maps), then runs,
each in a fresh Python process (one run):

* **import**: the child imports ``pipeline.learning.train`` and ``pipeline.results.explain`` and stops: the floor;
* **train**: ``pipeline.learning.train.train`` for one epoch (``simple_cnn``, batch ``--batch``, one
  thread; 80 % train, 20 % validation), writing checkpoints, ``history.tsv`` and ``model.pt``;
* **explain**: the fold's mean training image (integrated gradients' baseline), then the
  ``gradient`` map of **every** one of the N images with the trained model, each written as a
  template-space NIfTI and added to the group statistics (mean, sd, t), which are written at the
  end: ``pipeline.results.explain.explain_fold`` without the native-space maps (those need ANTs transforms);
* **group**: what the group step over folds (``python -m pipeline.results.explain group``) does with those
  maps, given as two folds' ``maps.tsv``: the fold-mean map of every image through
  ``pipeline.results.maps.FoldMeanMaps`` into the group statistics, then a second pass over them (the
  validation table's per-subject enrichment); and **group, maps held**: the same with every
  fold-mean map kept in a dict first, as the group step did before ``FoldMeanMaps``;
* **linear**: the fold's linear baseline, ``pipeline.results.linear.run`` (ridge on every voxel of the
  images, 70 % train, 20 % validation, 10 % test), with ``--linear-mb`` as its memory budget: the
  block size it chose is printed beside its peak.

Peak RSS is the child's ``ru_maxrss`` from ``os.wait4``. Memory-mapped file pages a process has
read count in its RSS, so a loader that maps every image and keeps the mappings shows the cohort
in this figure. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_cache(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> Path:
    """``n`` volumes ``img0000.npy`` … and ``table.tsv`` (image_id, split, array, age)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        path = folder / f"img{i:05d}.npy"
        np.save(path, rng.normal(size=(1, *shape)).astype(np.float32))
        split = "val" if i % 5 == 0 else "test" if i % 10 == 1 else "train"
        rows.append({"image_id": f"img{i:05d}", "participant_id": f"sub-{i:05d}", "session": "", "subdir": "",
                     "split": split, "array": str(path), "age": float(rng.uniform(20, 80))})
    table = folder / "table.tsv"
    pd.DataFrame(rows).to_csv(table, sep="\t", index=False)
    return table


def child(stage: str, table_path: Path, out_dir: Path, batch: int, linear_mb: float) -> None:
    import nibabel as nib
    import torch

    import pandas as pd

    from pipeline.common import atomic
    from pipeline.results.attribution import SIGNED, Settings, attribute
    from pipeline.common.tables import read_tsv
    from pipeline.learning.loader import load_batch, mean_training_image
    from pipeline.results.maps import FoldMeanMaps, GroupStatistics, write_statistics
    from pipeline.results.validation import top_fraction_enrichment
    from pipeline.learning.saved import load_model
    from pipeline.learning.settings import TrainSettings
    from pipeline.learning.train import train

    if stage == "import":
        return
    table = read_tsv(table_path)
    if stage == "linear":
        from pipeline.results import linear

        mask = np.ones(np.load(table["array"].iloc[0], mmap_mode="r").shape[1:], dtype=bool)
        record = linear.run(table, "fold-1", "age", "regression", mask, out_dir / "linear", memory_mb=linear_mb)
        print(f"block size {record['downsample']}, {record['features']} features, rank {record['rank']}")
        return
    if stage in ("group", "group-held"):
        paths = [str(out_dir / "maps" / f"{i}.nii.gz") for i in table["image_id"]]
        index = pd.DataFrame({"image_id": table["image_id"], "method": "gradient", "template": paths, "native": paths})
        folds = [out_dir / "fold-1", out_dir / "fold-2"]
        for fold in folds:
            fold.mkdir(exist_ok=True)
            atomic.to_csv(index, fold / "maps.tsv", sep="\t", index=False)
        maps = FoldMeanMaps(folds, "gradient", "template")
        if stage == "group-held":
            maps = dict(maps)
        group = GroupStatistics(SIGNED["gradient"])
        for img in maps.values():
            group.add(np.asarray(img.dataobj))
        write_statistics(group, np.eye(4), out_dir, "gradient")
        top = group.result()["mean"] > 0
        brain = np.ones_like(top)
        np.mean([top_fraction_enrichment(img.get_fdata(), top, brain) for img in maps.values()])
        return
    if stage == "train":
        settings = TrainSettings.of({"epochs": 1, "batch_size": batch, "seed": 0})
        train(table, "age", "regression", settings, out_dir, threads=1)
        return
    torch.set_num_threads(1)
    model, coder, _ = load_model(out_dir / "model.pt")
    baseline = mean_training_image(table)  # noqa: F841 - computed as explain_fold does (IG's baseline)
    group = GroupStatistics(SIGNED["gradient"])
    (out_dir / "maps").mkdir(exist_ok=True)
    for row in table.itertuples(index=False):
        maps, _ = attribute(model, load_batch([row.array]), 0, ["gradient"], Settings.of({}), classification=False)
        atomic.nib_save(nib.Nifti1Image(maps["gradient"], np.eye(4)), out_dir / "maps" / f"{row.image_id}.nii.gz")
        group.add(maps["gradient"])
    write_statistics(group, np.eye(4), out_dir, "gradient")


STAGES = {"import": "import", "train": "train 1 epoch", "explain": "explain all", "group": "group",
          "group-held": "group, maps held", "linear": "linear baseline"}


def peak_rss_mib(args: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB, seconds, the last line it printed) of one child process running this script with ``args``."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([sys.executable, __file__, *args], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stdout=log, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            log.seek(0)
            raise SystemExit(f"child {args} failed with exit code {process.returncode}:\n{log.read()[-3000:]}")
        log.seek(0)
        lines = [line for line in log.read().splitlines() if line.startswith("block size")]
    return usage.ru_maxrss / 1024, time.perf_counter() - start, lines[-1] if lines else ""  # Linux: KiB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--linear-mb", type=float, default=2000, help="the linear baseline's memory budget")
    parser.add_argument("--child", nargs=3, metavar=("STAGE", "TABLE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]), args.batch, args.linear_mb)
        return
    mib = np.prod(args.shape) * 4 / 2**20
    print(f"images {tuple(args.shape)} float32 ({mib * 1024:.0f} KiB each), batch {args.batch}, one thread, "
          f"linear baseline budget {args.linear_mb:g} MB\n")
    print("| images | cache MiB | " + " | ".join(f"{STAGES[s]} MiB | {STAGES[s]} s" for s in args.stages) + " |")
    print("|---|---|" + "---|---|" * len(args.stages))
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="memory-bench-") as tmp:
            folder = Path(tmp)
            table = write_cache(folder, n, tuple(args.shape))
            out = folder / "train"
            common = ["--batch", str(args.batch), "--linear-mb", str(args.linear_mb)]
            cells = []
            for stage in args.stages:  # explain and group read what train and explain wrote
                peak, seconds, said = peak_rss_mib(["--child", stage, str(table), str(out), *common])
                cells.append(f"{peak:.0f}{f' ({said})' if said else ''} | {seconds:.0f}")
            print(f"| {n} | {n * mib:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
