"""Fine-tuning from a model package: starting weights, frozen layers, head rules and mismatches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minipackage import HYPER, RECIPE
from pipeline.common import package
from pipeline.intake.study import study_table
from pipeline.common.errors import InputError
from pipeline.learning.finetune import freeze, freeze_layers, head_keys, source_fold
from pipeline.learning.models import build_model
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train

HEAD = {"head.3.weight", "head.3.bias"}  # simple_cnn's Linear


def fine_tune(study, out, target="age", task="regression", fold="fold-1", recipe=RECIPE, **hyper):
    table = study_table(study / "manifest.tsv", study / "splits.tsv", study / "derivatives", fold, ["T1w"])
    init = {"package": study / "package" / "model", "recipe": recipe, "fold": fold}
    settings = {**HYPER, "epochs": 1, "init_from": "lab/brainage:1", **hyper}
    return train(table, target, task, TrainSettings.of(settings), out, channels=["T1w"], init=init)["state_dict"]


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
    train(table, "height", "regression", TrainSettings.of({**HYPER, "epochs": 1, "freeze": True}), tmp_path,
          channels=["T1w"], init=init)
    assert "the package's outputs mean regression of 'age', this study's regression of 'height'" in capsys.readouterr().err


def test_a_new_head_starts_as_the_linear_probe_of_the_pretrained_features(mini_study, capsys):
    """Another target: the new head is the ridge fit of the normalised target on the package's
    pooled features of the training images, exactly (what fine-tuning then starts from)."""
    from sklearn.linear_model import RidgeCV

    from pipeline.learning.coder import TargetCoder
    from pipeline.learning.finetune import initialise

    table = study_table(mini_study / "manifest.tsv", mini_study / "splits.tsv", mini_study / "derivatives", "fold-1",
                        ["T1w"])
    rows = table[table["split"] == "train"]
    height = rows["age"].to_numpy(float) * 0.5 + 100.0
    coder = TargetCoder("regression", mean=float(height.mean()), std=float(height.std()))
    y = coder.encode(height)
    hyper = {**HYPER, "model": "simple_cnn", "model_args": {"channels": [4, 8]}, "freeze": False, "head_init": "probe", "package_head": "keep"}
    model = initialise(build_model("simple_cnn", 1, 1, channels=[4, 8]), mini_study / "package" / "model",
                       TrainSettings.of(hyper), coder, "height", ["T1w"], RECIPE, "fold-1",
                       probe=(rows["array"].tolist(), y)).eval()
    assert "new head fitted on the pre-trained features of" in capsys.readouterr().err
    x = torch.from_numpy(np.stack([np.load(a) for a in rows["array"]]).astype(np.float32))
    features = []
    model.head[3].register_forward_pre_hook(lambda module, inputs: features.append(inputs[0]))
    with torch.no_grad():
        out = model(x)[:, 0].numpy()
    expected = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(features[0].numpy(), y.numpy()).predict(features[0].numpy())
    np.testing.assert_allclose(out, expected, atol=1e-4)
    random_head = initialise(build_model("simple_cnn", 1, 1, channels=[4, 8]), mini_study / "package" / "model",
                             TrainSettings.of({**hyper, "head_init": "random"}), coder, "height", ["T1w"], RECIPE,
                             "fold-1",
                             probe=(rows["array"].tolist(), y)).eval()
    assert not torch.equal(random_head.head[3].weight, model.head[3].weight)


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
    """config train.init_from: the registry_fetch rule leaves a verified package where train reads it."""
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


BINS = list(range(3, 83, 2))  # 40 soft-label age bins, SFCN-style


def binned_package(mini_study, tmp_path):
    from minipackage import with_outputs

    return with_outputs(mini_study / "package" / "model", tmp_path / "binned", 40, output={"type": "bins", "bins": BINS})


def test_a_package_of_40_age_bins_keeps_its_head_and_predicts_their_expected_value(mini_study, tmp_path, capsys):
    """An age study from a package of 40 soft-label age bins keeps the bins (package_head: keep):
    it trains their expected value, its model.pt and its exported ensemble predict it."""
    from pipeline.learning.saved import load_model
    from pipeline.sharing.export import Ensemble

    binned = binned_package(mini_study, tmp_path)
    start = package.load(binned).state_dict("fold-1")
    table = study_table(mini_study / "manifest.tsv", mini_study / "splits.tsv", mini_study / "derivatives", "fold-1",
                        ["T1w"])
    init = {"package": binned, "recipe": RECIPE, "fold": "fold-1"}
    settings = TrainSettings.of({**HYPER, "epochs": 2, "init_from": "lab/sfcn:1", "freeze": "features"})
    tuned = train(table, "age", "regression", settings,
                  tmp_path / "out", channels=["T1w"], init=init)["state_dict"]
    assert "new head" not in capsys.readouterr().err
    assert tuned["head.3.weight"].shape == (40, 8) and not torch.equal(tuned["head.3.weight"], start["head.3.weight"])
    model, coder, _ = load_model(tmp_path / "out" / "model.pt")
    assert coder.bins == BINS and coder.task == "regression"
    x = torch.from_numpy(np.stack([np.load(a) for a in table["array"][:3]]))
    with torch.no_grad():
        logits = model(x)
        expected = (torch.softmax(logits, 1) * torch.tensor(BINS, dtype=torch.float32)).sum(1)
        assert np.allclose(coder.decode(logits), expected.numpy(), atol=1e-5)
        assert torch.allclose(Ensemble([model], [coder])(x).squeeze(1), expected, atol=1e-5)
    # training read the expected value as a z-score: its recorded MAE is the decoded one's
    history = __import__("pandas").read_csv(tmp_path / "out" / "history.tsv", sep="\t")
    assert np.isfinite(history["val_mae"]).all() and (history["val_mae"] < 40).all()


def test_package_head_new_replaces_40_age_bins_with_one_regression_output(mini_study, tmp_path, capsys):
    """package_head: new → one scalar: the head is replaced, the reason printed, the backbone kept."""
    binned = binned_package(mini_study, tmp_path)
    start = package.load(binned).state_dict("fold-1")
    table = study_table(mini_study / "manifest.tsv", mini_study / "splits.tsv", mini_study / "derivatives", "fold-1",
                        ["T1w"])
    init = {"package": binned, "recipe": RECIPE, "fold": "fold-1"}
    settings = TrainSettings.of({**HYPER, "epochs": 1, "init_from": "lab/sfcn:1", "freeze": "features",
                                 "package_head": "new"})
    tuned = train(table, "age", "regression", settings,
                  tmp_path / "out", channels=["T1w"], init=init)["state_dict"]
    log = capsys.readouterr().err
    assert "new head (head.3.bias, head.3.weight from random weights): config train.package_head is new" in log
    assert tuned["head.3.weight"].shape == (1, 8)
    backbone = [k for k in start if k.startswith("features") and not k.endswith("num_batches_tracked")]
    assert backbone and all(torch.equal(start[k], tuned[k]) for k in backbone)


def test_frozen_batchnorm_normalises_with_the_package_statistics_in_training():
    """A BatchNorm layer whose parameters are frozen stays in eval mode when training starts."""
    from pipeline.learning.trainer import train_mode

    network = build_model("sfcn", 1, 1, channels=[4, 4, 4])
    freeze_layers(network, ["features"])
    train_mode(network)
    norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    frozen = [m for m in norms if not any(p.requires_grad for p in m.parameters())]
    assert frozen and not any(m.training for m in frozen)
    assert all(m.training for m in norms if m not in frozen) and network.training


def test_freeze_by_layer_name(mini_study, tmp_path, capsys):
    start = package.load(mini_study / "package" / "model").state_dict("fold-1")
    tuned = fine_tune(mini_study, tmp_path, freeze=["features.0"])
    assert "training only features.1.0.weight" in capsys.readouterr().err
    first = [k for k in start if k.startswith("features.0.") and not k.endswith("num_batches_tracked")]
    assert any(k.endswith("running_mean") for k in first) and all(torch.equal(start[k], tuned[k]) for k in first)
    assert not torch.equal(start["features.1.0.weight"], tuned["features.1.0.weight"])
    model = build_model("simple_cnn", 1, 1, channels=[4, 8])
    with pytest.raises(InputError, match=r"train.freeze \['feature'\] names no layer of the network; its layers "
                                         r"with parameters: features, features.0.0, features.0.1"):
        freeze_layers(model, ["feature"])  # matched at dots, not as text
    with pytest.raises(InputError, match="freezes every parameter"):
        freeze_layers(model, ["features", "head"])
    with pytest.raises(InputError, match=r"freezes head.3.bias, head.3.weight, the new head"):
        fine_tune(mini_study, tmp_path / "cls", target="group", task="classification", freeze=["head"])


def test_backbone_lr_factor_gives_the_head_and_the_backbone_their_own_learning_rates(mini_study, tmp_path):
    from pipeline.learning.coder import TargetCoder
    from pipeline.learning.process import Process
    from pipeline.learning.trainer import build_trainer

    hyper = TrainSettings.of({**HYPER, "init_from": "lab/brainage:1", "backbone_lr_factor": 0.1})
    trainer = build_trainer(hyper, 1, TargetCoder("regression"), Process.start("cpu"), lambda network: network)
    head, backbone = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.network.named_parameters()}
    assert (head["name"], head["lr"], backbone["name"], backbone["lr"]) == ("head", 0.01, "backbone", 0.001)
    assert sorted(names[id(p)] for p in head["params"]) == ["head.3.bias", "head.3.weight"]
    assert len(backbone["params"]) == len(names) - 2
    plain = build_trainer(TrainSettings.of({**HYPER, "init_from": "lab/brainage:1"}), 1, TargetCoder("regression"),
                          Process.start("cpu"), lambda network: network)
    assert len(plain.optimizer.param_groups) == 1  # factor 1: one group, as before

    fine_tune(mini_study, tmp_path, epochs=2, backbone_lr_factor=0.25)  # the schedule keeps the ratio
    groups = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[1]["lr"] == pytest.approx(0.25 * groups[0]["lr"]) and groups[0]["initial_lr"] == 0.01
    with pytest.raises(InputError, match="backbone_lr_factor is 0.5, .* but train.init_from is null"):
        table = study_table(mini_study / "manifest.tsv", mini_study / "splits.tsv", mini_study / "derivatives",
                            "fold-1", ["T1w"])
        train(table, "age", "regression", TrainSettings.of({**HYPER, "backbone_lr_factor": 0.5}), tmp_path / "scratch",
              channels=["T1w"])


def test_the_config_check_refuses_fine_tuning_keys_without_a_package(tmp_path):
    from pipeline.check import check

    base = {"bids_dir": str(tmp_path), "target": "age", "task": "regression"}
    with pytest.raises(InputError) as refused:
        check({**base, "train": {"freeze": "features", "variants": {"slow": {"backbone_lr_factor": 0.1}}}})
    message = str(refused.value)
    assert "config `train` sets freeze 'features', which freezes a package's pre-trained layers, but " \
           "`train.init_from` is null" in message
    assert "config `train.variants.slow` sets backbone_lr_factor 0.1" in message
    check({**base, "train": {"init_from": "lab/brainage:1", "freeze": ["features.0"], "backbone_lr_factor": 0.1}})
    with pytest.raises(InputError, match=r"train.backbone_lr_factor.*0"):
        check({**base, "train": {"init_from": "lab/brainage:1", "backbone_lr_factor": 0}})
