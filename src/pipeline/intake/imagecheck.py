"""Checks that a NIfTI file is one usable 3D image: its header always, its data on request.

Each check returns ``""`` for a usable file or a one-line reason for the ingest report that says
what is wrong and what to do. Results are cached per file path, size and mtime (and the limits),
so a rerun reads only new or changed files.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.common import jsoncache
from pipeline.common.fingerprint import MISSING, file_stamp
from pipeline.intake.geometry import SHEAR_TOLERANCE, shear

HEADER_BYTES = 540  # a NIfTI-2 header; NIfTI-1 needs 348
CACHE_VERSION = 3  # 3: JSON (checks.json); the binary checks.pkl of version 2 is never read
REPLACE = "replace or repair the file, or leave the participant out (participants.exclude)"
XFORM_CODES = range(0, 6)  # NIfTI qform_code/sform_code: unknown, scanner, aligned, talairach, mni, template
# config `image_limits`: larger images are excluded before preprocessing reads them whole.
DEFAULT_LIMITS = {"max_voxels": 512**3, "max_voxel_size": 20.0}


def read_prefix(path: str, n: int) -> bytes:
    """Up to ``n`` bytes of the file's content, decompressed when the name ends in ``.gz``.

    Raises ValueError when a ``.gz`` file is not gzip data, EOFError when its stream is cut short.
    """
    with open(path, "rb") as f:
        start = f.read(max(n, 4096))
    if not path.endswith(".gz"):
        return start[:n]
    if not start.startswith(b"\x1f\x8b"):
        raise ValueError(f"named .gz but not gzip-compressed (it starts with {start[:16]!r})")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = inflater.decompress(start, n)
    if len(out) < n and not inflater.eof:  # more compressed bytes needed (or a cut-off stream)
        with gzip.open(path, "rb") as f:
            out = f.read(n)
    return out


def read_header(path: str) -> nib.Nifti1Header:
    """The NIfTI-1 or NIfTI-2 header of ``path`` (ValueError with the reason when it is not one).

    Only the fixed-size header is parsed; extensions (AFNI, DICOM, JSON …) are not read.
    """
    raw = read_prefix(path, HEADER_BYTES)
    for klass in (nib.Nifti1Header, nib.Nifti2Header):
        for order, endianness in (("little", "<"), ("big", ">")):
            if len(raw) >= 4 and int.from_bytes(raw[:4], order) == klass.sizeof_hdr:
                if len(raw) < klass.sizeof_hdr:
                    raise ValueError(f"truncated NIfTI header ({len(raw)} of {klass.sizeof_hdr} bytes)")
                header = klass(raw[: klass.sizeof_hdr], endianness, check=False)
                if header["magic"].item() not in (b"n+1", b"n+2"):
                    raise ValueError(f"not a single-file NIfTI (magic {header['magic'].item()!r})")
                return header
    raise ValueError(f"not a NIfTI file (it starts with {raw[:16]!r})")


def header_problem(path: str, size: int | None = None, limits: dict | None = None) -> str:
    """Why the file's header rules it out as one 3D image (``""`` when it is usable).

    Catches: a missing, unreadable (permissions) or zero-byte file, text or other data under a
    NIfTI name, a truncated header or (uncompressed) truncated data, a 4D image of several volumes
    (X×Y×Z×1 passes: readers drop the singleton axis, ``geometry.load_3d``) or a 2D image, a zero
    dimension, voxel sizes (pixdim) zero, negative or not finite, invalid qform/sform codes, a
    singular or non-finite affine, and an image over ``limits`` (``DEFAULT_LIMITS``: voxel count, voxel edge in mm). Only the header is read.
    """
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    if size is None:
        size = file_stamp(path)[0]
    if size == MISSING:
        return "file content is missing (broken symlink; with git-annex or DataLad, `datalad get` it first)"
    if size == 0:
        return f"zero-byte file; {REPLACE}"
    try:
        header = read_header(path)
        shape = header.get_data_shape()
        dtype = header.get_data_dtype()
        zooms = tuple(float(v) for v in header["pixdim"][1:4])
        if not all(np.isfinite(v) and v > 0 for v in zooms):  # before the affine: nibabel refuses or repairs them
            return (f"voxel sizes pixdim[1:4] = {zooms} hold a zero, negative or non-finite value, which readers "
                    "repair differently (nibabel reads 0 as 1 mm and takes absolute values, so the qform and "
                    "sform disagree); rewrite the header with positive voxel sizes (nibabel: "
                    "img.header.set_zooms, or set_qform/set_sform from a valid affine)")
        affine = header.get_best_affine()
    except PermissionError:
        return "permission denied: the file cannot be read; make it readable (chmod a+r) or remove it"
    except (OSError, EOFError, zlib.error, ValueError, nib.spatialimages.HeaderDataError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, (gzip.BadGzipFile, zlib.error, EOFError)):
            reason = f"truncated or corrupt gzip stream ({reason})"
        return f"unreadable NIfTI: {reason}; {REPLACE}"
    if len(shape) == 4 and shape[3] > 1 or len(shape) > 4:
        return (f"{len(shape)}D image (shape {tuple(shape)}); expected one 3D volume: save the volume to use on "
                "its own, or narrow bids_filters to leave this file out")
    if len(shape) < 3:
        return f"{len(shape)}D image (shape {tuple(shape)}); expected a 3D volume; {REPLACE}"
    if min(shape) == 0:
        return f"empty image (shape {tuple(shape)}); {REPLACE}"
    codes = {name: int(header[name]) for name in ("qform_code", "sform_code")}
    invalid = [f"{name} {code}" for name, code in codes.items() if code not in XFORM_CODES]
    if invalid:
        return (f"invalid orientation code ({', '.join(invalid)}; NIfTI allows 0-5); rewrite the header "
                "with a valid qform/sform (e.g. nibabel set_sform(affine, code=1))")
    if not np.isfinite(affine).all():
        return "non-finite values in the affine (sform/qform); rewrite the header with a valid affine"
    sform, sform_code = header.get_sform(coded=True)
    if sform_code and np.isfinite(sform).all() and shear(sform) > SHEAR_TOLERANCE:
        return ("sheared sform (voxel axes not orthogonal), which ANTs and nibabel place differently "
                "(pipeline.intake.geometry); resample the image onto an orthogonal grid, or exclude it")
    if abs(det3(affine[:3, :3].tolist())) < 1e-6:
        return "singular affine (zero voxel size or degenerate orientation in sform/qform); rewrite the header"
    voxel = float(np.linalg.norm(affine[:3, :3], axis=0).max())
    if voxel > limits["max_voxel_size"]:
        return (f"voxel size {voxel:g} mm is over image_limits.max_voxel_size ({limits['max_voxel_size']:g} mm); "
                "check the header's pixdim/affine (units) or raise the limit")
    voxels = int(np.prod(shape[:3], dtype=np.int64))
    if voxels > limits["max_voxels"]:
        return (f"image has {voxels} voxels (shape {tuple(shape)}), over image_limits.max_voxels "
                f"({limits['max_voxels']}); downsample it or raise the limit")
    if not path.endswith(".gz"):
        needed = int(header["vox_offset"]) + int(np.prod(shape)) * dtype.itemsize
        if size < needed:
            return f"truncated NIfTI: the header describes {needed} bytes, the file has {size}; {REPLACE}"
    return ""


def det3(m: list[list[float]]) -> float:
    """Determinant of a 3×3 matrix (a tenth of np.linalg.det's time, which counts for 10⁴ headers)."""
    (a, b, c), (d, e, f), (g, h, i) = m
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def data_problem(path: str) -> str:
    """Why the image's data rules it out (``""`` when usable): unreadable, NaN/Inf, or constant."""
    try:
        data = np.asanyarray(nib.load(path).dataobj)
    except Exception as exc:  # nibabel and gzip raise many types for damaged files
        return f"unreadable image data ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {REPLACE}"
    if not np.isfinite(data).all():
        return f"image data contain NaN or infinite values; {REPLACE}"
    if data.size and np.ptp(data) == 0:
        return f"image is constant (every voxel is {data.flat[0]}); {REPLACE}"
    return ""


def image_problems(paths: list[str], check_data: bool, cache_dir: Path | None = None,
                   limits: dict | None = None) -> dict[str, str]:
    """``{path: reason}`` for every path (reason ``""`` when usable): the header check (with
    ``limits``), then the data check when ``check_data``. Results are reused from ``cache_dir``
    for unchanged files checked with the same limits."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    cache_path = Path(cache_dir) / "checks.json" if cache_dir is not None else None
    cached = jsoncache.read(cache_path) if cache_path else None
    if not (isinstance(cached, dict) and cached.get("version") == CACHE_VERSION and cached.get("limits") == limits
            and isinstance(cached.get("files"), dict)):
        cached = {"version": CACHE_VERSION, "limits": limits, "files": {}}
    known, changed = cached["files"], False  # path: [[size, mtime], header problem, data problem or None]
    problems = {}
    for path in dict.fromkeys(paths):
        stamp = list(file_stamp(path))
        entry = known.get(path)
        if not (isinstance(entry, list) and len(entry) == 3 and entry[0] == stamp and isinstance(entry[1], str)
                and isinstance(entry[2], (str, type(None)))):
            entry = known[path] = [stamp, header_problem(path, stamp[0], limits), None]
            changed = True
        if check_data and not entry[1] and entry[2] is None:
            entry = known[path] = [stamp, entry[1], data_problem(path)]
            changed = True
        problems[path] = entry[1] or (entry[2] or "" if check_data else "")
    if cache_path is not None and changed:
        jsoncache.write(cache_path, cached)
    return problems
