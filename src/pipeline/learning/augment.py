"""Random augmentation as batched tensor operations on the training device.

Images are (B, C, X, Y, Z) float tensors of the study grid, z-scored; label images are
(B, 1, X, Y, Z) integer tensors. Each random transform only *samples* parameters (``sample``,
on the CPU from a seeded generator, so draws do not depend on the device); ``apply`` is
deterministic given them and runs wherever the image is, so one draw is shared by an image and
its label image (labels resampled nearest-neighbour) and every draw can be recorded. Parameters
are dicts of (B, ...) tensors: ``select(params, index)`` takes the draws of some images.

``Augmentation`` composes the transforms the config turns on, spatial first (one resampling),
then intensity. ``preview(image, n, png)`` on any transform writes a PNG grid of ``n`` draws
(nitrain's ``transform.sample``): ``bids-deepstudy augment ARRAY.npy --out preview.png``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.common import atomic
from pipeline.common.config import defaults
from pipeline.learning.resample import affine_resample, over_threads

Params = dict[str, torch.Tensor]


def uniform(generator: torch.Generator, *shape, low: float = -1.0, high: float = 1.0) -> torch.Tensor:
    """Uniform draws in [low, high) from ``generator`` (CPU)."""
    return torch.rand(*shape, generator=generator) * (high - low) + low


def per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values as a (B, 1, 1, 1, 1) tensor on ``like``'s device and dtype."""
    return values.to(like.device, like.dtype).view(-1, *(1,) * (like.ndim - 1))


def select(params, index):
    """The draws of images ``index`` (a slice, list or tensor) from nested (B, ...) parameters."""
    if isinstance(params, dict):
        return {k: select(v, index) for k, v in params.items()}
    return params[index]


class RandomTransform:
    """A random transform: ``sample`` draws parameters, ``apply`` uses them deterministically."""

    spatial = False  # spatial transforms move label images too

    def sample(self, batch: int, generator: torch.Generator) -> Params:
        raise NotImplementedError

    def apply(self, params: Params, image: torch.Tensor, label: torch.Tensor | None = None):
        raise NotImplementedError

    def __call__(self, image: torch.Tensor, generator: torch.Generator, label: torch.Tensor | None = None):
        return self.apply(self.sample(image.shape[0], generator), image, label)

    def preview(self, image, n: int, png: Path, seed: int = 0, axis: int = 2) -> Path:
        """Write a PNG of the middle slice (along ``axis``) of a (C, X, Y, Z) image and ``n`` draws."""
        return preview_grid(self, image, n, Path(png), seed, axis)


class IntensityTransform(RandomTransform):
    """Changes image intensities only: ``apply`` returns the label unchanged."""

    def apply(self, params, image, label=None):
        out = self.transform(params, image)
        return out if label is None else (out, label)

    def transform(self, params: Params, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class RandomAffine(RandomTransform):
    """Rotation (deg, each axis), scaling (fraction, each axis), translation (voxels, each axis),
    shear (factor, each off-diagonal pair) about the grid centre, and flips along ``flip`` axes
    (each with probability 1/2); one trilinear resampling, zero padding."""

    rotation: float = 0.0
    scaling: float = 0.0
    translation: float = 0.0
    shear: float = 0.0
    flip: tuple[int, ...] = ()
    spatial = True

    def sample(self, batch, generator):
        flips = torch.ones(batch, 3)
        draws = torch.rand(batch, 3, generator=generator) < 0.5
        for axis in self.flip:
            flips[:, axis] = torch.where(draws[:, axis], -1.0, 1.0)
        return {"rotation": uniform(generator, batch, 3) * math.radians(self.rotation),
                "scaling": 1 + uniform(generator, batch, 3) * self.scaling,
                "translation": uniform(generator, batch, 3) * self.translation,
                "shear": uniform(generator, batch, 3) * self.shear,
                "flip": flips}

    def apply(self, params, image, label=None):
        theta = affine_theta(params["rotation"], params["scaling"], params["translation"], image.shape[2:],
                             params.get("shear"), params.get("flip"))
        out = affine_resample(image, theta)
        if label is None:
            return out
        return out, affine_resample(label.to(image.dtype), theta, "nearest").round().to(label.dtype)


@dataclass(frozen=True)
class RandomNoise(IntensityTransform):
    """Additive Gaussian noise of standard deviation ``sd`` (z-score units); one seed per image,
    so an image's noise does not depend on the batch it is in (nor on the thread that draws it)."""

    sd: float = 0.05

    def sample(self, batch, generator):
        return {"seed": torch.randint(0, 2**31 - 1, (batch,), generator=generator)}

    def transform(self, params, image):
        noise = torch.empty_like(image)
        seeds = params["seed"].tolist()

        def draw(first, stop):
            for i in range(first, stop):
                generator = torch.Generator(device=image.device).manual_seed(seeds[i])
                noise[i].normal_(0.0, self.sd, generator=generator).add_(image[i])
        over_threads(draw, len(seeds), image.device.type == "cpu")
        return noise


@dataclass(frozen=True)
class RandomIntensity(IntensityTransform):
    """Random gain 1 ± ``range`` and shift ± ``range`` (z-score units), per image."""

    range: float = 0.1

    def sample(self, batch, generator):
        return {"gain": 1 + uniform(generator, batch) * self.range, "shift": uniform(generator, batch) * self.range}

    def transform(self, params, image):
        return torch.addcmul(per_image(params["shift"], image), image, per_image(params["gain"], image))


@dataclass(frozen=True)
class RandomGamma(IntensityTransform):
    """Contrast change: each image-channel rescaled to [0, 1], raised to gamma = exp(±``log_gamma``),
    and mapped back to its original range."""

    log_gamma: float = 0.3

    def sample(self, batch, generator):
        return {"gamma": torch.exp(uniform(generator, batch) * self.log_gamma)}

    def transform(self, params, image):
        dims = tuple(range(2, image.ndim))
        low, high = image.amin(dim=dims, keepdim=True), image.amax(dim=dims, keepdim=True)
        span = (high - low).clamp_min(1e-6)
        return ((image - low) / span).pow(per_image(params["gamma"], image)) * span + low


@dataclass(frozen=True)
class RandomSmoothing(IntensityTransform):
    """Gaussian blur of standard deviation U(0, ``sigma``) voxels per image (separable convolutions)."""

    sigma: float = 1.0

    def sample(self, batch, generator):
        return {"sigma": uniform(generator, batch, low=0.0) * self.sigma}

    def transform(self, params, image):
        b, c, *spatial = image.shape
        radius = max(1, math.ceil(3 * self.sigma))
        offsets = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
        sigma = params["sigma"].to(image.device, image.dtype).clamp_min(1e-3)
        kernel = torch.exp(-offsets**2 / (2 * sigma[:, None] ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
        out = image.reshape(1, b * c, *spatial)
        for axis in range(len(spatial)):
            shape = [b * c, 1] + [1] * len(spatial)
            shape[2 + axis] = kernel.shape[1]
            padding = [0] * len(spatial)
            padding[axis] = radius
            out = F.conv3d(out, kernel.view(shape), padding=padding, groups=b * c)
        return out.view_as(image)


@dataclass(frozen=True)
class RandomBiasField(IntensityTransform):
    """Smooth multiplicative field exp(polynomial of degree ``order`` in the normalised
    coordinates), coefficients U(±``amplitude``) per image (TorchIO's RandomBiasField model)."""

    amplitude: float = 0.3
    order: int = 3

    def powers(self) -> list[tuple[int, int, int]]:
        return [(i, j, k) for i in range(self.order + 1) for j in range(self.order + 1 - i)
                for k in range(self.order + 1 - i - j)]

    def sample(self, batch, generator):
        return {"coefficients": uniform(generator, batch, len(self.powers())) * self.amplitude}

    def transform(self, params, image):
        axes = [torch.linspace(-1, 1, n, device=image.device, dtype=image.dtype) for n in image.shape[2:]]
        x, y, z = torch.meshgrid(*axes, indexing="ij")
        basis = torch.stack([x**i * y**j * z**k for i, j, k in self.powers()])  # (P, X, Y, Z)
        log_field = torch.einsum("bp,pxyz->bxyz", params["coefficients"].to(image), basis)
        return image * torch.exp(log_field).unsqueeze(1)


@dataclass(frozen=True)
class RandomGhosting(IntensityTransform):
    """Motion-like ghosting: along one random axis per image, every n-th k-space plane (n from
    ``ghosts``) outside the centre is scaled by 1 - U(0, ``intensity``), which adds n - 1 faint
    shifted copies of the image (TorchIO's RandomGhosting model)."""

    intensity: float = 0.5
    ghosts: tuple[int, int] = (4, 10)

    def sample(self, batch, generator):
        return {"axis": torch.randint(0, 3, (batch,), generator=generator),
                "period": torch.randint(self.ghosts[0], self.ghosts[1] + 1, (batch,), generator=generator),
                "strength": uniform(generator, batch, low=0.0) * self.intensity}

    def transform(self, params, image):
        weights = torch.ones(image.shape[0], *image.shape[2:], device=image.device)
        for axis, n in enumerate(image.shape[2:]):
            freq = torch.fft.fftfreq(n, 1 / n, device=image.device).abs().round().long()  # |k|, planes
            period = params["period"].to(image.device)[:, None]
            hit = (freq % period == 0) & (freq > 0) & (params["axis"].to(image.device)[:, None] == axis)
            w = 1 - hit * params["strength"].to(image.device)[:, None]  # (B, n)
            weights = weights * w.view(-1, *[n if a == axis else 1 for a in range(3)])
        spectrum = torch.fft.fftn(image.float(), dim=(2, 3, 4)) * weights.unsqueeze(1)
        return torch.fft.ifftn(spectrum, dim=(2, 3, 4)).real.to(image.dtype)


def _default(key: str):
    return defaults(["train", "augmentation", key])


@dataclass(frozen=True)
class Augmentation(RandomTransform):
    """The study's augmentation (config `train.augmentation`): ranges of the random draws, 0 (or
    an empty ``flip``) turns one off. Rotation (deg), scaling (fraction), translation (voxels),
    shear (factor), flip (axes, each flipped with probability 1/2; none by default: a flip
    mirrors lateralised effects), noise sd and intensity gain/shift (z-score units), smoothing
    (max sigma, voxels), bias_field (max coefficient of the log field), gamma (max |log gamma|),
    ghosting (max k-space plane attenuation, 0-1). Everything is off by default (the measured
    recipe of docs/benchmarks.md, *Learning*)."""

    rotation: float = _default("rotation")
    scaling: float = _default("scaling")
    translation: float = _default("translation")
    shear: float = _default("shear")
    flip: tuple[int, ...] = field(default=tuple(_default("flip")))
    noise: float = _default("noise")
    intensity: float = _default("intensity")
    smoothing: float = _default("smoothing")
    bias_field: float = _default("bias_field")
    gamma: float = _default("gamma")
    ghosting: float = _default("ghosting")

    def __post_init__(self):
        object.__setattr__(self, "flip", tuple(self.flip))
        if any(a not in (0, 1, 2) for a in self.flip):
            raise ValueError(f"augmentation flip axes must be 0, 1 or 2, not {list(self.flip)}")

    def transforms(self) -> dict[str, RandomTransform]:
        """The transforms turned on, in the order they apply: spatial, then intensity."""
        chosen = {
            "affine": RandomAffine(self.rotation, self.scaling, self.translation, self.shear, self.flip)
            if (self.rotation or self.scaling or self.translation or self.shear or self.flip) else None,
            "bias_field": RandomBiasField(self.bias_field) if self.bias_field else None,
            "gamma": RandomGamma(self.gamma) if self.gamma else None,
            "smoothing": RandomSmoothing(self.smoothing) if self.smoothing else None,
            "ghosting": RandomGhosting(self.ghosting) if self.ghosting else None,
            "intensity": RandomIntensity(self.intensity) if self.intensity else None,
            "noise": RandomNoise(self.noise) if self.noise else None,
        }
        return {k: v for k, v in chosen.items() if v is not None}

    def sample(self, batch, generator):
        """Draw parameters for ``batch`` images: {transform name: {parameter: (B, ...) tensor}}."""
        return {name: t.sample(batch, generator) for name, t in self.transforms().items()}

    def apply(self, params, image, label=None):
        """Apply drawn ``params`` to ``image`` (and ``label`` with nearest-neighbour sampling)."""
        for name, t in self.transforms().items():
            if label is None:
                image = t.apply(params[name], image)
            else:
                image, label = t.apply(params[name], image, label)
        return image if label is None else (image, label)


def affine_theta(rotation: torch.Tensor, scaling: torch.Tensor, translation: torch.Tensor, shape,
                 shear: torch.Tensor | None = None, flip: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 3, 4) sampling matrices for ``F.affine_grid``: rotation about the grid centre (radians,
    (B, 3) Euler x-y-z), per-axis scaling (B, 3), translation in voxels (B, 3), shear factors
    (B, 3: xy, xz, yz) and flips (B, 3: ±1). The matrix maps output to input positions."""
    cx, cy, cz = [torch.cos(rotation[:, i]) for i in range(3)]
    sx, sy, sz = [torch.sin(rotation[:, i]) for i in range(3)]
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], 1).view(-1, 3, 3)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], 1).view(-1, 3, 3)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], 1).view(-1, 3, 3)
    matrix = rz @ ry @ rx @ torch.diag_embed(1 / scaling)
    if shear is not None:
        sxy, sxz, syz = shear.unbind(1)
        matrix = matrix @ torch.stack([one, sxy, sxz, zero, one, syz, zero, zero, one], 1).view(-1, 3, 3)
    if flip is not None:
        matrix = matrix @ torch.diag_embed(flip.to(matrix.dtype))
    # affine_grid's last grid axis (x) indexes the tensor's last dim: reverse to (Z, Y, X) order.
    order = torch.eye(3, dtype=matrix.dtype)[[2, 1, 0]]
    matrix = order @ matrix @ order
    size = torch.tensor(list(shape), dtype=translation.dtype)
    shift = (2 * translation / size).flip(1)  # voxels → normalised [-1, 1] units, (Z, Y, X) order
    return torch.cat([matrix, shift.unsqueeze(2).to(matrix.dtype)], dim=2)


def preview_grid(transform: RandomTransform, image, n: int, png: Path, seed: int = 0, axis: int = 2) -> Path:
    """PNG of the middle slice along ``axis`` of channel 0 of a (C, X, Y, Z) image: the original,
    then ``n`` draws of ``transform`` (seeded by ``seed``), in rows of at most 6 panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = torch.as_tensor(np.asarray(image), dtype=torch.float32).unsqueeze(0).repeat(n, 1, 1, 1, 1)
    out = transform(x, torch.Generator().manual_seed(seed))
    panels = [x[0, 0]] + [o[0] for o in out]
    middle = x.shape[2 + axis] // 2
    columns = min(len(panels), 6)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
    vmin, vmax = float(panels[0].min()), float(panels[0].max())
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(panels):
            ax.imshow(panels[i].select(axis, middle).T.numpy(), cmap="gray", origin="lower", vmin=vmin, vmax=vmax)
            ax.set_title("original" if i == 0 else f"draw {i}", fontsize=8)
    fig.suptitle(type(transform).__name__, fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    atomic.savefig(fig, png, dpi=80)
    plt.close(fig)
    return png


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("array", type=Path, help="a preprocessed (C, X, Y, Z) .npy array")
    parser.add_argument("--augmentation", default="{}", help="JSON dict (config `train.augmentation`)")
    parser.add_argument("-n", type=int, default=8, help="number of draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    preview_grid(Augmentation(**json.loads(args.augmentation)), np.load(args.array), args.n, args.out, args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
