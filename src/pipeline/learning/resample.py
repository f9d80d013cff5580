"""Affine resampling of (B, C, X, Y, Z) batches: ``F.affine_grid`` + ``F.grid_sample`` in one pass.

On the CPU a numba kernel computes each output voxel's source position from the (B, 3, 4) matrix
and interpolates it directly: no (B, X, Y, Z, 3) sampling grid is written and read back, and runs
of the batch's slabs go to torch's number of threads. It equals ``grid_sample(..., align_corners=False,
padding_mode="zeros")`` (bilinear or nearest) to float rounding. Other devices use torch's own
functions, so augmentation runs on a GPU where there is one.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F


def index_matrices(theta: torch.Tensor, shape) -> np.ndarray:
    """(B, 3, 4) float64 matrices mapping output voxel indices (i, j, k) of tensor dims X, Y, Z to
    input voxel positions, for ``affine_grid``'s normalised (B, 3, 4) ``theta`` (rows and columns
    in grid order z, y, x = dims Z, Y, X) with ``align_corners=False``."""
    n = torch.tensor(list(shape)[::-1], dtype=torch.float64)  # sizes in grid order (Z, Y, X)
    to_normal = torch.eye(4, dtype=torch.float64)  # grid-order index → normalised coordinate
    to_normal[:3, :3] = torch.diag(2 / n)
    to_normal[:3, 3] = 1 / n - 1
    to_index = torch.eye(4, dtype=torch.float64)  # normalised coordinate → grid-order index
    to_index[:3, :3] = torch.diag(n / 2)
    to_index[:3, 3] = (n - 1) / 2
    full = torch.eye(4, dtype=torch.float64).repeat(theta.shape[0], 1, 1)
    full[:, :3] = theta.detach().to("cpu", torch.float64)
    matrix = to_index @ full @ to_normal  # grid-order index → grid-order index
    reverse = torch.eye(4, dtype=torch.float64)[[2, 1, 0, 3]]  # grid order ↔ tensor order (X, Y, Z)
    return (reverse @ matrix @ reverse)[:, :3].contiguous().numpy()


@cache
def kernel():
    """The compiled kernel (numba imported and the machine code loaded from its cache on first use:
    processes that never resample on the CPU do not pay numba's memory)."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True, fastmath={"contract"})(resample_slabs)
    except RuntimeError:  # no writable cache folder (set NUMBA_CACHE_DIR): compile in each process
        return numba.njit(nogil=True, fastmath={"contract"})(resample_slabs)


def resample_slabs(source, matrices, out, nearest, first, stop):
    """Output slabs ``first`` to ``stop`` (of ``batch * nx``, slab = (image, i)) of ``out``."""
    batch, channels, nx, ny, nz = source.shape
    for task in range(first, stop):
        b, i = task // nx, task % nx
        m = matrices[b]
        for c in range(channels):
            s, o = source[b, c], out[b, c, i]
            for j in range(ny):
                x0 = m[0, 0] * i + m[0, 1] * j + m[0, 3]
                y0 = m[1, 0] * i + m[1, 1] * j + m[1, 3]
                z0 = m[2, 0] * i + m[2, 1] * j + m[2, 3]
                for k in range(nz):
                    x, y, z = x0 + m[0, 2] * k, y0 + m[1, 2] * k, z0 + m[2, 2] * k
                    if nearest:
                        xi, yi, zi = int(np.rint(x)), int(np.rint(y)), int(np.rint(z))
                        inside = 0 <= xi < nx and 0 <= yi < ny and 0 <= zi < nz
                        o[j, k] = s[xi, yi, zi] if inside else 0
                        continue
                    fx, fy, fz = np.floor(x), np.floor(y), np.floor(z)
                    xi, yi, zi = int(fx), int(fy), int(fz)
                    wx, wy, wz = x - fx, y - fy, z - fz
                    if 0 <= xi and xi + 1 < nx and 0 <= yi and yi + 1 < ny and 0 <= zi and zi + 1 < nz:
                        a = (s[xi, yi, zi] * (1 - wz) + s[xi, yi, zi + 1] * wz) * (1 - wy) \
                            + (s[xi, yi + 1, zi] * (1 - wz) + s[xi, yi + 1, zi + 1] * wz) * wy
                        e = (s[xi + 1, yi, zi] * (1 - wz) + s[xi + 1, yi, zi + 1] * wz) * (1 - wy) \
                            + (s[xi + 1, yi + 1, zi] * (1 - wz) + s[xi + 1, yi + 1, zi + 1] * wz) * wy
                        o[j, k] = a * (1 - wx) + e * wx
                        continue
                    total = 0.0  # at the border: corners outside count as 0
                    for dx in range(2):
                        for dy in range(2):
                            for dz in range(2):
                                px, py, pz = xi + dx, yi + dy, zi + dz
                                if 0 <= px < nx and 0 <= py < ny and 0 <= pz < nz:
                                    w = (wx if dx else 1 - wx) * (wy if dy else 1 - wy) * (wz if dz else 1 - wz)
                                    total += s[px, py, pz] * w
                    o[j, k] = total


def affine_resample(image: torch.Tensor, theta: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """``F.grid_sample(image, F.affine_grid(theta, image.shape, align_corners=False), mode,
    padding_mode="zeros", align_corners=False)`` for a (B, C, X, Y, Z) float ``image`` and (B, 3, 4)
    ``theta``; ``mode`` "bilinear" (trilinear) or "nearest". On the CPU in the numba kernel, with
    as many threads as torch uses (the kernel releases the GIL; each thread takes a run of
    (image, x) slabs, so the result does not depend on the thread count)."""
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', not {mode!r}")
    if image.device.type != "cpu" or image.dtype not in (torch.float32, torch.float64) or image.requires_grad:
        grid = F.affine_grid(theta.to(image.device, image.dtype), list(image.shape), align_corners=False)
        return F.grid_sample(image, grid, mode=mode, padding_mode="zeros", align_corners=False)
    source = image.contiguous().numpy()
    out = np.empty_like(source)
    matrices, nearest = index_matrices(theta, image.shape[2:]), mode == "nearest"
    resample = kernel()
    over_threads(lambda first, stop: resample(source, matrices, out, nearest, first, stop),
                 image.shape[0] * image.shape[2])
    return torch.from_numpy(out)


def over_threads(work, count: int, parallel: bool = True) -> None:
    """``work(first, stop)`` over ``count`` items split into one run per torch thread (in this
    thread when there is one, or ``parallel`` is false); ``work`` must release the GIL to gain."""
    threads = max(1, min(torch.get_num_threads() if parallel else 1, count))
    bounds = [count * t // threads for t in range(threads + 1)]
    if threads == 1:
        work(0, count)
        return
    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(work, a, b) for a, b in zip(bounds, bounds[1:])]:
            done.result()
