"""Train one model on the preprocessed arrays: augmentation, early stopping, exact resume.

Writes ``model.pt`` (best weights on validation loss + everything needed to use them),
``history.tsv`` (one row per epoch), ``hyperparameters.json`` (the resolved settings),
TensorBoard logs, and ``checkpoints/last.pt`` from which an interrupted run resumes exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pipeline.augment import Augmentation
from pipeline.data import TargetCoder, load_batch, study_table
from pipeline.errors import InputError
from pipeline.models import build_model

DEFAULTS = {
    "model": "simple_cnn", "model_args": {}, "epochs": 40, "batch_size": 8, "learning_rate": 1e-3,
    "weight_decay": 1e-4, "patience": 10, "seed": 0, "augmentation": {}, "init_from": None, "freeze": False,
}


def resolve(hyper: dict) -> dict:
    """Hyperparameters with defaults filled in; unknown keys are an error naming them."""
    unknown = set(hyper) - set(DEFAULTS)
    if unknown:
        raise InputError(f"Unknown training setting(s) {sorted(unknown)} in config `train`; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **hyper}


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; make torch deterministic; return the data-order generator."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    return torch.Generator().manual_seed(seed)


def loss_fn(task: str):
    return torch.nn.CrossEntropyLoss() if task == "classification" else torch.nn.MSELoss()


def run_epoch(model, table: pd.DataFrame, labels: torch.Tensor, coder: TargetCoder, batch_size: int,
              optimizer=None, augment: Augmentation | None = None, generator: torch.Generator | None = None):
    """One pass over ``table``; trains when ``optimizer`` is given. Returns (mean loss, metric, outputs)
    over the images seen: in training, a last batch of a single image is dropped (BatchNorm cannot
    train on one image) and its row of ``outputs`` is NaN."""
    training = optimizer is not None
    model.train(training)
    order = torch.randperm(len(table), generator=generator) if training else torch.arange(len(table))
    if training and len(order) % batch_size == 1:
        order = order[:-1]
    criterion, total = loss_fn(coder.task), 0.0
    outputs = torch.full((len(table), coder.outputs), float("nan"))
    paths = table["array"].tolist()
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x, y = load_batch([paths[i] for i in idx]), labels[idx]
        if augment is not None:
            x = augment(x, generator)
        with torch.set_grad_enabled(training):
            out = model(x)
            loss = criterion(out if coder.task == "classification" else out.squeeze(1), y)
        if training:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        total += float(loss) * len(idx)
        outputs[idx] = out.detach()
    return total / len(order), metric(coder, outputs[order], labels[order]), outputs


def metric(coder: TargetCoder, outputs: torch.Tensor, labels: torch.Tensor) -> float:
    """MAE in target units (regression) or accuracy (classification)."""
    if coder.task == "classification":
        return float((outputs.argmax(1) == labels).float().mean())
    return float(((outputs.squeeze(1) - labels).abs() * coder.std).mean())


def fingerprint(hyper: dict, table: pd.DataFrame) -> str:
    """Identifies a training run: settings, images, targets, splits and the package's code.
    A checkpoint resumes only on a match."""
    code = "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("*.py")))
    content = json.dumps(hyper, sort_keys=True) + table[["image_id", "split", "array"]].to_csv() + code
    return hashlib.sha256(content.encode()).hexdigest()


def train(table: pd.DataFrame, target: str, task: str, hyper: dict, out_dir: Path, threads: int = 1,
          classes: list[str] | None = None, channels: list[str] | None = None, init: dict | None = None) -> dict:
    """Train on ``table`` (study_table rows of one fold); write the outputs into ``out_dir``; return
    the model record. ``classes`` is the recorded class list of a classification target;
    ``channels`` names the input channels (recorded with the model). ``init`` ({package, recipe,
    fold}) starts from a fetched model package (config ``train.init_from``, ``pipeline.finetune``)."""
    hyper = resolve(hyper)
    torch.set_num_threads(threads)
    generator = seed_everything(hyper["seed"])
    train_rows = table[table["split"] == "train"].reset_index(drop=True)
    val_rows = table[table["split"] == "val"].reset_index(drop=True)
    coder = TargetCoder.fit(task, train_rows[target], classes)
    y_train, y_val = coder.encode(train_rows[target]), coder.encode(val_rows[target])
    shape = list(np.load(train_rows["array"][0], mmap_mode="r").shape)  # (C, X, Y, Z)
    model = build_model(hyper["model"], shape[0], coder.outputs, **hyper["model_args"])
    if hyper["init_from"] and init is None:
        raise InputError(f"train.init_from is {hyper['init_from']!r} but no fetched package was given (--init-from).")
    if init is not None:
        from pipeline.finetune import initialise

        model = initialise(model, init["package"], hyper, coder, target, list(channels or ["T1w"]),
                           init["recipe"], init["fold"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=hyper["learning_rate"], weight_decay=hyper["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=hyper["epochs"])
    augment = Augmentation(**hyper["augmentation"])

    ckpt_dir = out_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    run_id = fingerprint(hyper, table)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "history": []}
    last = ckpt_dir / "last.pt"
    if last.exists():
        saved = torch.load(last, weights_only=True)
        if saved["fingerprint"] == run_id:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            print(f"resuming from {last} after epoch {state['epoch']}", file=sys.stderr)
        else:
            print(f"ignoring {last}: it belongs to different settings or data", file=sys.stderr)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["epoch"] + 1)
    record = {"model": {"name": hyper["model"], "args": hyper["model_args"]}, "target": target,
              "coder": coder.state(), "input_shape": shape,
              "channels": list(channels or ["T1w"])}
    bar = tqdm(range(state["epoch"] + 1, hyper["epochs"] + 1), desc="epochs", file=sys.stderr,
               initial=state["epoch"], total=hyper["epochs"])
    for epoch in bar:
        start = time.perf_counter()
        train_loss, train_metric, _ = run_epoch(model, train_rows, y_train, coder, hyper["batch_size"],
                                                optimizer, augment, generator)
        val_loss, val_metric, _ = run_epoch(model, val_rows, y_val, coder, hyper["batch_size"])
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        name = "accuracy" if task == "classification" else "mae"
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, f"train_{name}": train_metric,
               f"val_{name}": val_metric, "lr": lr, "seconds": time.perf_counter() - start}
        state["history"].append(row)
        for key in ("train_loss", "val_loss", f"train_{name}", f"val_{name}"):
            writer.add_scalar(key.replace("_", "/", 1), row[key], epoch)
        bar.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val_loss:.3f}", **{f"val_{name}": f"{val_metric:.3f}"})
        state["epoch"] = epoch
        if val_loss < state["best_loss"]:
            state["best_loss"], state["best_epoch"] = val_loss, epoch
            torch.save({**record, "state_dict": model.state_dict(), "epoch": epoch, "val_loss": val_loss},
                       ckpt_dir / "best.pt")
        torch.save({"fingerprint": run_id, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                    "torch_rng": torch.get_rng_state(), "state": state}, last)
        if epoch - state["best_epoch"] >= hyper["patience"]:
            print(f"early stopping at epoch {epoch}: no validation improvement for {hyper['patience']} epochs",
                  file=sys.stderr)
            break
    writer.close()

    best = torch.load(ckpt_dir / "best.pt", weights_only=True)
    torch.save(best, out_dir / "model.pt")
    pd.DataFrame(state["history"]).to_csv(out_dir / "history.tsv", sep="\t", index=False)
    (out_dir / "hyperparameters.json").write_text(json.dumps({"target": target, "task": task, **hyper}, indent=2))
    return best


def load_model(path: Path) -> tuple[torch.nn.Module, TargetCoder, dict]:
    """Rebuild a trained model from ``model.pt`` (tensors and plain types only, no pickled code)."""
    record = torch.load(path, weights_only=True, map_location="cpu")
    coder = TargetCoder(**record["coder"])
    model = build_model(record["model"]["name"], record["input_shape"][0], coder.outputs, **record["model"]["args"])
    model.load_state_dict(record["state_dict"])
    return model.eval(), coder, record


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--fold", required=True, help="column of the splits table, e.g. fold-1")
    parser.add_argument("--channels", nargs="+", default=["T1w"], help="input channels, reference first")
    parser.add_argument("--target", required=True)
    parser.add_argument("--task", choices=["regression", "classification"], required=True)
    parser.add_argument("--targets", type=Path, help="ingestion's targets.json (the recorded class list)")
    parser.add_argument("--hyperparameters", default="{}", help="JSON dict (config `train`)")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init-from", type=Path, help="fetched model package to start from (train.init_from)")
    parser.add_argument("--recipe", default="{}", help="JSON: the study's preprocessing recipe (with --init-from)")
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        table = study_table(args.manifest, args.splits, args.preproc_dir, args.fold, args.channels)
        classes = json.loads(args.targets.read_text()).get("classes") if args.targets else None
        init = {"package": args.init_from, "recipe": json.loads(args.recipe), "fold": args.fold} if args.init_from else None
        best = train(table, args.target, args.task, json.loads(args.hyperparameters), args.out_dir, args.threads,
                     classes, args.channels, init)
    print(f"best epoch {best['epoch']} (validation loss {best['val_loss']:.4f})", file=sys.stderr)


if __name__ == "__main__":
    main()
