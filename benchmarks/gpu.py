"""Every stage's GPU path in one run, side by side, as a Markdown table named after the device.

    python benchmarks/gpu.py [--out gpu.md]          # a CUDA GPU; about 5 minutes on one
    python benchmarks/gpu.py --device cpu --quick    # smoke test of every part on the CPU (< 1 min)

Without a GPU (and without ``--device cpu``) it exits with status 2 and says so. Synthetic
brain-like volumes (``benchmarks/loader.py``'s) are written as ``.npy`` to a temporary folder, at
the MNI grid of 2 mm (91 × 109 × 91) and 1 mm (182 × 218 × 182); ``--quick`` uses small grids.

1. **Loader + augmentation**, images/s: ``pipeline.learning.loader.ArrayLoader`` (pinned memory,
   read-ahead thread) with ``pipeline.learning.augment`` random affine (rotation 5°, scaling 0.05,
   translation 2 voxels) + noise applied to the batch on the device, against MONAI's GPU path
   (the "fast training" recipe): ``CacheDataset`` holding every image on the device
   (``EnsureTyped(device=…)``), ``ThreadDataLoader`` and ``RandAffined`` (tensor backend, on the
   device, one image at a time) + ``RandGaussianNoised``.
2. **Training step**: ``pipeline.learning.trainer.Trainer.train_epoch`` (the training loop itself,
   ``simple_cnn``, regression) with ``train.amp`` off and on: seconds per optimisation step and
   the fraction of the epoch spent waiting for data (``data_wait``, as ``history.tsv`` has it).
   AMP has no effect on the CPU.
3. **Explanation**: seconds per image and method (``pipeline.results.attribution``, the config's
   default settings) on a 2 mm image, and how far each map moves under float16 autocast (bfloat16
   on the CPU): max |AMP − float32| / max |float32| and the Spearman correlation of |map|. Those
   numbers decide whether inference may use AMP; today it does not.

The issue's goals are checked at the end: data wait < 5 % of step time at 1 mm with AMP,
augmentation on the device ≥ 5× MONAI's GPU path, occlusion ≤ 2 s per 2 mm image.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from loader import AFFINE, NOISE, batches_of, write_volumes  # noqa: E402

from pipeline.learning.augment import Augmentation  # noqa: E402
from pipeline.learning.coder import TargetCoder  # noqa: E402
from pipeline.learning.device import synchronize  # noqa: E402
from pipeline.learning.loader import ArrayLoader  # noqa: E402
from pipeline.learning.models import build_model  # noqa: E402
from pipeline.learning.process import Process  # noqa: E402
from pipeline.learning.settings import TrainSettings  # noqa: E402
from pipeline.learning.trainer import build_trainer  # noqa: E402
from pipeline.results.attribution import METHODS, Settings, attribute  # noqa: E402

GRIDS = {"2 mm": (91, 109, 91), "1 mm": (182, 218, 182)}
QUICK_GRIDS = {"2 mm": (20, 24, 20), "1 mm": (28, 32, 28)}
GOALS = {"data_wait": 0.05, "speedup": 5.0, "occlusion": 2.0}


def device_name(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {threads} threads (torch {torch.__version__})"


def images_per_second(passes, n_images: int, device: torch.device, min_seconds: float) -> float:
    """Images/s of ``passes()`` (a fresh iterator of device batches per call), after one warm-up pass."""
    def one() -> int:
        seen = 0
        for x in passes():
            seen += x.shape[0]
        synchronize(device)
        assert seen == n_images, (seen, n_images)
        return seen
    one()
    start, seen = time.perf_counter(), 0
    while seen == 0 or time.perf_counter() - start < min_seconds:
        seen += one()
    return seen / (time.perf_counter() - start)


def ours(npy: list[str], batch: int, device: torch.device):
    """A pass maker: this project's loader, augmentation on the device."""
    cuda = device.type == "cuda"
    loader = ArrayLoader(npy, prefetch=2, pin_memory=cuda, recycle=not cuda)
    augment, generator = Augmentation(**AFFINE, noise=NOISE), torch.Generator().manual_seed(0)

    def passes():
        for _, x, _ in loader.batches(batches_of(len(npy), batch)):
            yield augment(x.to(device, non_blocking=True), generator)
    return passes


def monai_gpu(npy: list[str], batch: int, device: torch.device):
    """A pass maker: MONAI's GPU path: every image cached on the device, a thread loader, RandAffined
    (tensor backend) and noise on the device, one image at a time."""
    from monai.data import CacheDataset, ThreadDataLoader
    from monai.transforms import Compose, EnsureTyped, RandAffined, RandGaussianNoised

    transforms = Compose([  # CacheDataset caches the result of the transforms before the first random one
        EnsureTyped(keys="image", device=device, track_meta=False),
        RandAffined(keys="image", prob=1.0, rotate_range=[math.radians(AFFINE["rotation"])] * 3,
                    scale_range=[AFFINE["scaling"]] * 3, translate_range=[AFFINE["translation"]] * 3,
                    mode="bilinear", padding_mode="zeros", device=device),
        RandGaussianNoised(keys="image", prob=1.0, std=NOISE),
    ])
    dataset = CacheDataset([{"image": np.load(p)} for p in npy], transform=transforms,
                           cache_rate=1.0, num_workers=0, progress=False)
    loader = ThreadDataLoader(dataset, batch_size=batch, num_workers=0)

    def passes():
        for item in loader:
            yield item["image"]
    return passes


def loader_rows(folder: Path, grids: dict, n_images: int, batch: int, device: torch.device, seconds: float) -> list[dict]:
    rows = []
    for name, shape in grids.items():
        (folder / name.replace(" ", "")).mkdir()
        npy, _ = write_volumes(folder / name.replace(" ", ""), n_images, shape)
        here = images_per_second(ours(npy, batch, device), n_images, device, seconds)
        try:
            monai = images_per_second(monai_gpu(npy, batch, device), n_images, device, seconds)
        except ImportError as exc:
            monai = float("nan")
            print(f"MONAI not installed ({exc.name})", file=sys.stderr)
        rows.append({"grid": name, "shape": "×".join(map(str, shape)), "ours (images/s)": here,
                     "MONAI GPU path (images/s)": monai, "× MONAI": here / monai})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def training_rows(folder: Path, grids: dict, n_images: int, batches: dict, device: torch.device) -> list[dict]:
    rows = []
    for name, shape in grids.items():
        npy = sorted(str(p) for p in (folder / name.replace(" ", "")).glob("*.npy"))[:n_images]
        targets = pd.Series(np.linspace(20, 80, len(npy)))
        coder = TargetCoder.fit("regression", targets)
        for amp in (False, True):
            hyper = TrainSettings.of({"batch_size": batches[name], "amp": amp, "epochs": 2,
                                      "augmentation": {**AFFINE, "noise": NOISE}})
            torch.manual_seed(0)
            try:
                trainer = build_trainer(hyper, 1, coder, Process(device=device))
                loader = ArrayLoader(npy, prefetch=hyper.prefetch, pin_memory=device.type == "cuda",
                                     recycle=device.type != "cuda")
                generator = torch.Generator().manual_seed(0)
                y = coder.encode(targets)
                trainer.train_epoch(loader, y, hyper.batch_size, generator)  # warm-up: cuDNN's choices
                synchronize(device)
                start = time.perf_counter()
                fit = trainer.train_epoch(loader, y, hyper.batch_size, generator)
                synchronize(device)
                seconds = time.perf_counter() - start
                loader.close()
                row = {"seconds per step": seconds / max(fit["steps"], 1), "data wait": f"{fit['data_wait']:.1%}"}
            except torch.OutOfMemoryError:
                row = {"seconds per step": float("nan"), "data wait": "out of memory"}
                torch.cuda.empty_cache()
            rows.append({"grid": name, "batch": hyper.batch_size,
                         "AMP": ("on" if amp else "off") + ("" if device.type == "cuda" else " (no effect on CPU)"), **row})
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def explanation_rows(folder: Path, device: torch.device, quick: bool) -> list[dict]:
    """Seconds per 2 mm image and method; each map's change under autocast."""
    from scipy.stats import spearmanr

    npy = sorted(str(p) for p in (folder / "2mm").glob("*.npy"))
    x = torch.from_numpy(np.load(npy[0]))[None]
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 1).to(device).eval()
    settings = Settings.of({"ig_baseline": 0.0, **({"smoothgrad_samples": 4, "ig_steps": 8} if quick else {})})
    low = torch.float16 if device.type == "cuda" else torch.bfloat16
    attribute(model, x, 0, ["gradient"], settings)  # warm-up
    brain = x[0, 0].numpy() != 0
    rows = []
    for method in METHODS:
        synchronize(device)
        start = time.perf_counter()
        maps, _ = attribute(model, x, 0, [method], settings)
        synchronize(device)
        seconds = time.perf_counter() - start
        with torch.autocast(device.type, dtype=low):
            mixed, _ = attribute(model, x, 0, [method], settings)
        full, half = maps[method], mixed[method].astype(np.float32)
        scale = float(np.abs(full).max()) or 1.0
        rows.append({"method": method, "seconds per image": seconds,
                     f"max abs({str(low).split('.')[-1]} − float32) / max abs(float32)": float(np.abs(half - full).max()) / scale,
                     "Spearman of abs(map) in the brain": float(spearmanr(np.abs(full[brain]), np.abs(half[brain]))[0])})
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    table = pd.DataFrame(rows)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for values in table.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in values) + " |")
    return "\n".join(lines)


def goals(loader: list[dict], training: list[dict], explanation: list[dict]) -> list[dict]:
    fine = [r for r in training if r["grid"] == "1 mm" and r["AMP"].startswith("on")]
    wait = float(fine[0]["data wait"].rstrip("%")) / 100 if fine and fine[0]["data wait"].endswith("%") else float("nan")
    speedup = min(r["× MONAI"] for r in loader)
    occlusion = next(r["seconds per image"] for r in explanation if r["method"] == "occlusion")
    return [{"goal": "data wait at 1 mm with AMP < 5 % of step time", "measured": f"{wait:.1%}",
             "met": wait < GOALS["data_wait"]},
            {"goal": "augmentation on the device ≥ 5× MONAI's GPU path (slower grid)", "measured": f"{speedup:.1f}×",
             "met": speedup >= GOALS["speedup"]},
            {"goal": "occlusion ≤ 2 s per 2 mm image", "measured": f"{occlusion:.2f} s",
             "met": occlusion <= GOALS["occlusion"]}]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="small grids and counts: a smoke test of every part")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("gpu_benchmark.md"), help="the Markdown tables")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py measures a CUDA GPU, and this machine has none (torch.cuda.is_available() is "
              f"False, torch {torch.__version__}). Run it on a GPU machine, or smoke-test every part on the CPU "
              "with --device cpu --quick.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grids = QUICK_GRIDS if args.quick else GRIDS
    n_images, seconds = (4, 0.2) if args.quick else (32, 3.0)
    batches = {"2 mm": 2, "1 mm": 2} if args.quick else {"2 mm": 8, "1 mm": 4}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        loader = loader_rows(folder, grids, n_images, 2 if args.quick else 8, device, seconds)
        training = training_rows(folder, grids, n_images, batches, device)
        explanation = explanation_rows(folder, device, args.quick)
    name = device_name(device, args.threads)
    text = "\n\n".join([
        f"Device: {name}{' (--quick: small grids, not a measurement)' if args.quick else ''}; "
        f"{time.perf_counter() - start:.0f} s in all.",
        f"Loader + random affine + noise on the device, {n_images} images:\n\n" + markdown(loader),
        "Training step (`Trainer.train_epoch`, simple_cnn, the same augmentation):\n\n" + markdown(training),
        "Explanation of one 2 mm image (default settings), and each map under autocast:\n\n" + markdown(explanation),
        "Goals (issue #20):\n\n" + markdown(goals(loader, training, explanation)),
    ]) + "\n"
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
