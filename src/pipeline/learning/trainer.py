"""The pieces of one training run (network, optimiser, schedule, loss scaler, weight average,
sampler, augmentation) and its two passes: ``train_epoch`` and ``validate``."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from pipeline.common.errors import InputError
from pipeline.learning.augment import Augmentation, select
from pipeline.learning.coder import TargetCoder
from pipeline.learning.loader import ArrayLoader
from pipeline.learning.losses import (SEGMENTATION, balanced_accuracy, balanced_weights, class_sums, loss_fn,
                                      mean_dice, metric, metric_sum, task_loss)
from pipeline.learning.models import REGISTRY, build_model
from pipeline.learning.process import Process, image_batches
from pipeline.learning.sampler import ImageModel, Sampler, SegmentationModel, build_sampler
from pipeline.learning.settings import TrainSettings


def train_mode(model: torch.nn.Module) -> None:
    """``model.train()``, except that a BatchNorm layer whose parameters are all frozen
    (``train.freeze``) stays in eval mode: it normalises with the package's running statistics in
    training as in evaluation, not with the statistics of each small batch, so the layers after
    it (a new head above all) learn from the features they will be evaluated on."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            own = list(module.parameters(recurse=False))
            if own and not any(p.requires_grad for p in own):
                module.eval()


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
    class_weights: torch.Tensor | None = None  # (K,) training cross-entropy weights (train.class_weights)

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
        """One optimisation pass; returns mean loss and metric over the views seen (classification:
        also ``balanced_accuracy``), steps, and the fraction of the pass spent waiting for data.
        ``targets`` None: the loader's label images."""
        train_mode(self.model)
        weights = None if self.class_weights is None else self.class_weights.to(self.process.device)
        criterion, sampler, device = loss_fn(self.coder.task, weights), self.local_sampler(), self.process.device
        classes = self.coder.outputs if self.coder.task == "classification" else 0
        batches = image_batches(len(loader.paths), batch_size, generator, self.process.world)
        # Every process draws every batch's augmentation and view seed, so generators stay in step
        # whatever each process's share; views (slices, patches, sub-batch order) come from a
        # generator per batch and process.
        params = [self.augment.sample(len(b), generator) for b in batches]
        view_seeds = torch.randint(0, 2**62, (len(batches),), generator=generator).tolist()
        shares = [self.process.share(torch.arange(len(b))) for b in batches]
        sums = torch.zeros(3 + 2 * classes, dtype=torch.float64)  # loss, metric, views[, per-class sums]
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
                loss = task_loss(criterion, self.coder, out, vy)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.averaged is not None:
                    self.averaged.update_parameters(self.network)
                sums[:3] += torch.tensor([float(loss.detach()) * len(vy), metric_sum(self.coder, out, vy), len(vy)],
                                         dtype=torch.float64)
                if classes:
                    sums[3:] += class_sums(out, vy, classes)
                steps += 1
        seconds = time.perf_counter() - start
        sums = self.process.all_sum(sums)
        loss_sum, metric_total, views = sums[:3].tolist()
        result = {"loss": loss_sum / max(views, 1), "metric": metric_total / max(views, 1), "steps": steps,
                  "data_wait": (loader.wait_seconds - wait0) / max(seconds, 1e-9)}
        if classes:
            result["balanced_accuracy"] = balanced_accuracy(sums[3:3 + classes], sums[3 + classes:])
        return result

    @torch.no_grad()
    def validate(self, loader: ArrayLoader, targets: torch.Tensor | None, batch_size: int) -> dict:
        """Image-level loss and metric on the validation images (slice and patch models: the mean of
        each image's view outputs); every process predicts its share, outputs are summed.
        Classification with class weights (``train.class_weights: balanced``): the loss is weighted
        by the validation set's own balanced weights, i.e. the mean over classes of each class's
        mean cross-entropy, so that answering the validation set's majority class cannot lower it;
        ``balanced_accuracy`` is returned too.
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
        classification = self.coder.task == "classification"
        weights = balanced_weights(targets, self.coder.outputs) if classification and self.class_weights is not None \
            else None
        loss = task_loss(loss_fn(self.coder.task, weights), self.coder, outputs, targets)
        result = {"loss": float(loss), "metric": metric(self.coder, outputs, targets)}
        if classification:
            sums = class_sums(outputs, targets, self.coder.outputs)
            result["balanced_accuracy"] = balanced_accuracy(sums[:self.coder.outputs], sums[self.coder.outputs:])
        return result

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
                sums += torch.tensor([float(task_loss(criterion, self.coder, out[k:k + 1], lab[k:k + 1])),
                                      float(mean_dice(out[k:k + 1], lab[k:k + 1]).sum())], dtype=torch.float64)
        loss, dice = (self.process.all_sum(sums) / n).tolist()
        return {"loss": loss, "metric": dice}


EMA_WARMUP = 10  # the decay of update t is at most (1 + t) / (EMA_WARMUP + t)


def warm_decay(decay: float, t: int) -> float:
    """The moving average's decay at its update ``t`` (``AveragedModel.n_averaged``: 1 at the first
    update after the copy of the starting weights)."""
    return min(decay, (1 + t) / (EMA_WARMUP + t))


def warm_ema(decay: float):
    """``torch.optim.swa_utils.get_ema_multi_avg_fn`` with a warm-up (``train.ema_warmup``): the
    decay of update t is ``warm_decay(decay, t)``, so the average forgets the random start within
    a few steps; after about 10 / (1 − decay) updates it is the plain moving average."""

    @torch.no_grad()
    def update(ema_params, current_params, num_averaged) -> None:
        d = warm_decay(decay, int(num_averaged))
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, 1 - d)
        else:
            for p_ema, p_model in zip(ema_params, current_params, strict=True):
                p_ema.copy_(p_ema * d + p_model * (1 - d))

    return update


def sampler_config(sampler: Sampler) -> dict:
    return {"kind": sampler.kind, **dataclasses.asdict(sampler)}


def build_trainer(settings: TrainSettings, in_channels: int, coder: TargetCoder, process: Process,
                  initialise: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                  train_labels: torch.Tensor | None = None) -> Trainer:
    """From ``settings`` (config ``train``): network (``initialise``d, e.g. from a model package;
    DDP-wrapped with several processes), AdamW (fine-tuning with ``train.backbone_lr_factor`` != 1:
    the head's and the backbone's parameter groups, ``pipeline.learning.finetune.parameter_groups``),
    cosine schedule, loss scaler.
    Classification with ``train.class_weights: balanced``: the cross-entropy weights of the
    training class indices ``train_labels`` (``balanced_weights``)."""
    sampler = build_sampler(settings.sampler)
    if settings.model in REGISTRY:
        kind = REGISTRY[settings.model].task  # "image" or "segmentation"
        wanted = SEGMENTATION if coder.task == SEGMENTATION else "image"
        if kind != wanted:
            what = "a segmentation network" if kind == SEGMENTATION else "an image-level (regression/classification) network"
            raise InputError(f"config `train.model` {settings.model!r} is {what}; config `task: {coder.task}` needs "
                             f"one of: {', '.join(n for n, s in sorted(REGISTRY.items()) if s.task == wanted)}")
    try:
        network = build_model(settings.model, in_channels, coder.outputs, sampler.spatial_dims, **settings.model_args)
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
    parameters = network.parameters()
    if initialise is not None and settings.backbone_lr_factor != 1:  # fine-tuning: a slower pre-trained backbone
        from pipeline.learning.finetune import head_keys, parameter_groups

        head = head_keys(settings.model, settings.model_args, in_channels)
        parameters = parameter_groups(network, head, settings.learning_rate, settings.backbone_lr_factor)
        print("learning rates: " + ", ".join(f"{g['name']} {g['lr']:g}" for g in parameters), file=sys.stderr)
    optimizer = torch.optim.AdamW(parameters, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs)
    amp = bool(settings.amp) and process.device.type == "cuda"
    scaler = torch.amp.GradScaler(process.device.type, enabled=amp)
    augmentation = Augmentation(**settings.augmentation)
    averaged = None
    if settings.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        update = warm_ema(settings.ema) if settings.ema_warmup else get_ema_multi_avg_fn(settings.ema)
        averaged = AveragedModel(network, multi_avg_fn=update, use_buffers=True)
    weights = None
    if coder.task == "classification" and settings.class_weights == "balanced" and train_labels is not None:
        weights = balanced_weights(train_labels, coder.outputs)
        print("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(coder.classes, weights.tolist())),
              file=sys.stderr)
    return Trainer(model, network, optimizer, scheduler, scaler, coder, sampler, augmentation, process, amp, averaged,
                   weights)
