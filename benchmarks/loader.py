"""Training data path speed: images/s of this project's loader and of its peers, one run, side by side.

    python benchmarks/loader.py [--images 64] [--batch 8] [--shape 96 112 96] [--workers 2] [--threads 2]

Writes ``--images`` synthetic (1, X, Y, Z) float32 volumes (smooth blobs + noise, z-scored) into
a temporary folder, as ``.npy`` (this project's preprocessed cache) and as uncompressed ``.nii``
(what TorchIO and nitrain read), then times passes over them in batches of ``--batch`` (as many
as fill 3 s, at least one) after one untimed warm-up pass (page cache and MONAI's persistent
cache filled):

* bare read: every ``np.load(mmap_mode="r")`` array copied once into new memory, one image at
  a time, in this process (the files memory-mapped once): the limit; and the same copies into
  one reused batch array (B, 1, X, Y, Z), the least any batch loader does;
* this loader: ``pipeline.learning.loader.ArrayLoader`` (memory-mapped arrays, a read-ahead thread),
  without augmentation and with ``pipeline.learning.augment`` random affine (rotation 5°, scaling 0.05,
  translation 2 voxels) + Gaussian noise (sd 0.05), applied to each batch as training does: on
  the CPU, resampled by ``pipeline.learning.resample``'s kernel; on the GPU when there is one, by torch;
  and, to show what the kernel gains, the same draws resampled on the CPU by torch's
  ``F.affine_grid`` + ``F.grid_sample``;
* MONAI: ``PersistentDataset`` (LoadImaged + EnsureChannelFirstd cached as .pt, warm) +
  ``RandAffined`` (same ranges, bilinear) + ``RandGaussianNoised``, torch DataLoader;
* TorchIO: ``SubjectsDataset`` of ``ScalarImage`` (.nii) + ``RandomAffine`` + ``RandomNoise``,
  torch DataLoader;
* nitrain 0.3.1: ``Dataset`` of an ``ImageReader`` (.nii) + ``Loader`` with ``RandomRotate``,
  ``RandomZoom``, ``RandomTranslate`` and noise through ``NumpyFunction`` (nitrain has no noise
  transform), on ANTs images in this process (nitrain's Loader has no workers).

MONAI and TorchIO use ``--workers`` DataLoader worker processes; this loader uses one read-ahead
thread and ``--threads`` torch threads for augmentation. A peer that is not installed is
reported as such; so is the GPU row on a machine without one.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.learning.augment import Augmentation, affine_theta
from pipeline.learning.loader import ArrayLoader

AFFINE = {"rotation": 5.0, "scaling": 0.05, "translation": 2.0}
NOISE = 0.05


def write_volumes(folder: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` brain-like volumes as .npy (1, X, Y, Z) and .nii (X, Y, Z), float32: an ellipsoid of
    smooth texture around 1 plus noise, background 0 (nitrain rotates about the centre of mass)."""
    import nibabel as nib
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    axes = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(a**2 for a in axes) < 0.8**2
    base = 1 + gaussian_filter(rng.normal(size=shape).astype(np.float32), 4) * 5
    npy, nii = [], []
    for i in range(n):
        volume = ((base + 0.1 * rng.normal(size=shape)) * inside).astype(np.float32)
        npy.append(str(folder / f"img{i:04d}.npy"))
        np.save(npy[-1], volume[None])
        nii.append(str(folder / f"img{i:04d}.nii"))
        nib.save(nib.Nifti1Image(volume, np.eye(4)), nii[-1])
    return npy, nii


def batches_of(n: int, batch: int) -> list[list[int]]:
    return [list(range(i, min(i + batch, n))) for i in range(0, n, batch)]


def bare_read(npy):
    """A pass maker: the arrays memory-mapped once, each pass copies every one into new memory
    (one image at a time: the same 4 MB block is reused and stays in the CPU cache)."""
    arrays = [np.load(path, mmap_mode="r") for path in npy]

    def one_pass():
        for array in arrays:
            yield np.array(array)
    return one_pass


def bare_batch_read(npy, batch):
    """A pass maker: each batch copied into one reused (B, 1, X, Y, Z) array, in this process —
    the least a batch loader does."""
    arrays = [np.load(path, mmap_mode="r") for path in npy]
    out = np.empty((batch, *arrays[0].shape), np.float32)

    def one_pass():
        for index in batches_of(len(arrays), batch):
            for i, k in enumerate(index):
                out[i] = arrays[k]
            yield out[:len(index)]
    return one_pass


def torch_resampled(aug: Augmentation, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``aug`` with its affine resampled by torch's ``F.affine_grid`` + ``F.grid_sample``."""
    params = aug.sample(x.shape[0], generator)
    draw = params["affine"]
    theta = affine_theta(draw["rotation"], draw["scaling"], draw["translation"], x.shape[2:], draw["shear"],
                         draw["flip"])
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for name, transform in aug.transforms().items():
        if name != "affine":
            x = transform.apply(params[name], x)
    return x


def this_loader(npy, batch, augment: bool = False, device: str = "cpu", torch_resampling: bool = False):
    """A pass maker, as in training: one loader for the run (recycled buffers on the CPU; pinned
    memory and asynchronous copies to a GPU), one ``batches`` pass per epoch."""
    cuda = device == "cuda"
    loader = ArrayLoader(npy, prefetch=2, pin_memory=cuda, recycle=not cuda)
    aug = Augmentation(**AFFINE, noise=NOISE, intensity=0.0)
    generator = torch.Generator().manual_seed(0)

    def one_pass():
        for _, x, _ in loader.batches(batches_of(len(npy), batch)):
            x = x.to(device, non_blocking=True)
            if augment:
                x = torch_resampled(aug, x, generator) if torch_resampling else aug(x, generator)
            yield x
        if cuda:
            torch.cuda.synchronize()
    return one_pass


def monai_loader(npy, nii, batch, workers, cache_dir: Path):
    from monai.data import DataLoader, PersistentDataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandAffined, RandGaussianNoised

    transforms = Compose([
        LoadImaged(keys="image", image_only=True), EnsureChannelFirstd(keys="image"),
        RandAffined(keys="image", prob=1.0, rotate_range=[math.radians(AFFINE["rotation"])] * 3,
                    scale_range=[AFFINE["scaling"]] * 3, translate_range=[AFFINE["translation"]] * 3,
                    mode="bilinear", padding_mode="zeros"),
        RandGaussianNoised(keys="image", prob=1.0, std=NOISE),
    ])
    dataset = PersistentDataset([{"image": p} for p in nii], transform=transforms, cache_dir=cache_dir)
    for item in DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=False):
        yield item["image"]


def torchio_loader(npy, nii, batch, workers):
    import torchio as tio

    subjects = [tio.Subject(image=tio.ScalarImage(p)) for p in nii]
    transform = tio.Compose([tio.RandomAffine(scales=AFFINE["scaling"], degrees=AFFINE["rotation"],
                                              translation=AFFINE["translation"], image_interpolation="linear"),
                             tio.RandomNoise(std=(NOISE, NOISE))])
    dataset = tio.SubjectsDataset(subjects, transform=transform)
    for item in torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers):
        yield item["image"][tio.DATA]


def nitrain_loader(npy, nii, batch, workers):
    from nitrain import datasets, loaders, readers
    from nitrain import transforms as tx

    rng = np.random.default_rng(0)
    rotation, translation, zoom = AFFINE["rotation"], AFFINE["translation"], AFFINE["scaling"]
    dataset = datasets.Dataset(inputs=readers.ImageReader("img*.nii"), outputs=readers.MemoryReader(list(range(len(nii)))),
                               base_dir=str(Path(nii[0]).parent))
    transforms = {"inputs": [tx.RandomRotate((-rotation,) * 3, (rotation,) * 3), tx.RandomZoom(1 - zoom, 1 + zoom),
                             tx.RandomTranslate((-translation,) * 3, (translation,) * 3),
                             tx.NumpyFunction(lambda a: a + rng.normal(0, NOISE, a.shape).astype(a.dtype))]}
    loader = loaders.Loader(dataset, images_per_batch=batch, transforms=transforms, channels_first=True)
    for x, _ in loader:
        yield x


def timed(make, n_expected: int, min_seconds: float = 3.0) -> float:
    """Images/s over as many passes of ``make()`` as fill ``min_seconds`` (at least one), after
    one untimed warm-up pass."""
    def one_pass() -> int:
        seen = sum(x.shape[0] if x.ndim == 5 else 1 for x in make())
        if seen != n_expected:
            raise RuntimeError(f"saw {seen} images, expected {n_expected}")
        return seen
    one_pass()
    start, seen = time.perf_counter(), 0
    while seen == 0 or time.perf_counter() - start < min_seconds:
        seen += one_pass()
    return seen / (time.perf_counter() - start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 112, 96])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes of MONAI and TorchIO")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of this process")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        npy, nii = write_volumes(folder, args.images, tuple(args.shape))
        (folder / "monai_cache").mkdir()
        b, w = args.batch, args.workers
        methods = {
            "bare .npy memmap read (limit)": bare_read(npy),
            "bare .npy memmap read into a batch array": bare_batch_read(npy, b),
            "this loader, no augmentation": this_loader(npy, b),
            "this loader + random affine + noise": this_loader(npy, b, augment=True),
            "this loader + random affine (torch affine_grid + grid_sample) + noise": this_loader(
                npy, b, augment=True, torch_resampling=True),
            "this loader + random affine + noise, on the GPU": (this_loader(npy, b, True, "cuda")
                                                                 if torch.cuda.is_available() else None),
            "MONAI PersistentDataset (warm) + RandAffined + RandGaussianNoised": lambda: monai_loader(
                npy, nii, b, w, folder / "monai_cache"),
            "TorchIO SubjectsDataset + RandomAffine + RandomNoise": lambda: torchio_loader(npy, nii, b, w),
            "nitrain 0.3.1 Loader + RandomRotate/Zoom/Translate + noise": lambda: nitrain_loader(npy, nii, b, w),
        }
        results = {}
        for name, make in methods.items():
            try:
                if make is None:
                    raise RuntimeError("not run: no CUDA GPU on this machine")
                results[name] = timed(make, args.images)
            except ImportError as exc:
                results[name] = f"not installed ({exc.name})"
            except RuntimeError as exc:
                results[name] = str(exc)
            print(f"{name}: {results[name]}", flush=True)
    bare = results["bare .npy memmap read (limit)"]
    monai = results["MONAI PersistentDataset (warm) + RandAffined + RandGaussianNoised"]
    print(f"\n{args.images} volumes of {'×'.join(map(str, args.shape))} float32, batches of {b}, "
          f"{w} DataLoader workers, {args.threads} torch threads\n")
    print("| method | images/s | × MONAI | % of bare read |\n|---|---|---|---|")
    for name, value in results.items():
        if isinstance(value, str):
            print(f"| {name} | {value} | | |")
            continue
        vs_monai = f"{value / monai:.1f}" if isinstance(monai, float) else ""
        print(f"| {name} | {value:.1f} | {vs_monai} | {100 * value / bare:.0f} % |")


if __name__ == "__main__":
    main()
