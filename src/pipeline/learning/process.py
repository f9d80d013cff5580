"""One training process: its seeds, its place in a (possibly distributed) run, its batches."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.learning.device import deterministic, resolve


def seed_everything(seed: int, device: torch.device = torch.device("cpu")) -> torch.Generator:
    """Seed Python, NumPy and torch; make torch deterministic on ``device`` (strictly on the CPU;
    where PyTorch can on CUDA: ``pipeline.learning.device.deterministic``); return the data-order generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    deterministic(device)
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Process:
    """This process's place in a (possibly distributed) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, device: str = "auto") -> "Process":
        """Join the ``torchrun`` process group when WORLD_SIZE > 1; this process's device from
        config ``device`` (``auto``: its GPU, number ``$LOCAL_RANK``, when the job sees GPUs)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = resolve(device)
        if world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                torch.cuda.set_device(device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            return cls(dist.get_rank(), world, device)
        return cls(0, 1, device)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Element-wise sum over processes (the tensor itself with one process)."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist

        reduced = tensor.to(self.device).clone()
        dist.all_reduce(reduced)
        return reduced.to(tensor.device)

    def share(self, index: torch.Tensor) -> torch.Tensor:
        """This process's contiguous share of ``index`` (equal shares: ``index`` divides evenly in training)."""
        return index.tensor_split(self.world)[self.rank]


def image_batches(n: int, batch_size: int, generator: torch.Generator | None, world: int = 1) -> list[torch.Tensor]:
    """Index batches of one epoch: shuffled by ``generator`` (training) or in order (None).
    Training batches are trimmed to a multiple of ``world`` images (equal shares per process),
    and a batch left with fewer than 2 images (BatchNorm cannot train on one) is dropped."""
    if generator is None:
        return list(torch.arange(n).split(batch_size))
    batches = []
    for batch in torch.randperm(n, generator=generator).split(batch_size):
        batch = batch[:len(batch) - len(batch) % world]
        if len(batch) >= max(2, world):
            batches.append(batch)
    return batches
