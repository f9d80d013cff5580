"""The device a stage computes on (config ``device``), and the determinism it asks of PyTorch.

``auto`` is CUDA when the job sees a GPU, else the CPU; ``cpu`` never uses a GPU; ``cuda``
insists on one and fails before any work when the job sees none. Every stage that runs a
network (train, evaluate, explain, predict) resolves the setting first thing, then puts the
network on the device; functions that take a network put their inputs on the network's device
(``model_device``) and bring results back to the CPU, so they need no device argument.

Determinism: on the CPU, PyTorch's deterministic algorithms, strictly (an operation without one
is an error), which with the same threads gives bit-identical reruns. On CUDA,
``torch.use_deterministic_algorithms(True, warn_only=True)``: deterministic kernels wherever
PyTorch has one (cuDNN convolutions, cuBLAS with ``CUBLAS_WORKSPACE_CONFIG``), a warning naming
each operation that has none (e.g. the backward pass of 3D max-pooling and of ``index_add``);
cuDNN's autotuner is off, so the same kernels are chosen on every run.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from pipeline.common.cli import DEVICES
from pipeline.common.errors import InputError


def resolve(setting: str = "auto", local_rank: int | None = None) -> torch.device:
    """The device of config ``device`` (``auto``, ``cpu`` or ``cuda``) for this process: with
    CUDA, GPU ``local_rank`` (default: ``$LOCAL_RANK``, set by ``torchrun``, else 0).
    ``cuda`` without a GPU, or a rank beyond the GPUs the job sees, is an InputError naming the key."""
    if setting not in DEVICES:
        raise InputError(f"config `device` is {setting!r}; choose one of: {', '.join(DEVICES)}.")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        seen = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset"
        raise InputError(f"config `device: cuda` asks for a GPU, but this job sees none (torch "
                         f"{torch.__version__}, torch.cuda.is_available() is False, {seen}). Run the job on a "
                         "GPU node (config `gpu: true` requests one from a cluster profile), or set "
                         "`device: auto` (the GPU when there is one) or `device: cpu`.")
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    if rank >= torch.cuda.device_count():
        raise InputError(f"Process {rank} of this job needs GPU {rank}, but the job sees "
                         f"{torch.cuda.device_count()}; request as many GPUs as processes (config `train.gpus`).")
    return torch.device(f"cuda:{rank}")


def deterministic(device: torch.device) -> None:
    """Ask PyTorch for deterministic algorithms on ``device`` (see the module docstring)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    torch.backends.cudnn.benchmark = False


def for_inference(setting: str = "auto") -> torch.device:
    """The device of an inference stage (evaluate, explain, predict): ``resolve(setting)``, with
    deterministic kernels where PyTorch has them on CUDA. The CPU's settings are left alone, so CPU
    results are those of the code before config ``device`` existed, bit for bit."""
    device = resolve(setting)
    if device.type == "cuda":
        deterministic(device)
    return device


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter or buffer (the CPU for a module without any)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A detached tensor's values as a NumPy array on the CPU (no copy for a CPU tensor)."""
    return tensor.detach().cpu().numpy()


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (timing; nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
