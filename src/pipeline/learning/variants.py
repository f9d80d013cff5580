"""Hyperparameter variants (config ``train.variants``): each is trained as its own job; the one with
the best validation score becomes the fold's model, which evaluation and explanation then use.
The score is the criterion each variant's checkpoint was kept by: the lowest validation loss, or
for segmentation the highest validation Dice (``val_dice`` in the history).

The test split plays no part in the choice. ``variants.tsv`` in the fold's folder lists every
variant's best validation loss and epoch and marks the chosen one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config
from pipeline.common.errors import InputError

TRAINED = ("model.pt", "history.tsv", "diagnostics.json", "hyperparameters.json")


def hyperparameters(train: dict, variant: str | None) -> dict:
    """Config ``train`` with ``variant``'s overrides applied (``variants`` itself left out)."""
    base = {k: v for k, v in train.items() if k != "variants"}
    if variant is None:
        return base
    overrides = train["variants"].get(variant)
    if overrides is None:
        raise InputError(f"train.variants has no variant {variant!r}; known: {sorted(train['variants'])}")
    if "variants" in overrides:
        raise InputError(f"train.variants.{variant} may not itself hold `variants`")
    return {**base, **overrides}


def check(train: dict) -> None:
    """Every variant changes only known settings (``train`` as the schema filled it in: all of them)."""
    known = set(train) - {"variants"}
    for name, overrides in train["variants"].items():
        unknown = set(overrides) - known
        if unknown:
            raise InputError(f"config train.variants.{name} sets unknown training setting(s) {sorted(unknown)}; "
                             f"known: {sorted(known)}")


def summary(fold_dir: Path, variants: list[str]) -> pd.DataFrame:
    """One row per variant: its checkpoint's epoch and validation loss (and Dice); ``chosen`` marks
    the lowest loss, or the highest Dice for segmentation (the first listed on a tie)."""
    rows = []
    for name in variants:
        history = pd.read_csv(fold_dir / f"variant-{name}" / "history.tsv", sep="\t")
        if history.empty:
            raise InputError(f"{fold_dir / f'variant-{name}' / 'history.tsv'} has no epochs; retrain that variant.")
        dice = "val_dice" in history
        best = history.loc[history["val_dice"].astype(float).idxmax() if dice else history["val_loss"].astype(float).idxmin()]
        rows.append({"variant": name, "best_val_loss": float(best["val_loss"]), "best_epoch": int(best["epoch"]),
                     "epochs_run": len(history), **({"best_val_dice": float(best["val_dice"])} if dice else {})})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    table.loc[table["best_val_dice"].idxmax() if "best_val_dice" in table else table["best_val_loss"].idxmin(),
              "chosen"] = True
    return table


def select(fold_dir: Path, variants: list[str]) -> str:
    """Copy the best variant's model, history, diagnostics and hyperparameters into ``fold_dir``; write
    ``variants.tsv``; return the chosen variant's name."""
    table = summary(fold_dir, variants)
    chosen = str(table.loc[table["chosen"], "variant"].iloc[0])
    source = fold_dir / f"variant-{chosen}"
    for name in TRAINED[:3]:
        atomic.copyfile(source / name, fold_dir / name)
    hyper = json.loads((source / "hyperparameters.json").read_text())
    atomic.write_text(fold_dir / "hyperparameters.json", json.dumps({**hyper, "variant": chosen}, indent=2))
    atomic.to_csv(table, fold_dir / "variants.tsv", sep="\t", index=False, float_format="%.6g")
    return chosen


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_dir", type=Path, help="results/train/fold-K, holding variant-NAME folders")
    add_config(parser)  # train.variants (the variants, in config order)
    args = parser.parse_args(argv)
    with InputError.exit_cleanly():
        chosen = select(args.fold_dir, list(args.config["train"]["variants"]))
    print(f"{args.fold_dir}: chose variant {chosen}", file=sys.stderr)


if __name__ == "__main__":
    main()
