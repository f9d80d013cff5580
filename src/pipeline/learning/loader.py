"""Batches of preprocessed arrays: memory-mapped headers, ``readinto`` reads, a read-ahead thread;
and a fold's mean training image."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import torch

from pipeline.common.errors import InputError

if TYPE_CHECKING:
    import pandas as pd


def open_array(path: str) -> np.ndarray:
    """A preprocessed (C, X, Y, Z) ``.npy`` array, memory-mapped read-only (nothing read yet)."""
    try:
        return np.load(path, mmap_mode="r")
    except FileNotFoundError as exc:
        raise InputError(f"Preprocessed array missing: {exc.filename}; rerun preprocessing.") from exc
    except ValueError as exc:
        raise InputError(f"Unreadable preprocessed array {path}: {exc}; rerun preprocessing.") from exc


def load_batch(paths: list[str]) -> torch.Tensor:
    """(B, C, X, Y, Z) float32 batch from memory-mapped (C, X, Y, Z) ``.npy`` arrays."""
    return torch.from_numpy(np.stack([open_array(p) for p in paths]).astype(np.float32, copy=False))


def mean_training_image(table: pd.DataFrame) -> torch.Tensor:
    """The mean (C, X, Y, Z) image of the fold's training rows (integrated gradients' baseline),
    summed one image at a time in float64 (memory of one image, whatever the cohort)."""
    paths = table.loc[table["split"] == "train", "array"]
    total = None
    for path in paths:
        image = load_batch([path])[0].double()
        total = image if total is None else total.add_(image)
    return (total / len(paths)).float()


def read_into(target: np.ndarray, mapped: np.memmap, path: str) -> None:
    """Copy the ``.npy`` file ``path`` (memory-mapped as ``mapped``, header only) into ``target``
    without mapping its data: a plain read when the layout matches, else a short-lived map."""
    if mapped.dtype == target.dtype and mapped.flags.c_contiguous and target.flags.c_contiguous:
        with open(path, "rb", buffering=0) as f:
            f.seek(mapped.offset)
            view = memoryview(target).cast("B")
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise InputError(f"{path} is shorter than its header says; rerun preprocessing.")
                done += got
        return
    np.copyto(target, open_array(path), casting="same_kind")  # the map is dropped on return


class ArrayLoader:
    """Batches of the preprocessed arrays, read ahead in a background thread.

    Each (C, X, Y, Z) float32 ``.npy`` file's header is read once (a memory map that is never
    read); a batch is one ``readinto`` per image from the page cache into a (B, C, X, Y, Z)
    tensor. Reading through the kept maps instead would leave every page read mapped in this
    process, so its resident memory would grow to the whole cohort over an epoch
    (benchmarks/memory.py); this way it stays at a few batches. ``batches(index_lists)`` keeps ``prefetch``
    batches being read while the caller works on the current one; ``wait_seconds`` adds up the
    time the caller was blocked waiting for data. ``labels``: label-image arrays, read alongside.

    ``pin_memory``: batches in page-locked memory, for asynchronous copies to a GPU (PyTorch's
    pinned-memory cache reuses them safely). ``recycle``: batches are written into
    ``prefetch + 1`` reused buffers instead of fresh memory, which saves the page faults of a new
    allocation (about a third of the read time); a yielded batch is then only valid until the
    next one is requested.
    """

    def __init__(self, paths: list[str], labels: list[str] | None = None, prefetch: int = 2,
                 pin_memory: bool = False, recycle: bool = False):
        self.paths = list(paths)
        self.prefetch, self.pin_memory, self.recycle = max(1, prefetch), pin_memory, recycle and not pin_memory
        self.arrays = [open_array(p) for p in self.paths]
        self.label_paths = list(labels) if labels else None
        self.label_arrays = [open_array(p) for p in labels] if labels else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loader")
        self.free: list = []  # recycled (images, labels) buffers
        self.wait_seconds = 0.0

    def buffer(self, arrays: list[np.ndarray], n: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty((n, *arrays[0].shape), dtype=dtype, pin_memory=self.pin_memory)

    def fill(self, out: torch.Tensor, arrays: list[np.ndarray], index: list[int], paths: list[str]) -> torch.Tensor:
        """Read the arrays at ``index`` into ``out[:len(index)]`` and return that view."""
        target = out.numpy()
        for i, k in enumerate(index):
            if arrays[k].shape != target.shape[1:]:
                raise InputError(f"{paths[k]} has shape {arrays[k].shape}, not {target.shape[1:]} like the "
                                 "others; rerun preprocessing.")
            read_into(target[i], arrays[k], paths[k])
        return out[:len(index)]

    def read_batch(self, index: list[int], size: int):
        """((B, C, X, Y, Z) images, label images or None, buffers to recycle) of ``index``."""
        buffers = self.free.pop() if self.recycle and self.free else None
        if buffers is None or buffers[0].shape[0] < len(index):
            label_dtype = (torch.from_numpy(self.label_arrays[0][:0].copy()).dtype if self.label_arrays else None)
            buffers = (self.buffer(self.arrays, size, torch.float32),
                       self.buffer(self.label_arrays, size, label_dtype) if self.label_arrays else None)
        images = self.fill(buffers[0], self.arrays, index, self.paths)
        labels = self.fill(buffers[1], self.label_arrays, index, self.label_paths) if self.label_arrays else None
        return images, labels, buffers

    def batches(self, index_lists: Iterable[list[int]]) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
        """(index, images, label images or None) per index list, in order, read ahead."""
        lists = [list(i) for i in index_lists]
        size = max((len(i) for i in lists), default=0)
        pending: deque = deque()
        for index in lists[:self.prefetch + 1]:
            pending.append((index, self.pool.submit(self.read_batch, index, size)))
        following = iter(lists[self.prefetch + 1:])
        while pending:
            index, future = pending.popleft()
            start = time.perf_counter()
            images, labels, buffers = future.result()
            self.wait_seconds += time.perf_counter() - start
            yield index, images, labels
            if self.recycle:  # the caller asked for the next batch: this one's buffers are free
                self.free.append(buffers)
            nxt = next(following, None)
            if nxt is not None:
                pending.append((nxt, self.pool.submit(self.read_batch, nxt, size)))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
