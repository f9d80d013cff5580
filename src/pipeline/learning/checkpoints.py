"""Checkpoints of a training run: what identifies the run, every random state, exact resumption."""

from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.locations import code_files
from pipeline.learning.settings import TrainSettings
from pipeline.learning.trainer import Trainer


def fingerprint(settings: TrainSettings, table: pd.DataFrame) -> str:
    """Identifies a training run: settings (config ``train``, as the dict ``settings.asdict()``),
    images, targets, splits and the package's code. A checkpoint resumes only on a match."""
    code = "".join(p.read_text() for p in code_files())
    columns = ["image_id", "split", "array", *(["label_array"] if "label_array" in table else [])]
    content = json.dumps(settings.asdict(), sort_keys=True) + table[columns].to_csv() + code
    return hashlib.sha256(content.encode()).hexdigest()


def rng_states(generator: torch.Generator) -> dict:
    """Every random state a run draws from, as tensors and plain types."""
    np_state = np.random.get_state(legacy=False)
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {**np_state, "state": {k: torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v
                                            for k, v in np_state["state"].items()}}}


def set_rng_states(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = states["numpy"]
    np.random.set_state({**np_state, "state": {k: v.numpy() if torch.is_tensor(v) else v
                                               for k, v in np_state["state"].items()}})


def save_atomic(obj, path: Path) -> None:
    """torch.save through a temporary file, so a kill mid-write never leaves a truncated checkpoint."""
    atomic.torch_save(obj, path)


def resume(trainer: Trainer, last: Path, run_id: str, generator: torch.Generator, state: dict) -> dict:
    """Restore ``last.pt`` into the trainer when it belongs to this run; return the run state."""
    if not last.exists():
        return state
    saved = torch.load(last, weights_only=True, map_location="cpu")  # optimizer state follows its parameters
    if saved["fingerprint"] != run_id:
        print(f"ignoring {last}: it belongs to different settings, data or code", file=sys.stderr)
        return state
    trainer.network.load_state_dict(saved["model"])
    trainer.optimizer.load_state_dict(saved["optimizer"])
    trainer.scheduler.load_state_dict(saved["scheduler"])
    trainer.scaler.load_state_dict(saved["scaler"])
    if trainer.averaged is not None:
        trainer.averaged.load_state_dict(saved["averaged"])
    set_rng_states(saved["rng"], generator)
    print(f"resuming from {last} after epoch {saved['state']['epoch']}", file=sys.stderr)
    return saved["state"]


def checkpoint(trainer: Trainer, run_id: str, generator: torch.Generator, state: dict) -> dict:
    return {"fingerprint": run_id, "model": trainer.network.state_dict(), "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
            "rng": rng_states(generator), "state": state,
            **({"averaged": trainer.averaged.state_dict()} if trainer.averaged is not None else {})}
