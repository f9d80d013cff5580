"""Train one fold's model on the preprocessed arrays.

Tasks: regression and classification of an image-level target, and segmentation (``task:
segmentation``): the target is each image's preprocessed label image, read with it, augmented
with the same draws (nearest neighbour) and cut into the same slices or patches; a segmentation
network (``unet``) is trained with MONAI's DiceCELoss (softmax, one-hot target) and validated
on whole images by the mean Dice of the labels other than 0 (background).

Writes ``model.pt`` (best weights on validation loss, or on validation Dice for segmentation,
+ everything needed to use them; tensors
and plain types only), ``history.tsv`` (one row per epoch, rewritten after each: losses,
metrics, learning rate, seconds, optimisation steps and ``data_wait``, the fraction of the
epoch's training time spent waiting for data), ``hyperparameters.json`` (the resolved settings),
``diagnostics.json`` (``pipeline.diagnostics.training``: did the network fit, did validation diverge),
TensorBoard logs, an MLflow file store with ``tracking: mlflow``, and ``checkpoints/last.pt``
and ``best.pt``. An interrupted run resumes exactly from ``last.pt`` (weights, optimizer,
scheduler, loss scaler, every RNG state, epoch, early-stopping state) when settings, data and
code are unchanged: it ends with the weights an uninterrupted run would have.

One process, or several through ``torchrun`` (DistributedDataParallel; NCCL on GPUs, gloo on
CPUs): every process draws the same data order and augmentation parameters, trains on its
share of each batch and validates its share of the validation images; process 0 writes.
On CPU the same config, seed and thread count give bit-identical weights. ``amp: true`` trains
with float16 autocast and loss scaling on CUDA (no effect on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.common import atomic
from pipeline.learning.augment import Augmentation, select
from pipeline.intake.study import study_table
from pipeline.learning.coder import TargetCoder
from pipeline.learning.loader import ArrayLoader
from pipeline.common.errors import InputError
from pipeline.common.locations import code_files
from pipeline.learning.models import REGISTRY, build_model, recorded_args, resolved_args
from pipeline.learning.sampler import ImageModel, Sampler, SegmentationModel, build_sampler

DEFAULTS = {
    "model": "simple_cnn", "model_args": {}, "epochs": 100, "batch_size": 4, "learning_rate": 1e-3,
    "weight_decay": 0.01, "patience": 30, "seed": 0, "augmentation": {}, "sampler": {"kind": "image"},
    "amp": False, "tracking": "none", "prefetch": 2, "init_from": None, "freeze": False, "ema": 0.98,
}


def resolve(hyper: dict) -> dict:
    """Hyperparameters with defaults filled in; unknown keys are an error naming them."""
    unknown = set(hyper) - set(DEFAULTS)
    if unknown:
        raise InputError(f"Unknown training setting(s) {sorted(unknown)} in config `train`; known: {sorted(DEFAULTS)}")
    resolved = {**DEFAULTS, **hyper}
    if resolved["tracking"] not in ("none", "mlflow"):
        raise InputError(f"config `train.tracking` must be 'none' or 'mlflow', not {resolved['tracking']!r}")
    return resolved


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; make torch deterministic; return the data-order generator."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # CUDA lacks deterministic kernels for some backward passes (max-pool 3D): warn there, exact on CPU.
    torch.use_deterministic_algorithms(True, warn_only=torch.cuda.is_available())
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
    def start(cls) -> "Process":
        """Join the ``torchrun`` process group when WORLD_SIZE > 1; pick this process's device."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
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


SEGMENTATION = "segmentation"


def loss_fn(task: str):
    if task == SEGMENTATION:
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)
    return torch.nn.CrossEntropyLoss() if task == "classification" else torch.nn.MSELoss()


def task_loss(criterion, task: str, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if task == SEGMENTATION:  # (B, K, *spatial) logits, (B, 1, *spatial) labels
        return criterion(outputs.float(), targets.long())
    return criterion(outputs.float() if task == "classification" else outputs.float().squeeze(1), targets)


def dice_per_label(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, K - 1) Dice of labels 1..K-1 between the argmax of (B, K, *spatial) logits and
    (B, 1, *spatial) labels (MONAI's compute_dice); NaN where a label is absent from both."""
    from monai.metrics import compute_dice
    from monai.networks.utils import one_hot

    k = outputs.shape[1]
    predicted, true = one_hot(outputs.argmax(1, keepdim=True), k), one_hot(labels.long(), k)
    dice = compute_dice(predicted, true, include_background=False, ignore_empty=False)
    absent = ~(predicted.flatten(2).any(2) | true.flatten(2).any(2))[:, 1:]
    return dice.masked_fill(absent, float("nan"))  # as pipeline.segmentation.label_scores


def mean_dice(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean over labels 1..K-1 of ``dice_per_label`` (labels absent from both left out; 1 if all are,
    e.g. a slice outside the brain)."""
    dice = dice_per_label(outputs, labels)
    return torch.nan_to_num(dice.nanmean(1), nan=1.0)


def metric(coder: TargetCoder, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """MAE in target units (regression), accuracy (classification) or mean Dice (segmentation)."""
    if coder.task == SEGMENTATION:
        return float(mean_dice(outputs, labels).mean())
    if coder.task == "classification":
        return float((outputs.argmax(1) == labels).float().mean())
    return float(((outputs.squeeze(1) - labels).abs() * coder.std).mean())


def metric_sum(coder: TargetCoder, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """Sum over views of the metric (absolute errors in target units, or correct predictions)."""
    return metric(coder, outputs.detach().float(), labels) * len(labels)


@dataclass
class Trainer:
    """The pieces of one training run; ``train_epoch`` and ``validate`` are its two passes."""

    model: torch.nn.Module  # DistributedDataParallel-wrapped when world > 1
    network: torch.nn.Module  # the bare network
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    coder: TargetCoder
    sampler: Sampler
    augment: Augmentation
    process: Process
    amp: bool
    averaged: torch.nn.Module | None = None  # exponential moving average of the weights (train.ema)

    @property
    def evaluated(self) -> torch.nn.Module:
        """The network that is validated and saved: the weights' moving average when there is one."""
        return self.network if self.averaged is None else self.averaged.module

    def autocast(self):
        if self.amp and self.process.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def local_sampler(self) -> Sampler:
        """The sampler with this process's share of each sub-batch."""
        if self.process.world == 1 or not self.sampler.batch_size:
            return self.sampler
        return dataclasses.replace(self.sampler, batch_size=max(1, self.sampler.batch_size // self.process.world))

    def train_epoch(self, loader: ArrayLoader, targets: torch.Tensor | None, batch_size: int,
                    generator: torch.Generator, progress: bool = False) -> dict:
        """One optimisation pass; returns mean loss and metric over the views seen, steps, and the
        fraction of the pass spent waiting for data. ``targets`` None: the loader's label images."""
        self.model.train()
        criterion, sampler, device = loss_fn(self.coder.task), self.local_sampler(), self.process.device
        batches = image_batches(len(loader.paths), batch_size, generator, self.process.world)
        # Every process draws every batch's augmentation and view seed, so generators stay in step
        # whatever each process's share; views (slices, patches, sub-batch order) come from a
        # generator per batch and process.
        params = [self.augment.sample(len(b), generator) for b in batches]
        view_seeds = torch.randint(0, 2**62, (len(batches),), generator=generator).tolist()
        shares = [self.process.share(torch.arange(len(b))) for b in batches]
        sums = torch.zeros(3, dtype=torch.float64)  # loss, metric, views
        steps, start, wait0 = 0, time.perf_counter(), loader.wait_seconds
        reads = loader.batches(b[s].tolist() for b, s in zip(batches, shares))
        for (index, x, lab), p, share, seed in tqdm(zip(reads, params, shares, view_seeds), total=len(batches),
                                                    desc="batches", leave=False, disable=not progress, file=sys.stderr):
            x = x.to(device, non_blocking=True)
            if targets is None:  # label images: the same augmentation draw, nearest neighbour
                x, y = self.augment.apply(select(p, share), x, lab.to(device, non_blocking=True))
            else:
                x, y = self.augment.apply(select(p, share), x), targets[index].to(device)
            views = torch.Generator().manual_seed(seed + self.process.rank)
            for vx, vy in sampler.sub_batches(x, y, views):
                with self.autocast():
                    out = self.model(vx)
                loss = task_loss(criterion, self.coder.task, out, vy)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.averaged is not None:
                    self.averaged.update_parameters(self.network)
                sums += torch.tensor([float(loss.detach()) * len(vy), metric_sum(self.coder, out, vy), len(vy)],
                                     dtype=torch.float64)
                steps += 1
        seconds = time.perf_counter() - start
        loss_sum, metric_total, views = self.process.all_sum(sums).tolist()
        return {"loss": loss_sum / max(views, 1), "metric": metric_total / max(views, 1), "steps": steps,
                "data_wait": (loader.wait_seconds - wait0) / max(seconds, 1e-9)}

    @torch.no_grad()
    def validate(self, loader: ArrayLoader, targets: torch.Tensor | None, batch_size: int) -> dict:
        """Image-level loss and metric on the validation images (slice and patch models: the mean of
        each image's view outputs); every process predicts its share, outputs are summed.
        Segmentation (``targets`` None): each image's whole label map (``SegmentationModel``), the
        mean over images of its loss and mean Dice."""
        self.evaluated.eval()
        if targets is None:
            return self.validate_segmentation(loader, batch_size)
        model = ImageModel(self.evaluated, self.sampler)
        mine = self.process.share(torch.arange(len(targets)))
        outputs = torch.zeros(len(targets), self.coder.outputs, dtype=torch.float64)
        for index, x, _ in loader.batches(mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)):
            with self.autocast():
                outputs[index] = model(x.to(self.process.device, non_blocking=True)).double().cpu()
        outputs = self.process.all_sum(outputs).float()
        loss = task_loss(loss_fn(self.coder.task), self.coder.task, outputs, targets)
        return {"loss": float(loss), "metric": metric(self.coder, outputs, targets)}

    def validate_segmentation(self, loader: ArrayLoader, batch_size: int) -> dict:
        model, criterion = SegmentationModel(self.evaluated, self.sampler), loss_fn(SEGMENTATION)
        n = len(loader.paths)
        mine = self.process.share(torch.arange(n))
        sums = torch.zeros(2, dtype=torch.float64)  # loss, Dice
        for index, x, lab in loader.batches(mine[i:i + batch_size].tolist() for i in range(0, len(mine), batch_size)):
            lab = lab.to(self.process.device)
            with self.autocast():
                out = model(x.to(self.process.device, non_blocking=True)).float()
            for k in range(len(index)):  # per image, as evaluation scores them
                sums += torch.tensor([float(task_loss(criterion, SEGMENTATION, out[k:k + 1], lab[k:k + 1])),
                                      float(mean_dice(out[k:k + 1], lab[k:k + 1]).sum())], dtype=torch.float64)
        loss, dice = (self.process.all_sum(sums) / n).tolist()
        return {"loss": loss, "metric": dice}


def fingerprint(hyper: dict, table: pd.DataFrame) -> str:
    """Identifies a training run: settings, images, targets, splits and the package's code.
    A checkpoint resumes only on a match."""
    code = "".join(p.read_text() for p in code_files())
    columns = ["image_id", "split", "array", *(["label_array"] if "label_array" in table else [])]
    content = json.dumps(hyper, sort_keys=True) + table[columns].to_csv() + code
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


class Trackers:
    """Metrics per epoch: ``history.tsv`` and TensorBoard always, MLflow with ``tracking: mlflow``
    (a file store in ``out_dir/mlflow``, no server: ``mlflow ui --backend-store-uri <it>``)."""

    def __init__(self, out_dir: Path, hyper: dict, state: dict, enabled: bool):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir, self.enabled = out_dir, enabled
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["epoch"] + 1) if enabled else None
        self.mlflow = None
        if enabled and hyper["tracking"] == "mlflow":
            self.mlflow, state["mlflow_run"] = start_mlflow(out_dir, hyper, state.get("mlflow_run"))

    def log(self, row: dict, history: list[dict]) -> None:
        if not self.enabled:
            return
        atomic.to_csv(pd.DataFrame(history), self.out_dir / "history.tsv", sep="\t", index=False)
        epoch = row["epoch"]
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
        if self.mlflow:
            client, run_id = self.mlflow
            for key, value in row.items():
                if key != "epoch":
                    client.log_metric(run_id, key, float(value), step=epoch)

    def close(self) -> None:
        if self.writer:
            self.writer.close()
        if self.mlflow:
            client, run_id = self.mlflow
            client.set_terminated(run_id)


def start_mlflow(out_dir: Path, hyper: dict, run_id: str | None):
    """(client, run id) of this fold's MLflow run in the file store ``out_dir/mlflow``; the run of
    a resumed training continues."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        raise InputError("config `train.tracking: mlflow` needs MLflow: pip install 'mlflow-skinny' "
                         "(the `tracking` extra of this package)") from exc
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # local files, no database or server
    client = MlflowClient(tracking_uri=(out_dir / "mlflow").resolve().as_uri())
    if run_id is None:
        experiment = client.get_experiment_by_name("pipeline") or client.create_experiment("pipeline")
        experiment_id = experiment if isinstance(experiment, str) else experiment.experiment_id
        run_id = client.create_run(experiment_id, run_name=out_dir.name).info.run_id
        for key, value in flatten(hyper).items():
            client.log_param(run_id, key, value)
    return (client, run_id), run_id


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a.b": 1}."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return out


def sampler_config(sampler: Sampler) -> dict:
    return {"kind": sampler.kind, **dataclasses.asdict(sampler)}


def build_trainer(hyper: dict, in_channels: int, coder: TargetCoder, process: Process,
                  initialise: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> Trainer:
    """Network (``initialise``d, e.g. from a model package; DDP-wrapped with several processes),
    AdamW, cosine schedule, loss scaler."""
    sampler = build_sampler(hyper["sampler"])
    if hyper["model"] in REGISTRY:
        kind = REGISTRY[hyper["model"]].task  # "image" or "segmentation"
        wanted = SEGMENTATION if coder.task == SEGMENTATION else "image"
        if kind != wanted:
            what = "a segmentation network" if kind == SEGMENTATION else "an image-level (regression/classification) network"
            raise InputError(f"config `train.model` {hyper['model']!r} is {what}; config `task: {coder.task}` needs "
                             f"one of: {', '.join(n for n, s in sorted(REGISTRY.items()) if s.task == wanted)}")
    try:
        network = build_model(hyper["model"], in_channels, coder.outputs, sampler.spatial_dims, **hyper["model_args"])
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"config `train.model`/`train.model_args`: {exc}") from exc
    if initialise is not None:
        network = initialise(network)
    if process.world > 1 and process.device.type == "cuda":  # BatchNorm statistics over all processes' images
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    network = network.to(process.device)
    model = network
    if process.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(network, device_ids=[process.device.index] if process.device.type == "cuda"
                                        else None)
    optimizer = torch.optim.AdamW(network.parameters(), lr=hyper["learning_rate"], weight_decay=hyper["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hyper["epochs"])
    amp = bool(hyper["amp"]) and process.device.type == "cuda"
    scaler = torch.amp.GradScaler(process.device.type, enabled=amp)
    augmentation = Augmentation(**hyper["augmentation"])
    averaged = None
    if hyper["ema"]:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(hyper["ema"]), use_buffers=True)
    return Trainer(model, network, optimizer, scheduler, scaler, coder, sampler, augmentation, process, amp, averaged)


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


def train(table: pd.DataFrame, target: str, task: str, hyper: dict, out_dir: Path, threads: int = 1,
          classes: list[str] | None = None, channels: list[str] | None = None, init: dict | None = None,
          on_epoch_end: Callable[[int], None] | None = None) -> dict:
    """Train on ``table`` (study_table rows of one fold); write the outputs into ``out_dir``; return
    the model record. ``classes`` is the recorded class list of a classification target;
    ``channels`` names the input channels (recorded with the model). ``init`` ({package, recipe,
    fold}) starts from a fetched model package (config ``train.init_from``, ``pipeline.finetune``).
    ``on_epoch_end(epoch)`` is called after each epoch's checkpoint is written."""
    hyper = resolve(hyper)
    torch.set_num_threads(threads)
    process = Process.start()
    generator = seed_everything(hyper["seed"])
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    val_rows = table[table["split"] == "val"].reset_index(drop=True)
    if len(train_rows) < 2 or val_rows.empty:
        raise InputError(f"Fold has {len(train_rows)} training and {len(val_rows)} validation images; "
                         "training needs at least 2 and 1. Check the split.")
    pin = process.device.type == "cuda"
    if task == SEGMENTATION:
        coder = segmentation_coder(train_rows, classes)
        y_train = y_val = None  # the label images, read by the loaders
        labels = {"train": train_rows["label_array"].tolist(), "val": val_rows["label_array"].tolist()}
    else:
        coder = TargetCoder.fit(task, train_rows[target], classes)
        y_train, y_val = coder.encode(train_rows[target]), coder.encode(val_rows[target])
        labels = {"train": None, "val": None}
    train_loader = ArrayLoader(train_rows["array"].tolist(), labels["train"], prefetch=hyper["prefetch"],
                               pin_memory=pin, recycle=True)
    val_loader = ArrayLoader(val_rows["array"].tolist(), labels["val"], prefetch=hyper["prefetch"],
                             pin_memory=pin, recycle=True)
    shape = list(train_loader.arrays[0].shape)  # (C, X, Y, Z)
    if hyper["init_from"] and init is None:
        raise InputError(f"train.init_from is {hyper['init_from']!r} but no fetched package was given (--init-from).")
    from_package = None
    if init is not None:
        from pipeline.learning.finetune import initialise

        def from_package(network):
            return initialise(network, init["package"], hyper, coder, target, list(channels or ["T1w"]),
                              init["recipe"], init["fold"])
    trainer = build_trainer(hyper, shape[0], coder, process, from_package)

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_id = fingerprint(hyper, table)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "history": []}
    last = ckpt_dir / "last.pt"
    state = resume(trainer, last, run_id, generator, state)
    trackers = Trackers(out_dir, hyper, state, enabled=process.main)
    record = {"model": {"name": hyper["model"], "args": resolved_args(hyper["model"], hyper["model_args"]),
                        "spatial_dims": trainer.sampler.spatial_dims},
              "sampler": sampler_config(trainer.sampler), "target": target, "coder": coder.state(),
              "input_shape": shape, "channels": list(channels or ["T1w"])}
    name = {"classification": "accuracy", SEGMENTATION: "dice"}.get(task, "mae")
    bar = tqdm(range(state["epoch"] + 1, hyper["epochs"] + 1), desc="epochs", file=sys.stderr,
               initial=state["epoch"], total=hyper["epochs"], disable=not process.main)
    for epoch in bar:
        start = time.perf_counter()
        fit = trainer.train_epoch(train_loader, y_train, hyper["batch_size"], generator,
                                  progress=process.main and sys.stderr.isatty())
        val = trainer.validate(val_loader, y_val, hyper["batch_size"])
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.scheduler.step()
        row = {"epoch": epoch, "train_loss": fit["loss"], "val_loss": val["loss"], f"train_{name}": fit["metric"],
               f"val_{name}": val["metric"], "lr": lr, "seconds": time.perf_counter() - start,
               "steps": fit["steps"], "data_wait": fit["data_wait"]}
        state["history"].append(row)
        bar.set_postfix(train_loss=f"{fit['loss']:.3f}", val_loss=f"{val['loss']:.3f}",
                        **{f"val_{name}": f"{val['metric']:.3f}"}, data_wait=f"{fit['data_wait']:.1%}")
        state["epoch"] = epoch
        # The model-selection criterion, lower is better: validation loss, or 1 - mean Dice (segmentation).
        selection = 1.0 - val["metric"] if task == SEGMENTATION else val["loss"]
        improved = selection < state["best_loss"]
        if improved:
            state["best_loss"], state["best_epoch"] = selection, epoch
        if process.main:
            trackers.log(row, state["history"])
            if improved:
                save_atomic({**record, "state_dict": trainer.evaluated.state_dict(), "epoch": epoch,
                             "val_loss": val["loss"]}, ckpt_dir / "best.pt")
            save_atomic(checkpoint(trainer, run_id, generator, state), last)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        if epoch - state["best_epoch"] >= hyper["patience"]:
            print(f"early stopping at epoch {epoch}: no validation improvement for {hyper['patience']} epochs",
                  file=sys.stderr)
            break
    trackers.close()
    train_loader.close()
    val_loader.close()
    majority = float(train_rows[target].astype(str).value_counts(normalize=True).max()) \
        if task == "classification" else None
    return finish(out_dir, ckpt_dir, state, {"target": target, "task": task, **hyper,
                                             "sampler": sampler_config(trainer.sampler)}, process, majority)


def segmentation_coder(train_rows: pd.DataFrame, names: list[str] | None) -> TargetCoder:
    """The coder of a segmentation target: ``classes`` are the label names, index = label value
    (config ``label_image.labels``; else "0".."K-1" with K - 1 the largest training label)."""
    if "label_array" not in train_rows:
        raise InputError("`task: segmentation` needs a label image per sample: set config `label_image` "
                         "(the study table has no label arrays).")
    largest = max(int(np.max(np.load(p, mmap_mode="r"))) for p in train_rows["label_array"])
    if names is None:
        names = [str(k) for k in range(max(largest, 1) + 1)]
    if largest >= len(names):
        raise InputError(f"The training label images hold label {largest}, but config `label_image.labels` names "
                         f"only {len(names)} labels ({', '.join(names)}); name every label value from 0.")
    return TargetCoder(SEGMENTATION, classes=list(names))


def finish(out_dir: Path, ckpt_dir: Path, state: dict, hyper: dict, process: Process,
           majority: float | None = None) -> dict:
    """Copy the best checkpoint to ``model.pt``; write history, resolved hyperparameters and the
    training diagnostics (``majority``: the most frequent training class's share)."""
    from pipeline.results import diagnostics

    if process.world > 1:
        import torch.distributed as dist

        dist.barrier()
    best = torch.load(ckpt_dir / "best.pt", weights_only=True)
    if process.main:
        save_atomic(best, out_dir / "model.pt")
        atomic.to_csv(pd.DataFrame(state["history"]), out_dir / "history.tsv", sep="\t", index=False)
        atomic.write_text(out_dir / "hyperparameters.json", json.dumps(hyper, indent=2))
        findings = diagnostics.training(pd.DataFrame(state["history"]), hyper["task"], majority)
        atomic.write_text(out_dir / "diagnostics.json", json.dumps({"findings": findings}, indent=2))
    return best


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


def load_model(path: Path) -> tuple[torch.nn.Module, TargetCoder, dict]:
    """Rebuild a trained model from ``model.pt`` (tensors and plain types only, no pickled code)."""
    record = torch.load(path, weights_only=True, map_location="cpu")
    coder = TargetCoder(**record["coder"])
    model = rebuild(record["model"], record["input_shape"][0], coder.outputs, record.get("sampler"),
                    record["state_dict"], segmentation=coder.task == SEGMENTATION)
    return model, coder, record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    parser.add_argument("--channels", nargs="+", default=["T1w"], help="input channels, reference first")
    parser.add_argument("--target", required=True)
    parser.add_argument("--task", choices=["regression", "classification", SEGMENTATION], required=True)
    parser.add_argument("--targets", type=Path, help="ingestion's targets.json (the recorded class list)")
    parser.add_argument("--labels", nargs="+", help="segmentation: label names, index = label value "
                        "(config label_image.labels)")
    parser.add_argument("--hyperparameters", default="{}", help="JSON dict (config `train`)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    parser.add_argument("--init-from", type=Path, help="fetched model package to start from (train.init_from)")
    parser.add_argument("--recipe", default="{}", help="JSON: the study's preprocessing recipe (with --init-from)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        segmentation = args.task == SEGMENTATION
        table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, args.channels, label=segmentation)
        if segmentation:
            classes = args.labels
        else:
            classes = json.loads(args.targets.read_text()).get("classes") if args.targets else None
        init = {"package": args.init_from, "recipe": json.loads(args.recipe), "fold": args.fold} if args.init_from else None
        best = train(table, args.target, args.task, json.loads(args.hyperparameters), args.out_dir, args.threads,
                     classes, args.channels, init)
    print(f"best epoch {best['epoch']} (validation loss {best['val_loss']:.4f})", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
