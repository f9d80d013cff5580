"""A package's ONNX file: written with torch's exporter and checked against PyTorch before it ships.

``write`` exports a module (one input ``image``, one output, dynamic batch axes); ``difference``
runs ONNX Runtime and PyTorch on the same inputs and returns the largest absolute difference,
which the export refuses above ``TOLERANCE``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from pipeline.common import atomic

TOLERANCE = 1e-4
OPSET = 17


def write(module: nn.Module, example: torch.Tensor, path: Path, output: str, output_batch_axis: int = 0) -> None:
    """Write ``module`` as ONNX: input ``image`` (batch axis 0 dynamic), output ``output`` (its
    ``output_batch_axis`` dynamic).

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs only the ``onnx`` package
    and exports these networks in a second; torch is pinned, so its deprecation does not bite.
    """
    import warnings

    with warnings.catch_warnings(), atomic.path(path) as tmp:
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and instance-norm training-mode note
        torch.onnx.export(module.eval(), (example,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=[output],
                          dynamic_axes={"image": {0: "batch"}, output: {output_batch_axis: "batch"}})


def difference(path: Path, module: nn.Module, inputs: Iterable[torch.Tensor]) -> float:
    """Max |ONNX Runtime − PyTorch| of the output over ``inputs`` (each one call)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            ours = module(x).numpy()
            theirs = session.run(None, {"image": x.numpy()})[0]
            worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst
