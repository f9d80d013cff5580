"""The study table (manifest ⋈ splits, joined by image id) and batches of preprocessed arrays."""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pandas as pd
import torch

from pipeline.errors import InputError
from pipeline.preprocess import derivative_paths


def read_tsv(path: Path) -> pd.DataFrame:
    """A TSV with ids kept as strings ('' for an absent session)."""
    return pd.read_csv(path, sep="\t", dtype={"session": str, "participant_id": str, "image_id": str},
                       keep_default_na=False)


def study_table(manifest: Path, splits: Path, preproc_dir: Path, fold: str, channels: list[str] | None = None,
                label: bool = False) -> pd.DataFrame:
    """One row per image: manifest columns, its ``split`` in ``fold`` (e.g. ``fold-1``) and the
    preprocessed ``array`` path, joined by image id; with ``label`` (segmentation) also the
    preprocessed ``label_array`` path."""
    table = read_tsv(manifest)
    if label and "label" not in table.columns:
        raise InputError(f"{manifest} has no `label` column: `task: segmentation` needs a label image per sample; "
                         "set config `label_image` (e.g. {derivatives: derivatives/tissue, filters: {suffix: dseg}}) "
                         "and rerun ingestion.")
    design = read_tsv(splits)
    if fold not in design.columns:
        folds = [c for c in design.columns if c.startswith("fold-")]
        raise InputError(f"{splits} has no column {fold!r} (it has {', '.join(folds)}); rerun the split rule.")
    split = design[["image_id", "participant_id", fold]].rename(columns={fold: "split"})
    merged = table.merge(split, on="image_id", how="left", suffixes=("", "_split"), validate="one_to_one")
    missing = merged["split"].isna()
    if missing.any():
        raise InputError(f"{splits} has no split for images {', '.join(merged.loc[missing, 'image_id'])}; rerun the split rule.")
    if (merged["participant_id"] != merged["participant_id_split"]).any():
        raise InputError(f"{splits} and {manifest} disagree on a participant id; rerun the split rule.")
    paths = [derivative_paths(preproc_dir, s, i, channels, label) for s, i in zip(merged["subdir"], merged["image_id"])]
    merged["array"] = [str(p["array"]) for p in paths]
    if label:
        merged["label_array"] = [str(p["label_array"]) for p in paths]
    return merged.drop(columns="participant_id_split")


class TargetCoder:
    """Maps target values to training labels and back: z-scores (regression) or class indices.
    Segmentation: ``classes`` are the label names (index = label value), one network output each."""

    def __init__(self, task: str, classes: list[str] | None = None, mean: float = 0.0, std: float = 1.0):
        self.task, self.classes, self.mean, self.std = task, classes, mean, std

    @classmethod
    def fit(cls, task: str, train_values: pd.Series, classes: list[str] | None = None) -> "TargetCoder":
        """Regression: mean/sd of the training values only. Classification: the recorded class list
        (``classes``, from ingestion's targets.json), else the sorted training classes."""
        if task == "classification":
            known = sorted(train_values.astype(str).unique()) if classes is None else list(classes)
            unknown = sorted(set(train_values.astype(str)) - set(known))
            if unknown:
                raise InputError(f"Target values {unknown} are not in the recorded class list {known}; rerun ingestion.")
            return cls(task, classes=known)
        values = train_values.astype(float)
        return cls(task, mean=float(values.mean()), std=float(values.std()) or 1.0)

    @property
    def outputs(self) -> int:
        return len(self.classes) if self.task in ("classification", "segmentation") else 1

    def encode(self, values) -> torch.Tensor:
        if self.task == "classification":
            index = {c: i for i, c in enumerate(self.classes)}
            return torch.tensor([index[str(v)] for v in values], dtype=torch.long)
        return torch.tensor((np.asarray(values, dtype=np.float32) - self.mean) / self.std, dtype=torch.float32)

    def decode(self, outputs: torch.Tensor) -> np.ndarray:
        """Network outputs (B, outputs) → predictions in target units, or class probabilities (B, K)."""
        if self.task == "classification":
            return torch.softmax(outputs.float(), dim=1).numpy()
        return outputs.float().squeeze(1).numpy() * self.std + self.mean

    def state(self) -> dict:
        return {"task": self.task, "classes": self.classes, "mean": self.mean, "std": self.std}


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
