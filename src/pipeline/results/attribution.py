"""Attribution maps of one image (captum does the mathematics; this module picks the settings).

Every function takes a model in eval mode, a (1, C, X, Y, Z) image tensor and the index of the
output to attribute, and returns an (X, Y, Z) float32 map on the image's grid (channels summed).
A slice or patch model comes wrapped in ``ImageModel`` (whole images in, the mean over its
prediction views out), so every method sees the same whole-image model as prediction does.
Signed methods (occlusion, integrated gradients, Grad-CAM) keep their sign; gradient and
SmoothGrad are magnitudes.

Device: each method runs on the model's device (``pipeline.learning.device.model_device``; the
image is moved there) and returns its map on the CPU. Occlusion evaluates its windows in batches
of ``batch`` occluded copies (captum's ``perturbations_per_eval``), SmoothGrad its noisy copies in
batches of ``batch``; SmoothGrad's noise is drawn on the CPU, so a seed gives the same noise on
every device. On the CPU the maps are those of the code before devices existed, bit for bit.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Saliency

from pipeline.common import config
from pipeline.common.errors import InputError
from pipeline.learning.device import model_device, to_numpy
from pipeline.learning.sampler import views_of
from pipeline.results.explainconfig import find_layer


@dataclass(frozen=True)
class Settings:
    """Settings of every method (config ``explain``; keys and meanings: config/README.md), built by
    ``of``; intensities in z-score units. ``seed`` (SmoothGrad's noise) is no config key."""

    window: int
    stride: int
    baseline: float
    smoothgrad_samples: int
    smoothgrad_noise: float
    ig_steps: int
    ig_baseline: str | float
    gradcam_layer: str
    occlusion_keep: float
    seed: int = 0

    @classmethod
    def of(cls, explain: Mapping) -> "Settings":
        """The attribution settings of config ``explain``: a key it leaves out is the schema's
        default, an unknown key an InputError naming it."""
        return config.build(cls, ["explain"], explain)


def window_starts(size: int, window: int, stride: int) -> range:
    """Start voxels of the occlusion windows along one axis, as captum places them: every
    ``stride`` from 0 until a window reaches the end (the last one may be cut by the edge)."""
    if window > size:
        raise InputError(f"The occlusion window ({window} voxels) is larger than the image axis ({size}); "
                         "lower `explain.window` in config.")
    return range(0, math.ceil((size - window) / stride) * stride + 1, stride)


@torch.no_grad()
def occlusion(model, x: torch.Tensor, target: int, window: int, stride: int, batch: int = 64,
              baseline: float = 0.0, keep: float = 1.0) -> np.ndarray:
    """Occlusion sensitivity, equal to captum's ``Occlusion`` with a (C, window, window, window)
    sliding window, ``stride`` and ``baseline``: the mean output drop over the windows covering
    a voxel when they are set to the baseline.

    A window whose voxels all equal the baseline already (outside the brain) leaves the input
    unchanged, so its output drop is exactly zero: it is counted but not evaluated (found on a
    CPU copy of the image). The drops are summed on the CPU in float64.

    ``keep`` < 1 is coarse to fine (config ``explain.occlusion_keep``): a first pass with windows
    and stride twice as large (1/8 of the windows) ranks the fine windows by the coarse map's mean
    |drop| over them, and only the top ``keep`` fraction is evaluated; a voxel that no evaluated
    window covers keeps the coarse value. The cost is about (1/8 + ``keep``) of the full map's.
    """
    shape = x.shape[2:]
    coarse = None
    if keep < 1:  # coarse to fine: the first pass, windows and stride twice as large
        coarse = torch.from_numpy(occlusion(model, x, target, min(2 * window, *shape), 2 * stride, batch, baseline))
    image, x = x.cpu(), x.to(model_device(model))
    reference = model(x)[0, target]
    attribution = torch.zeros(shape, dtype=torch.float64)
    counts = torch.zeros(shape, dtype=torch.float64)
    informative = []
    for corner in itertools.product(*(window_starts(n, window, stride) for n in shape)):
        box = tuple(slice(c, c + window) for c in corner)
        counts[box] += 1
        if (image[(0, slice(None), *box)] != baseline).any():
            informative.append(box)
    if coarse is not None:  # a window left out contributes the coarse map's mean over its box
        estimate = [float(coarse[box].double().mean()) for box in informative]
        ranked = sorted(range(len(informative)), key=lambda k: -abs(estimate[k]))
        kept = ranked[:math.ceil(keep * len(ranked))]
        for k in ranked[len(kept):]:
            attribution[informative[k]] += estimate[k]
        informative = [informative[k] for k in kept]
    for start in range(0, len(informative), batch):
        boxes = informative[start:start + batch]
        occluded = x.repeat(len(boxes), 1, 1, 1, 1)
        for j, box in enumerate(boxes):
            occluded[(j, slice(None), *box)] = baseline
        drops = (reference - model(occluded)[:, target]).double().cpu()
        for drop, box in zip(drops, boxes):
            attribution[box] += drop
    return (attribution / counts).float().numpy()


def gradient(model, x: torch.Tensor, target: int) -> np.ndarray:
    """|d output / d input| (captum ``Saliency``), summed over channels."""
    x = x.to(model_device(model))
    grads = Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    return to_numpy(grads[0].sum(0))


def smoothgrad(model, x: torch.Tensor, target: int, samples: int, noise: float, seed: int = 0,
               batch: int = 8) -> np.ndarray:
    """SmoothGrad: mean |gradient| (captum ``Saliency``) over ``samples`` copies with Gaussian noise
    of sd ``noise``, ``batch`` copies per pass on the model's device. The noise is drawn on the CPU
    from torch's generator seeded with ``seed``, in the order captum's ``NoiseTunnel`` draws it
    (``nt_samples_batch_size=batch``), so on the CPU the map equals NoiseTunnel's and on a GPU it
    sees the same noisy images."""
    device, image = model_device(model), x.detach().cpu()
    torch.manual_seed(seed)
    total = None
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        with torch.no_grad():
            noisy = image.repeat_interleave(n, dim=0) + torch.normal(0, torch.tensor(noise).repeat((n, *image.shape[1:])))
        grads = Saliency(model).attribute(noisy.to(device).requires_grad_(), target=target, abs=True)
        part = grads.view(image.shape[0], n, *grads.shape[1:]).sum(1)
        total = part if total is None else total + part
    return to_numpy((total * 1 / samples)[0].sum(0))


def integrated_gradients(model, x: torch.Tensor, target: int, steps: int, baseline: float | torch.Tensor = 0.0
                         ) -> tuple[np.ndarray, float]:
    """Integrated Gradients from ``baseline`` (a constant or a (1, C, X, Y, Z) image; captum,
    Gauss-Legendre, ``steps``), and the completeness error |sum(attribution) - (f(x) - f(baseline))|
    relative to |f(x) - f(baseline)|.

    With per-image normalisation (instance norm) a network barely changes along the path from a
    constant 0 (a scaled image normalises to the same features), so the constant baseline gives
    meaningless attributions and a large completeness error: use an image, e.g. the training mean.
    """
    device = model_device(model)
    x = x.to(device)
    baseline = baseline.to(device) if torch.is_tensor(baseline) else baseline
    attribution, delta = IntegratedGradients(model).attribute(
        x, baselines=baseline, target=target, n_steps=steps, internal_batch_size=8, return_convergence_delta=True)
    reference = baseline if torch.is_tensor(baseline) else torch.full_like(x, baseline)
    with torch.no_grad():
        change = float(model(x)[0, target] - model(reference)[0, target])
    return to_numpy(attribution[0].sum(0)), abs(float(delta)) / max(abs(change), 1e-12)


def gradcam(model, x: torch.Tensor, target: int, layer: str, relu: bool = True) -> np.ndarray:
    """Grad-CAM on the module named ``layer``: the gradient-weighted activations, upsampled to the
    input grid (captum ``LayerGradCam`` + ``LayerAttribution.interpolate``).

    ``layer`` names a module of the network itself (``features.2``). A slice or patch model
    (``ImageModel``) outputs the mean over its V prediction views: each view's Grad-CAM, divided by
    V and upsampled to the view, goes back where the view lies (``Sampler.place``: slices stacked
    along their axis, overlapping patches averaged), so the map covers the whole image.

    ``relu`` keeps only what raises the output (Grad-CAM's definition, for a class score); for a
    regression output, where lowering the prediction matters as much, pass False (signed map).
    """
    network, sampler, chunk = views_of(model)
    module = find_layer(network, layer)
    views, _ = sampler.prediction_views(x.to(model_device(network)))
    mode = "bilinear" if views.ndim == 4 else "trilinear"
    maps = []
    for part in views.split(chunk):
        cam = LayerGradCam(network, module).attribute(part, target=target, relu_attributions=relu)
        maps.append(LayerAttribution.interpolate(cam, tuple(part.shape[2:]), interpolate_mode=mode).sum(1).detach())
    return to_numpy(sampler.place(torch.cat(maps) / len(views), x.shape[2:]))


@dataclass(frozen=True)
class Method:
    """A registered attribution method: ``signed`` maps keep their sign (mean/t over subjects of the
    signed map); ``run(model, x, target, settings, ig_baseline, classification)`` → (map, diagnostics)."""

    signed: bool
    run: Callable[..., tuple[np.ndarray, dict]]
    description: str


def _integrated_gradients(model, x, target, settings, ig_baseline, classification):
    baseline = ig_baseline if settings.ig_baseline == "train_mean" else float(settings.ig_baseline)
    if baseline is None:
        raise InputError("Integrated gradients from the training mean need that mean image.")
    attribution, error = integrated_gradients(model, x, target, settings.ig_steps, baseline)
    return attribution, {"completeness_error": error}


REGISTRY: dict[str, Method] = {
    "occlusion": Method(True, lambda m, x, t, s, b, c: (occlusion(m, x, t, s.window, s.stride, baseline=s.baseline,
                                                              keep=s.occlusion_keep), {}),
                        "change of the output when a window is filled with the baseline value"),
    "gradient": Method(False, lambda m, x, t, s, b, c: (gradient(m, x, t), {}), "|d output / d input|"),
    "smoothgrad": Method(False, lambda m, x, t, s, b, c: (smoothgrad(m, x, t, s.smoothgrad_samples,
                                                                     s.smoothgrad_noise, s.seed), {}),
                         "mean |gradient| over noisy copies of the image"),
    "integrated_gradients": Method(True, _integrated_gradients, "gradients integrated from a baseline image"),
    "gradcam": Method(True, lambda m, x, t, s, b, c: (gradcam(m, x, t, s.gradcam_layer, relu=c), {}),
                      "class activation of a layer, upsampled (ReLU for classification)"),
}
METHODS = tuple(REGISTRY)
SIGNED = {name: method.signed for name, method in REGISTRY.items()}


def attribute(model, x: torch.Tensor, target: int, methods, settings: Settings,
              ig_baseline: torch.Tensor | None = None, classification: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """The requested ``methods``' maps of one image, and per-method diagnostics (IG's completeness
    error). ``ig_baseline`` is IG's baseline image when ``settings.ig_baseline`` is ``train_mean``;
    Grad-CAM keeps its ReLU for ``classification`` only. Runs on the model's device (``x`` and
    ``ig_baseline`` are moved there once); the maps come back on the CPU."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise InputError(f"Unknown explanation method(s) {unknown} in `explain.methods`; choose from {list(METHODS)}.")
    device = model_device(model)
    x = x.to(device)
    ig_baseline = ig_baseline.to(device) if ig_baseline is not None else None
    maps, diagnostics = {}, {}
    for method in methods:
        maps[method], found = REGISTRY[method].run(model, x, target, settings, ig_baseline, classification)
        diagnostics.update(found)
    return {m: a.astype(np.float32) for m, a in maps.items()}, diagnostics
