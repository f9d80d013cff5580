"""A trained model on disk (``model.pt``, or a fold of a model package) as a network again.

``model.pt`` holds tensors and plain types only; nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.learning.coder import TargetCoder
from pipeline.learning.losses import SEGMENTATION
from pipeline.learning.models import build_model, recorded_args
from pipeline.learning.sampler import ImageModel, SegmentationModel, build_sampler


def rebuild(architecture: dict, in_channels: int, outputs: int, sampler: dict | None, state_dict,
            segmentation: bool = False) -> torch.nn.Module:
    """A trained network in eval mode from its recorded ``architecture`` ({name, args, spatial_dims}),
    ``sampler`` and weights. Slice and patch models come wrapped in ``ImageModel``: they take whole
    (B, C, X, Y, Z) images and return the mean of their outputs over each image's views.
    ``segmentation`` networks come wrapped in ``SegmentationModel``: whole images → (B, K, X, Y, Z) logits."""
    network = build_model(architecture["name"], in_channels, outputs, architecture.get("spatial_dims", 3),
                          **recorded_args(architecture["name"], architecture["args"]))
    network.load_state_dict(state_dict)
    views = build_sampler(sampler)
    if segmentation:
        return SegmentationModel(network, views).eval()
    model = network if views.kind == "image" else ImageModel(network, views)
    return model.eval()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, TargetCoder, dict]:
    """Rebuild a trained model from ``model.pt`` (tensors and plain types only, no pickled code),
    in eval mode on ``device``."""
    record = torch.load(path, weights_only=True, map_location="cpu")
    coder = TargetCoder(**record["coder"])
    model = rebuild(record["model"], record["input_shape"][0], coder.outputs, record.get("sampler"),
                    record["state_dict"], segmentation=coder.task == SEGMENTATION)
    return model.to(device), coder, record


def package_coder(pkg, fold: str) -> TargetCoder:
    """The target coder of one fold of a model package (``pipeline.common.package.Package``)."""
    return TargetCoder(**pkg.normalisation["target"][fold])


def package_model(pkg, fold: str, device: torch.device | str = "cpu") -> torch.nn.Module:
    """One fold of a model package as a network in eval mode on ``device``, its weights loaded; a
    segmentation package's comes wrapped in ``SegmentationModel``, as ``load_model`` wraps the study's."""
    return rebuild(pkg.spec["architecture"], pkg.spec["input"]["shape"][0], pkg.spec["outputs"],
                   pkg.spec.get("sampler"), pkg.state_dict(fold),
                   segmentation=pkg.spec["task"] == SEGMENTATION).to(device)


def predicting_expected_value(model: torch.nn.Module, coder) -> torch.nn.Module:
    """A soft-label bins network (an imported SFCN, or a study fine-tuned from one) made to output
    its prediction, the expected value over the bins (B, 1), so its maps explain the predicted
    value rather than the first bin; module names stay as they are (Grad-CAM's layer). Other
    networks are returned as they are."""
    if coder.bins:
        centres = torch.tensor(coder.bins, dtype=torch.float32)
        model.register_forward_hook(
            lambda module, inputs, out: (torch.softmax(out, dim=1) * centres.to(out.device)).sum(1, keepdim=True))
    return model
