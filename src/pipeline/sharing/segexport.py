"""What a segmentation study's package adds to the common format (``pipeline.sharing.export``).

``spec.json`` records the label names (index = label value), how a fold's network is applied to
a whole image (``inference``: the sampler's views and how ``SegmentationModel`` reassembles
their logits), and the ensemble rule (``segmentation.majority``). ``model.onnx`` holds the
*networks*, not the reassembly: input ``image``, one batch of views (B, C, *view) — 2D slices
(B, C, X, Y) with the axis moved out, 3D patches or whole images (B, C, X, Y, Z) — and output
``logits`` (folds, B, K, *view), each fold's network on the same views. Parity is checked the way
the image-level export checks it: ONNX Runtime against PyTorch on every prediction view of the
study's test images, one image at a time, max abs difference of the logits ≤ 1e-4 — on every view
whose input varies. A constant view (a slice or patch wholly outside the brain mask, all zeros)
is ill-conditioned: instance normalisation divides its (zero) spread by sqrt(eps), so rounding
noise of ~1e-8 reaches the logits as ~1e-2 in any runtime (PyTorch itself, with another batch
size). Those views are counted and their largest difference and label agreement recorded, not
held to the tolerance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.common.errors import InputError
from pipeline.learning.loader import load_batch
from pipeline.learning.sampler import SegmentationModel
from pipeline.sharing import onnxcheck
from pipeline.common.package import ONNX

ENSEMBLE = ("voxel-wise majority vote of the folds' label maps (each fold's argmax over its logits); "
            "ties go to the lowest label")


class FoldNetworks(nn.Module):
    """Every fold's network on one batch of views: (B, C, *view) → (folds, B, K, *view) logits."""

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        return torch.stack([network(views) for network in self.networks])


def spec_entries(models: list[nn.Module], names: list[str]) -> dict:
    """The segmentation entries of ``spec.json``: ``labels`` ({value: name}), ``inference`` and ``ensemble``."""
    model = models[0]
    if not isinstance(model, SegmentationModel):
        raise InputError(f"A segmentation package needs segmentation networks; this fold's model is "
                         f"{type(model).__name__}. Retrain with `task: segmentation`.")
    return {"labels": dict(enumerate(names)), "inference": model.inference(), "ensemble": ENSEMBLE}


def test_views(model: SegmentationModel, array: str) -> torch.Tensor:
    """The prediction views of one preprocessed image (``.npy``) that ``model`` feeds its network."""
    return model.views(load_batch([array]))


def network_onnx(models: list[nn.Module], records: dict, test_arrays: list[str], path: Path) -> dict:
    """Write the folds' networks as ONNX at ``path`` (``FoldNetworks``) and check them on every
    prediction view of the test images; the spec's ``onnx`` entry. InputError above ``onnxcheck.TOLERANCE``."""
    networks = FoldNetworks([m.network for m in models]).eval()
    first = models[0]
    onnxcheck.write(networks, test_views(first, test_arrays[0])[:2], path, "logits", output_batch_axis=1)
    checked = parity(path, networks, (test_views(first, a) for a in test_arrays))
    difference = checked.pop("max_abs_difference")
    if difference > onnxcheck.TOLERANCE:
        raise InputError(f"{path}: ONNX Runtime's logits differ from PyTorch's by {difference:.2g} on the test "
                         f"images' views (tolerance {onnxcheck.TOLERANCE}); the export is not faithful.")
    return {"file": ONNX, "opset": onnxcheck.OPSET, "input": "image", "output": "logits",
            "input_axes": "(batch of views, channel, *view): " + first.inference()["views"],
            "output_axes": "(fold, batch of views, label, *view): logits; labels = argmax over the label axis",
            "max_abs_difference": difference, "checked_on": f"every view of {len(test_arrays)} test images",
            **checked}


def parity(path: Path, networks: FoldNetworks, batches) -> dict:
    """ONNX Runtime against PyTorch on each batch of views: ``max_abs_difference`` over the views
    whose input varies, and for the constant views (module docstring) their count, largest
    difference and the fraction of their voxels whose label (argmax) agrees."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, constant, constant_worst, agree, voxels = 0.0, 0, 0.0, 0, 0
    with torch.no_grad():
        for views in batches:
            ours = networks(views).numpy()
            theirs = session.run(None, {"image": views.numpy()})[0]
            gap = np.abs(ours - theirs).reshape(ours.shape[0], ours.shape[1], -1).max(axis=(0, 2))  # per view
            flat = views.reshape(len(views), -1)
            flat_views = (flat.max(1).values == flat.min(1).values).numpy()
            if (~flat_views).any():
                worst = max(worst, float(gap[~flat_views].max()))
            if flat_views.any():
                constant += int(flat_views.sum())
                constant_worst = max(constant_worst, float(gap[flat_views].max()))
                same = ours.argmax(2)[:, flat_views] == theirs.argmax(2)[:, flat_views]
                agree, voxels = agree + int(same.sum()), voxels + same.size
    return {"max_abs_difference": worst, "constant_views": constant,
            "constant_views_max_abs_difference": constant_worst,
            "constant_views_label_agreement": agree / voxels if voxels else None}
