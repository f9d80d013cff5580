"""Fine-tuning from a model package: starting weights, frozen layers, head rules and mismatches."""

from __future__ import annotations

import pytest
import torch

from minipackage import HYPER, RECIPE
from pipeline.sharing import package
from pipeline.intake.study import study_table
from pipeline.common.errors import InputError
from pipeline.learning.finetune import freeze, head_keys, source_fold
from pipeline.learning.models import build_model
from pipeline.learning.train import train

HEAD = {"head.3.weight", "head.3.bias"}  # simple_cnn's Linear


def fine_tune(study, out, target="age", task="regression", fold="fold-1", recipe=RECIPE, **hyper):
    table = study_table(study / "manifest.tsv", study / "splits.tsv", study / "derivatives", fold, ["T1w"])
    init = {"package": study / "package" / "model", "recipe": recipe, "fold": fold}
    settings = {**HYPER, "epochs": 1, "init_from": "lab/brainage:1", **hyper}
    return train(table, target, task, settings, out, channels=["T1w"], init=init)["state_dict"]


def test_head_is_the_layer_whose_shape_follows_the_outputs():
    assert head_keys("simple_cnn", {"channels": [4, 8]}, 1) == HEAD
    assert head_keys("sfcn", {"channels": [4, 4, 4]}, 1) == {"classifier.2.weight", "classifier.2.bias"}
    assert [source_fold(f"fold-{k}", ["fold-1", "fold-2"]) for k in (1, 2, 3)] == ["fold-1", "fold-2", "fold-1"]


def test_fine_tuning_changes_the_weights_it_starts_from(mini_study, tmp_path):
    start = package.load(mini_study / "package" / "model").state_dict("fold-2")
    tuned = fine_tune(mini_study, tmp_path, fold="fold-2")
    changed = [k for k in start if not torch.equal(start[k], tuned[k])]
    assert set(changed) >= HEAD and "features.0.0.weight" in changed
    scratch = build_model("simple_cnn", 1, 1, channels=[4, 8]).state_dict()
    assert all(k in tuned and tuned[k].shape == scratch[k].shape for k in scratch)


def test_freeze_trains_only_the_last_layer_and_keeps_the_packaged_head(mini_study, tmp_path, capsys):
    start = package.load(mini_study / "package" / "model").state_dict("fold-1")
    tuned = fine_tune(mini_study, tmp_path, freeze=True)
    assert capsys.readouterr().err.count("new head") == 0
    # BatchNorm's num_batches_tracked counts forward passes; with momentum 0 the statistics ignore it.
    frozen = [k for k in start if k not in HEAD and not k.endswith("num_batches_tracked")]
    assert any(k.endswith("running_var") for k in frozen)
    assert all(torch.equal(start[k], tuned[k]) for k in frozen)  # frozen: the package's, bit for bit
    assert not torch.equal(start["head.3.weight"], tuned["head.3.weight"])  # trained from the package's head
    assert (tuned["head.3.weight"] - start["head.3.weight"]).abs().max() < 0.1


def test_a_different_number_of_classes_gets_a_new_head(mini_study, tmp_path, capsys):
    start = package.load(mini_study / "package" / "model").state_dict("fold-1")
    tuned = fine_tune(mini_study, tmp_path, target="group", task="classification", freeze=2)
    log = capsys.readouterr().err
    assert "new head (head.3.bias, head.3.weight from random weights): the package has 1 output(s)" in log
    assert "this study 3 (classification of 'group' into ['a', 'b', 'c'])" in log
    assert tuned["head.3.weight"].shape == (3, 8) and start["head.3.weight"].shape == (1, 8)
    assert all(torch.equal(start[k], tuned[k]) for k in start if k not in HEAD and not k.startswith("features.1.1")
               and not k.endswith("num_batches_tracked"))


def test_the_same_outputs_with_another_meaning_get_a_new_head(mini_study, tmp_path, capsys):
    """One output in both, but the study predicts another column: the head starts afresh."""
    study = mini_study
    table = study_table(study / "manifest.tsv", study / "splits.tsv", study / "derivatives", "fold-1", ["T1w"])
    table["height"] = table["age"]
    init = {"package": study / "package" / "model", "recipe": RECIPE, "fold": "fold-1"}
    train(table, "height", "regression", {**HYPER, "epochs": 1, "freeze": True}, tmp_path, channels=["T1w"], init=init)
    assert "the package's outputs mean regression of 'age', this study's regression of 'height'" in capsys.readouterr().err


def test_architecture_and_preprocessing_mismatches_name_both(mini_study, tmp_path):
    with pytest.raises(InputError, match=r"simple_cnn \{'channels': \[4, 8\]\} on channels \['T1w'\], this study "
                                         r"simple_cnn \{'channels': \[4, 16\]\}"):
        fine_tune(mini_study, tmp_path, model_args={"channels": [4, 16]})
    with pytest.raises(InputError, match=r"resolution: package 4\.0, study 8\.0; shape: package \[16, 16, 16\], "
                                         r"study \[20, 24, 20\]"):
        fine_tune(mini_study, tmp_path, recipe={**RECIPE, "resolution": 8.0, "shape": [20, 24, 20]})


def test_freeze_keeps_batchnorm_statistics():
    model = build_model("sfcn", 1, 1, channels=[4, 4, 4])
    trainable = freeze(model, 1)
    assert trainable == ["classifier.2"]
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    model.train()
    model(torch.randn(2, 1, 16, 16, 16))
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["classifier.2.weight", "classifier.2.bias"]
    with pytest.raises(InputError, match="leaves nothing frozen"):
        freeze(build_model("simple_cnn", 1, 1), 99)


def test_the_workflow_fetches_the_package_to_start_from(mini_study, small_bids, tmp_path):
    """config train.init_from: the fetch_init rule leaves a verified package where train reads it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from pipeline.sharing import registry
    from pipeline.sharing.apply import SNAKEFILE

    registry.register(mini_study / "package" / "model", "lab/brainage:3", str(tmp_path / "registry"))
    config = {"bids_dir": str(small_bids), "target": "age", "task": "regression", "results_dir": "results",
              "registry": str(tmp_path / "registry"), "train": {"init_from": "lab/brainage:3", "freeze": True}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--configfile", "config.yaml",
                          "--cores", "1", "results/init/lab/brainage/3/checksums.sha256"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert package.load(tmp_path / "results" / "init" / "lab" / "brainage" / "3").spec["target"] == "age"
