"""Hyperparameter variants: each trained on its own, the lowest validation loss chosen per fold."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from minipackage import HYPER, write_cohort
from pipeline.learning import variants
from pipeline.intake.study import study_table
from pipeline.common.errors import InputError
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train


def test_hyperparameters_apply_a_variants_overrides_and_drop_the_variant_table():
    config = {"epochs": 40, "learning_rate": 1e-3, "variants": {"slow": {"learning_rate": 1e-5}}}
    assert variants.hyperparameters(config, "slow") == {"epochs": 40, "learning_rate": 1e-5}
    assert variants.hyperparameters(config, None) == {"epochs": 40, "learning_rate": 1e-3}
    with pytest.raises(InputError, match=r"no variant 'fast'; known: \['slow'\]"):
        variants.hyperparameters(config, "fast")


def test_check_names_the_variant_and_the_unknown_setting():
    variants.check({"epochs": 4, "variants": {"long": {"epochs": 8}}})
    with pytest.raises(InputError, match=r"train.variants.long sets unknown training setting\(s\) \['epoch'\]"):
        variants.check({"epochs": 4, "variants": {"long": {"epoch": 8}}})


def test_select_copies_the_variant_with_the_lowest_validation_loss(tmp_path):
    manifest, splits, preproc = write_cohort(tmp_path)
    table = study_table(manifest, splits, preproc, "fold-1", ["T1w"])
    fold_dir = tmp_path / "train" / "fold-1"
    config = {**HYPER, "variants": {"frozen": {"learning_rate": 1e-9}, "learns": {"epochs": 6}}}
    for name in config["variants"]:
        settings = TrainSettings.of(variants.hyperparameters(config, name))
        train(table, "age", "regression", settings, fold_dir / f"variant-{name}")
    chosen = variants.select(fold_dir, ["frozen", "learns"])

    summary = pd.read_csv(fold_dir / "variants.tsv", sep="\t").set_index("variant")
    losses = {name: pd.read_csv(fold_dir / f"variant-{name}" / "history.tsv", sep="\t")["val_loss"].min()
              for name in ("frozen", "learns")}
    assert chosen == min(losses, key=losses.get) == summary.index[summary["chosen"]][0]
    assert summary["best_val_loss"].to_dict() == pytest.approx(losses, rel=1e-5)
    source = fold_dir / f"variant-{chosen}"
    assert (fold_dir / "model.pt").read_bytes() == (source / "model.pt").read_bytes()
    assert (fold_dir / "history.tsv").read_text() == (source / "history.tsv").read_text()
    hyper = json.loads((fold_dir / "hyperparameters.json").read_text())
    assert hyper["variant"] == chosen and hyper["epochs"] == (6 if chosen == "learns" else HYPER["epochs"])
    assert not list(fold_dir.glob(".*tmp*"))


def test_segmentation_variants_are_chosen_by_validation_dice_as_their_checkpoints_were(tmp_path):
    """Variant ``a`` has the lower validation loss, ``b`` the higher Dice: segmentation picks ``b``,
    at the epoch of its best Dice (where its checkpoint was kept)."""
    histories = {"a": {"epoch": [1, 2], "val_loss": [0.30, 0.20], "val_dice": [0.70, 0.72]},
                 "b": {"epoch": [1, 2], "val_loss": [0.25, 0.40], "val_dice": [0.81, 0.78]}}
    for name, history in histories.items():
        (tmp_path / f"variant-{name}").mkdir()
        pd.DataFrame(history).to_csv(tmp_path / f"variant-{name}" / "history.tsv", sep="\t", index=False)
    table = variants.summary(tmp_path, ["a", "b"]).set_index("variant")
    assert table.index[table["chosen"]].tolist() == ["b"]
    assert table.at["b", "best_epoch"] == 1 and table.at["b", "best_val_dice"] == pytest.approx(0.81)
    assert table.at["a", "best_epoch"] == 2
