"""Random augmentation as batched tensor operations on the training device.

Each random transform only *samples* parameters (``sample``); ``apply`` is deterministic given
them, so one draw is shared by an image and its label image and every draw can be recorded.
Images are (B, C, X, Y, Z) tensors of the study grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random draws: rotation (deg), scaling (fraction), translation (voxels),
    noise sd and intensity scale/shift (in units of the z-scored image)."""

    rotation: float = 5.0
    scaling: float = 0.05
    translation: float = 2.0
    noise: float = 0.05
    intensity: float = 0.1

    def sample(self, batch: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Draw parameters for ``batch`` images: a dict of (B, ...) tensors."""
        def uniform(*shape, bound):
            return (torch.rand(*shape, generator=generator) * 2 - 1) * bound
        return {
            "rotation": uniform(batch, 3, bound=math.radians(self.rotation)),
            "scaling": 1 + uniform(batch, 3, bound=self.scaling),
            "translation": uniform(batch, 3, bound=self.translation),
            "noise_seed": torch.randint(0, 2**31 - 1, (1,), generator=generator),
            "gain": 1 + uniform(batch, bound=self.intensity),
            "shift": uniform(batch, bound=self.intensity),
        }

    def apply(self, params: dict, image: torch.Tensor, label: torch.Tensor | None = None):
        """Apply drawn ``params`` to ``image`` (and ``label`` with nearest-neighbour sampling)."""
        theta = affine_theta(params["rotation"], params["scaling"], params["translation"], image.shape[2:])
        theta = theta.to(image.device, image.dtype)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        out = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        noise_gen = torch.Generator(device=image.device).manual_seed(int(params["noise_seed"]))
        noise = torch.randn(out.shape, generator=noise_gen, device=image.device, dtype=image.dtype)
        view = (-1,) + (1,) * (image.ndim - 1)
        out = out * params["gain"].to(out).view(view) + params["shift"].to(out).view(view) + self.noise * noise
        if label is None:
            return out
        lab = F.grid_sample(label.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return out, lab.to(label.dtype)

    def __call__(self, image: torch.Tensor, generator: torch.Generator, label: torch.Tensor | None = None):
        return self.apply(self.sample(image.shape[0], generator), image, label)


def affine_theta(rotation: torch.Tensor, scaling: torch.Tensor, translation: torch.Tensor, shape) -> torch.Tensor:
    """(B, 3, 4) sampling matrices for ``F.affine_grid``: rotation about the grid centre (radians,
    (B, 3) Euler x-y-z), per-axis scaling (B, 3) and translation in voxels (B, 3)."""
    cx, cy, cz = [torch.cos(rotation[:, i]) for i in range(3)]
    sx, sy, sz = [torch.sin(rotation[:, i]) for i in range(3)]
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    matrix = rz @ ry @ rx @ torch.diag_embed(1 / scaling)
    # affine_grid's last grid axis (x) indexes the tensor's last dim: reverse to (Z, Y, X) order.
    flip = torch.eye(3)[[2, 1, 0]]
    matrix = flip @ matrix @ flip
    size = torch.tensor(list(shape), dtype=translation.dtype)
    shift = (2 * translation / size).flip(1)  # voxels → normalised [-1, 1] units, (Z, Y, X) order
    return torch.cat([matrix, shift.unsqueeze(2)], dim=2)
