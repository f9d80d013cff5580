"""Atomic output files: every stage writes to a temporary name in the target's folder, then renames.

A crash (kill -9, power loss, an exception) mid-write therefore never leaves a file at the final
path that looks complete: either the old file (or none) is there, or the whole new one. The
temporary name keeps the final suffix (``.nii.gz``, ``.png``, ``.npy``, ``.tsv``) because nibabel,
matplotlib and numpy choose the format from it, and starts with ``.`` so globs of outputs skip it.

    with atomic.path(out / "map.nii.gz") as tmp:
        nib.save(img, tmp)

    atomic.write_text(out / "metrics.json", json.dumps(metrics))
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

COMPOUND_SUFFIXES = (".nii.gz", ".tar.gz")


def temporary_name(final: Path) -> Path:
    """A unique hidden sibling of ``final`` with the same suffix: ``.name.<hex>.tmp.nii.gz``."""
    name = final.name
    suffix = next((s for s in COMPOUND_SUFFIXES if name.endswith(s)), final.suffix)
    stem = name[: len(name) - len(suffix)] if suffix else name
    return final.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def umask() -> int:
    current = os.umask(0o022)
    os.umask(current)
    return current


def commit(tmp: Path, final: Path) -> None:
    """fsync ``tmp``'s data, give it the mode a plain ``open`` would (0666 less the umask: some
    writers, safetensors among them, create 0600 files that colleagues on a shared folder cannot
    read), rename it over ``final`` and fsync the folder."""
    os.chmod(tmp, 0o666 & ~umask())
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


@contextmanager
def path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on normal exit rename it to ``final``, on an
    exception delete it (the final path is left as it was). The writer must create the file."""
    final = Path(final)
    tmp = temporary_name(final)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"Nothing was written to the temporary file {tmp} for {final}.")
        commit(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def open_(final: str | os.PathLike, mode: str = "w", **kwargs):
    """``open`` on a temporary name, renamed to ``final`` when the block ends without error."""
    with path(final) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(final: str | os.PathLike, text: str) -> None:
    with open_(final, "w", encoding="utf-8") as f:
        f.write(text)


def write_bytes(final: str | os.PathLike, data: bytes) -> None:
    with open_(final, "wb") as f:
        f.write(data)


def to_csv(frame, final: str | os.PathLike, meanings=None, **kwargs) -> None:
    """``DataFrame.to_csv(final, **kwargs)`` atomically; a TSV's missing values as ``n/a`` (BIDS)
    and, beside a ``.tsv``, its data dictionary (``write_dictionary``; ``meanings``: the writer's own
    ``columns.Column`` entries, for names only it knows)."""
    if kwargs.get("sep") == "\t":
        kwargs.setdefault("na_rep", "n/a")
    with path(final) as tmp:
        frame.to_csv(tmp, **kwargs)
    if Path(final).suffix == ".tsv":
        write_dictionary(final, written_columns(frame, kwargs), meanings)


def written_columns(frame, kwargs: dict) -> list[str]:
    """The header ``frame.to_csv(**kwargs)`` writes: the index's names (when written), then the columns."""
    names = list(kwargs.get("columns") if kwargs.get("columns") is not None else frame.columns)
    if kwargs.get("index", True):
        names = [n if n is not None else "" for n in frame.index.names] + names
    return [str(n) for n in names]


def write_dictionary(tsv: str | os.PathLike, names, meanings=None) -> Path:
    """Write the BIDS data dictionary of the table ``tsv`` with columns ``names`` beside it
    (``pipeline.common.columns``: ``sidecar_of``, ``dictionary``); return its path."""
    import json

    from pipeline.common import columns

    sidecar = columns.sidecar_of(tsv)
    write_text(sidecar, json.dumps(columns.dictionary(names, meanings, where=str(tsv)), indent=2,
                                   ensure_ascii=False) + "\n")
    return sidecar


def copyfile(source: str | os.PathLike, final: str | os.PathLike) -> None:
    with path(final) as tmp:
        shutil.copyfile(source, tmp)


def spatial_header(img):
    """Complete a NIfTI image's spatial header in place, as the BIDS validator asks: a coded sform
    and qform (a code of 0 means "no orientation"; a missing one gets the other's code, or 1,
    scanner, when neither has one, and the image's affine) and spatial units in mm when they are
    unknown. Codes and units already set are kept, the affine never changes. Returns ``img``."""
    import nibabel as nib

    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return img
    header = img.header
    affine = img.affine
    sform_code, qform_code = int(header["sform_code"]), int(header["qform_code"])
    if not sform_code:
        sform_code = qform_code or 1
        img.set_sform(affine, code=sform_code)
    if not qform_code:
        img.set_qform(affine, code=sform_code)  # the best affine stays the sform's
    xyz, t = header.get_xyzt_units()
    if xyz == "unknown":
        header.set_xyzt_units("mm", t)
    return img


def nib_save(img, final: str | os.PathLike) -> None:
    """``nibabel.save`` atomically (the temporary name keeps ``.nii``/``.nii.gz``), with the
    spatial header completed (``spatial_header``): every NIfTI the pipeline writes goes through here."""
    import nibabel as nib

    with path(final) as tmp:
        nib.save(spatial_header(img), str(tmp))


def np_save(final: str | os.PathLike, array) -> None:
    """``numpy.save`` atomically (``final`` must end in ``.npy``: numpy would append it)."""
    import numpy as np

    with path(final) as tmp:
        np.save(tmp, array)


def savefig(fig, final: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` atomically (the format comes from the suffix, kept on the temporary name)."""
    with path(final) as tmp:
        fig.savefig(str(tmp), **kwargs)


def torch_save(obj, final: str | os.PathLike) -> None:
    import torch

    with path(final) as tmp:
        torch.save(obj, tmp)
