"""Train one fold's model on the preprocessed arrays.

Tasks: regression and classification of an image-level target, and segmentation (``task:
segmentation``): the target is each image's preprocessed label image, read with it, augmented
with the same draws (nearest neighbour) and cut into the same slices or patches; a segmentation
network (``unet``) is trained with MONAI's DiceCELoss (softmax, one-hot target) and validated
on whole images by the mean Dice of the labels other than 0 (background).

Classification weights the cross-entropy by class (``train.class_weights: balanced``, the
default): each training class gets weight n / (K · n_c), so a network that answers the majority
class is not rewarded for it, and the validation loss that selects the checkpoint is the mean over
classes of each class's mean cross-entropy (``Trainer.validate``), which an unbalanced validation
set cannot lower by favouring its majority class.

Writes ``model.pt`` (best weights on validation loss, or on validation Dice for segmentation,
+ everything needed to use them; tensors
and plain types only), ``history.tsv`` (one row per epoch, rewritten after each: losses,
metrics — classification: accuracy and balanced accuracy —, learning rate, seconds, optimisation
steps and ``data_wait``, the fraction of the epoch's training time spent waiting for data),
``hyperparameters.json`` (the resolved settings; classification: the class weights used),
``diagnostics.json`` (``pipeline.learning.curves.training``: did the network fit, did validation diverge),
TensorBoard logs, an MLflow run with ``tracking: mlflow`` (``pipeline.learning.tracking``), and ``checkpoints/last.pt``
and ``best.pt``. An interrupted run resumes exactly from ``last.pt`` (weights, optimizer,
scheduler, loss scaler, every RNG state, epoch, early-stopping state) when settings, data and
code are unchanged: it ends with the weights an uninterrupted run would have.

One process, or several through ``torchrun`` (DistributedDataParallel; NCCL on GPUs, gloo on
CPUs): every process draws the same data order and augmentation parameters, trains on its
share of each batch and validates its share of the validation images; process 0 writes.
On CPU the same config, seed and thread count give bit-identical weights; on CUDA, PyTorch's
deterministic kernels where it has them (``pipeline.learning.device``). ``amp: true`` trains
with float16 autocast and loss scaling on CUDA (no effect on CPU). ``--device`` is config
``device``: ``auto`` trains on the GPU when the job sees one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.common import atomic
from pipeline.common.cli import add_config, add_device, add_fold, channel_names
from pipeline.common.errors import InputError
from pipeline.intake.study import study_table
from pipeline.learning.checkpoints import checkpoint, fingerprint, resume, save_atomic
from pipeline.learning.coder import TargetCoder
from pipeline.learning import device as devices
from pipeline.learning.loader import ArrayLoader
from pipeline.learning.losses import SEGMENTATION
from pipeline.learning.models import resolved_args
from pipeline.learning.process import Process, seed_everything
from pipeline.learning.settings import TrainSettings
from pipeline.learning.tracking import MlflowTarget, Trackers
from pipeline.learning.trainer import build_trainer, sampler_config


def train(table: pd.DataFrame, target: str, task: str, settings: TrainSettings, out_dir: Path, threads: int = 1,
          classes: list[str] | None = None, channels: list[str] | None = None, init: dict | None = None,
          on_epoch_end: Callable[[int], None] | None = None, mlflow: MlflowTarget | None = None,
          device: str = "auto") -> dict:
    """Train on ``table`` (study_table rows of one fold); write the outputs into ``out_dir``; return
    the model record. ``settings``: config ``train`` (one variant's). ``classes`` is the recorded
    class list of a classification target; ``channels`` names the input channels (recorded with
    the model). ``init`` ({package, recipe, fold}) starts from a fetched model package (config
    ``train.init_from``, ``pipeline.learning.finetune``). ``on_epoch_end(epoch)`` is called after
    each epoch's checkpoint is written. ``mlflow``: where the run goes with ``tracking: mlflow``
    (default: a store of its own in ``out_dir/mlflow``). ``device``: config ``device``
    (``pipeline.learning.device.resolve``); ``hyperparameters.json`` records the one used."""
    torch.set_num_threads(threads)
    process = Process.start(device)
    generator = seed_everything(settings.seed, process.device)
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
        bins = None
        if init is not None and settings.package_head == "keep":
            from pipeline.learning.finetune import package_bins

            bins = package_bins(init["package"], task, target)  # a kept soft-label bins head
        coder = TargetCoder.fit(task, train_rows[target], classes, bins)
        y_train, y_val = coder.encode(train_rows[target]), coder.encode(val_rows[target])
        labels = {"train": None, "val": None}
    train_loader = ArrayLoader(train_rows["array"].tolist(), labels["train"], prefetch=settings.prefetch,
                               pin_memory=pin, recycle=True)
    val_loader = ArrayLoader(val_rows["array"].tolist(), labels["val"], prefetch=settings.prefetch,
                             pin_memory=pin, recycle=True)
    shape = list(train_loader.arrays[0].shape)  # (C, X, Y, Z)
    if settings.init_from and init is None:
        raise InputError(f"train.init_from is {settings.init_from!r} but no fetched package was given (--init-from).")
    if settings.backbone_lr_factor != 1 and init is None:
        raise InputError(f"train.backbone_lr_factor is {settings.backbone_lr_factor}, which slows the pre-trained "
                         "layers of a package, but train.init_from is null: set init_from, or the factor to 1.")
    from_package = None
    if init is not None:
        from pipeline.learning.finetune import initialise

        def from_package(network):
            probe = (train_rows["array"].tolist(), y_train) if settings.sampler["kind"] == "image" else None
            return initialise(network, init["package"], settings, coder, target, list(channels or ["T1w"]),
                              init["recipe"], init["fold"], probe)
    trainer = build_trainer(settings, shape[0], coder, process, from_package, y_train)

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_id = fingerprint(settings, table)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "history": []}
    last = ckpt_dir / "last.pt"
    state = resume(trainer, last, run_id, generator, state)
    trackers = Trackers(out_dir, settings, state, enabled=process.main, mlflow=mlflow)
    record = {"model": {"name": settings.model, "args": resolved_args(settings.model, settings.model_args),
                        "spatial_dims": trainer.sampler.spatial_dims},
              "sampler": sampler_config(trainer.sampler), "target": target, "coder": coder.state(),
              "input_shape": shape, "channels": list(channels or ["T1w"])}
    name = {"classification": "accuracy", SEGMENTATION: "dice"}.get(task, "mae")
    bar = tqdm(range(state["epoch"] + 1, settings.epochs + 1), desc="epochs", file=sys.stderr,
               initial=state["epoch"], total=settings.epochs, disable=not process.main)
    for epoch in bar:
        start = time.perf_counter()
        fit = trainer.train_epoch(train_loader, y_train, settings.batch_size, generator,
                                  progress=process.main and sys.stderr.isatty())
        val = trainer.validate(val_loader, y_val, settings.batch_size)
        lr = trainer.optimizer.param_groups[0]["lr"]
        trainer.scheduler.step()
        row = {"epoch": epoch, "train_loss": fit["loss"], "val_loss": val["loss"], f"train_{name}": fit["metric"],
               f"val_{name}": val["metric"], "lr": lr, "seconds": time.perf_counter() - start,
               "steps": fit["steps"], "data_wait": fit["data_wait"]}
        if task == "classification":
            row.update(train_balanced_accuracy=fit["balanced_accuracy"], val_balanced_accuracy=val["balanced_accuracy"])
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
        if epoch - state["best_epoch"] >= settings.patience and epoch >= settings.min_epochs:
            print(f"early stopping at epoch {epoch}: no validation improvement for {settings.patience} epochs",
                  file=sys.stderr)
            break
    trackers.close()
    train_loader.close()
    val_loader.close()
    majority = {name: float(rows[target].astype(str).value_counts(normalize=True).max())
                for name, rows in (("train", train_rows), ("val", val_rows))} if task == "classification" else None
    weights = {} if trainer.class_weights is None else \
        {"class_weight_values": dict(zip(coder.classes, trainer.class_weights.tolist()))}
    return finish(out_dir, ckpt_dir, state, {"target": target, "task": task, **settings.asdict(), **weights,
                                             "sampler": sampler_config(trainer.sampler),
                                             "device": process.device.type, "processes": process.world},
                  process, majority, coder.outputs if task == "classification" else 2)


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
           majority: dict | None = None, classes: int = 2) -> dict:
    """Copy the best checkpoint to ``model.pt``; write history, the resolved hyperparameters
    (``hyper``: what ``hyperparameters.json`` holds, config ``train`` among it) and the
    training diagnostics (``majority``: the most frequent class's share of the training and of the
    validation images, by ``train`` and ``val``; ``classes``: how many classes)."""
    from pipeline.learning import curves

    if process.world > 1:
        import torch.distributed as dist

        dist.barrier()
    best = torch.load(ckpt_dir / "best.pt", weights_only=True)
    if process.main:
        save_atomic(best, out_dir / "model.pt")
        atomic.to_csv(pd.DataFrame(state["history"]), out_dir / "history.tsv", sep="\t", index=False)
        atomic.write_text(out_dir / "hyperparameters.json", json.dumps(hyper, indent=2))
        findings = curves.training(pd.DataFrame(state["history"]), hyper["task"], majority,
                                        epochs=hyper["epochs"], classes=classes)
        atomic.write_text(out_dir / "diagnostics.json", json.dumps({"findings": findings}, indent=2))
    return best


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_fold(parser)
    # target ("label" for segmentation), task, channels, train (this variant's settings), labels
    # (segmentation: label names, index = label value), init ({package, recipe} to fine-tune from, or null)
    add_config(parser)
    parser.add_argument("--targets", type=Path, help="ingestion's targets.json (the recorded class list)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    mlflow = parser.add_argument_group("MLflow (train.tracking: mlflow; $MLFLOW_TRACKING_URI, when set, replaces the store)")
    mlflow.add_argument("--mlflow-store", type=Path, help="the study's file store (default: OUT_DIR/mlflow)")
    mlflow.add_argument("--mlflow-experiment", default="pipeline", help="the study's experiment")
    mlflow.add_argument("--mlflow-run", help="this run's name (default: OUT_DIR's name)")
    add_device(parser)
    args = parser.parse_args(argv)
    cfg, names = args.config, channel_names(args.config)
    with InputError.exit_cleanly():
        devices.resolve(args.device)  # `device: cuda` without a GPU fails before any data is read
        segmentation = cfg["task"] == SEGMENTATION
        table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, names, label=segmentation)
        if segmentation:
            classes = cfg["labels"]
        else:
            classes = json.loads(args.targets.read_text()).get("classes") if args.targets else None
        init = cfg["init"]
        init = {"package": Path(init["package"]), "recipe": init["recipe"], "fold": args.fold} if init else None
        target = MlflowTarget(args.mlflow_store or args.out_dir / "mlflow", args.mlflow_experiment,
                              args.mlflow_run or args.out_dir.name)
        settings = TrainSettings.of(cfg["train"])
        best = train(table, cfg["target"], cfg["task"], settings, args.out_dir, args.threads, classes, names, init,
                     mlflow=target, device=args.device)
    print(f"best epoch {best['epoch']} (validation loss {best['val_loss']:.4f})", file=sys.stderr)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


if __name__ == "__main__":
    main()
