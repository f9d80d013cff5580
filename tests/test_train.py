"""The training engine on a tiny synthetic study (8³ arrays): reproducibility, exact resume,
samplers, tracking and 2-process DistributedDataParallel on CPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.intake.study import study_table
from pipeline.learning.loader import load_batch
from pipeline.results.evaluate import predict
from pipeline.common.paths import derivative_paths
from pipeline.learning.sampler import ImageModel
from pipeline.learning.process import image_batches
from pipeline.learning.saved import load_model
from pipeline.learning.settings import TrainSettings
from pipeline.learning.train import train

SMALL = {"model": "simple_cnn", "model_args": {"channels": [4, 8], "dropout": 0.2}, "batch_size": 4,
         "epochs": 3, "learning_rate": 0.01, "patience": 10, "seed": 3,
         "augmentation": {"rotation": 10, "translation": 1, "noise": 0.1}}


def write_study(root: Path, n_train=8, n_val=4, shape=(1, 8, 8, 8)) -> tuple[Path, Path, Path]:
    """manifest.tsv, splits.tsv and preprocessed arrays whose bright box grows with ``age``."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(n_train + n_val):
        pid, age = f"sub-{k:02d}", 20 + 5 * k
        image = rng.normal(0, 0.3, shape).astype(np.float32)
        image[:, 2:6, 2:6, 2:2 + 1 + k % 5] += 1 + age / 50
        path = derivative_paths(root / "derivatives", pid, pid)["array"]
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, image)
        rows.append({"image_id": pid, "participant_id": pid, "session": "", "subdir": pid, "path": f"{pid}.nii.gz",
                     "age": age, "group": "a" if k % 2 else "b", "fold-1": "train" if k < n_train else "val"})
    table = pd.DataFrame(rows)
    table.drop(columns="fold-1").to_csv(root / "manifest.tsv", sep="\t", index=False)
    table[["image_id", "participant_id", "fold-1"]].to_csv(root / "splits.tsv", sep="\t", index=False)
    return root / "manifest.tsv", root / "splits.tsv", root / "derivatives"


@pytest.fixture
def study(tmp_path):
    manifest, splits, preproc = write_study(tmp_path / "study")
    return study_table(manifest, splits, preproc, "fold-1"), (manifest, splits, preproc)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_same_config_and_seed_give_bit_identical_weights(study, tmp_path):
    table, _ = study
    train(table, "age", "regression", TrainSettings.of(SMALL), tmp_path / "a")
    train(table, "age", "regression", TrainSettings.of(SMALL), tmp_path / "b")
    assert_same_weights(weights(tmp_path / "a" / "model.pt"), weights(tmp_path / "b" / "model.pt"))
    history = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2, 3] and (history["steps"] == 2).all()
    assert history["data_wait"].between(0, 1).all()
    other = train(table, "age", "regression", TrainSettings.of({**SMALL, "seed": 4}), tmp_path / "c")["state_dict"]
    assert not all(torch.equal(other[k], v) for k, v in weights(tmp_path / "a" / "model.pt").items())


class Killed(Exception):
    pass


def kill_after(epoch_to_die: int):
    def hook(epoch):
        if epoch == epoch_to_die:
            raise Killed
    return hook


def test_run_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(study, tmp_path):
    table, _ = study
    hyper = {**SMALL, "epochs": 4}
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "whole")
    with pytest.raises(Killed):
        train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "killed", on_epoch_end=kill_after(2))
    assert not (tmp_path / "killed" / "model.pt").exists()
    torch.manual_seed(123)  # the resumed run must restore every random state itself
    np.random.seed(123)
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "killed")
    assert_same_weights(weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "killed" / "model.pt"))
    last = [torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True) for d in ("whole", "killed")]
    assert_same_weights(last[0]["model"], last[1]["model"])
    h = [pd.read_csv(tmp_path / d / "history.tsv", sep="\t") for d in ("whole", "killed")]
    assert h[0]["val_loss"].tolist() == h[1]["val_loss"].tolist()


def test_weight_averaging_saves_the_average_and_resumes_exactly(study, tmp_path):
    """train.ema: the saved model is the moving average of the weights (BatchNorm statistics
    included), validated as such, and a killed run resumes to the same average."""
    table, _ = study
    hyper = {**SMALL, "epochs": 4, "ema": 0.9, "model_args": {**SMALL["model_args"], "norm": "batch"}}
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "whole")
    with pytest.raises(Killed):
        train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "killed", on_epoch_end=kill_after(2))
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "killed")
    assert_same_weights(weights(tmp_path / "whole" / "model.pt"), weights(tmp_path / "killed" / "model.pt"))
    last = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    averaged = {k.removeprefix("module."): v for k, v in last["averaged"].items() if k.startswith("module.")}
    assert averaged.keys() == last["model"].keys()
    assert not all(torch.equal(averaged[k], last["model"][k]) for k in averaged)  # the average, not the weights
    assert any("running_mean" in k for k in averaged)
    model, coder, record = load_model(tmp_path / "whole" / "model.pt")
    best = pd.read_csv(tmp_path / "whole" / "history.tsv", sep="\t")["val_loss"].min()
    assert record["val_loss"] == pytest.approx(best)


def test_changed_settings_do_not_resume(study, tmp_path, capsys):
    table, _ = study
    train(table, "age", "regression", TrainSettings.of({**SMALL, "epochs": 1}), tmp_path / "run")
    train(table, "age", "regression", TrainSettings.of({**SMALL, "epochs": 1, "learning_rate": 0.02}), tmp_path / "run")
    assert "ignoring" in capsys.readouterr().err


def test_slice_model_trains_on_sub_batches_and_predicts_per_image(study, tmp_path):
    table, _ = study
    hyper = {**SMALL, "epochs": 2, "sampler": {"kind": "slices", "axis": 2, "per_image": 4, "batch_size": 8}}
    record = train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "slices")
    assert record["model"]["spatial_dims"] == 2 and record["sampler"]["kind"] == "slices"
    history = pd.read_csv(tmp_path / "slices" / "history.tsv", sep="\t")
    assert (history["steps"] == 8 * 4 // 8).all()  # n_images × per_image / sub-batch
    model, coder, _ = load_model(tmp_path / "slices" / "model.pt")
    assert isinstance(model, ImageModel)
    test = table[table["split"] == "val"]
    predicted = predict(model, coder, test, "age")["predicted"].to_numpy()
    x = load_batch(test["array"].tolist())  # (4, 1, 8, 8, 8): 8 axial slices each
    with torch.no_grad():
        slices = model.network(x.permute(0, 4, 1, 2, 3).reshape(32, 1, 8, 8))  # image-major
    expected = coder.decode(slices.view(4, 8, 1).mean(1))
    assert np.allclose(predicted, expected, rtol=1e-5)


def test_patch_classifier(study, tmp_path):
    table, _ = study
    hyper = {**SMALL, "epochs": 1, "sampler": {"kind": "patches", "size": [4, 4, 4], "per_image": 2}}
    train(table, "group", "classification", TrainSettings.of(hyper), tmp_path / "patches")
    model, coder, _ = load_model(tmp_path / "patches" / "model.pt")
    assert coder.classes == ["a", "b"] and model(torch.randn(2, 1, 8, 8, 8)).shape == (2, 2)


def test_image_batches_are_shuffled_trimmed_and_complete():
    batches = image_batches(11, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 3] and len(set(torch.cat(batches).tolist())) == 11
    assert [len(b) for b in image_batches(9, 4, torch.Generator().manual_seed(0))] == [4, 4]  # single image dropped
    assert [len(b) for b in image_batches(11, 4, torch.Generator().manual_seed(0), world=2)] == [4, 4, 2]
    assert [b.tolist() for b in image_batches(5, 2, None)] == [[0, 1], [2, 3], [4]]


def test_amp_is_a_no_op_on_cpu(study, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("compares with CPU training")
    table, _ = study
    hyper = {**SMALL, "epochs": 1}
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "fp32")
    train(table, "age", "regression", TrainSettings.of({**hyper, "amp": True}), tmp_path / "amp")
    assert_same_weights(weights(tmp_path / "fp32" / "model.pt"), weights(tmp_path / "amp" / "model.pt"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_amp_on_cuda_trains(study, tmp_path):
    table, _ = study
    record = train(table, "age", "regression", TrainSettings.of({**SMALL, "epochs": 2, "amp": True}), tmp_path / "amp")
    assert np.isfinite(record["val_loss"])
    history = pd.read_csv(tmp_path / "amp" / "history.tsv", sep="\t")
    assert np.isfinite(history["train_loss"]).all()


def test_unknown_model_is_an_input_error(study, tmp_path):
    from pipeline.common.errors import InputError

    table, _ = study
    with pytest.raises(InputError, match="resnet18"):
        train(table, "age", "regression", TrainSettings.of({**SMALL, "model": "resnet1000"}), tmp_path / "x")
    with pytest.raises(InputError, match="segmentation"):
        train(table, "age", "regression", TrainSettings.of({**SMALL, "model": "unet"}), tmp_path / "x")


def test_mlflow_tracking_writes_a_local_run(study, tmp_path):
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow-skinny is not installed (pip install 'bids-deepstudy[tracking]')")
    from mlflow.tracking import MlflowClient

    table, _ = study
    out = tmp_path / "fold-1"
    train(table, "age", "regression", TrainSettings.of({**SMALL, "epochs": 2, "tracking": "mlflow"}), out)
    client = MlflowClient(tracking_uri=(out / "mlflow").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("pipeline").experiment_id])
    assert run.info.run_name == "fold-1" and run.data.params["learning_rate"] == "0.01"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]


def test_mlflow_folds_and_variants_share_one_store_and_experiment(study, tmp_path, monkeypatch):
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow-skinny is not installed (pip install 'bids-deepstudy[tracking]')")
    from mlflow.tracking import MlflowClient

    from pipeline.learning.tracking import MlflowTarget

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    table, _ = study
    store, hyper = tmp_path / "results" / "mlflow", {**SMALL, "epochs": 1, "tracking": "mlflow"}
    for run in ("fold-1/variant-a", "fold-2/variant-b"):
        train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "results" / "train" / run,
              mlflow=MlflowTarget(store, "my-study", run))
    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    [experiment] = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    assert experiment.name == "my-study"
    assert sorted((r.info.run_name, r.data.tags["fold"], r.data.tags["variant"]) for r in runs) == [
        ("fold-1/variant-a", "fold-1", "a"), ("fold-2/variant-b", "fold-2", "b")]
    assert not (tmp_path / "results" / "train" / "fold-1" / "variant-a" / "mlflow").exists()

    elsewhere = tmp_path / "server-store"  # $MLFLOW_TRACKING_URI wins over the study's store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere.resolve().as_uri())
    train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "results" / "train" / "fold-3",
          mlflow=MlflowTarget(store, "my-study", "fold-3"))
    client = MlflowClient(tracking_uri=elsewhere.resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("my-study").experiment_id])
    assert run.info.run_name == "fold-3" and "variant" not in run.data.tags
    assert len(MlflowClient(tracking_uri=store.resolve().as_uri()).search_runs([experiment.experiment_id])) == 2


def test_two_process_ddp_on_cpu_matches_one_process(study, tmp_path):
    """torchrun, 2 processes, gloo: each trains on half of every batch; DDP averages gradients.
    Instance norm: BatchNorm's statistics are each process's half batch on CPU (SyncBatchNorm,
    which pools them, needs CUDA), so BatchNorm networks match only on GPUs."""
    table, (manifest, splits, preproc) = study
    hyper = {**SMALL, "model_args": {"channels": [4, 8], "dropout": 0.0, "norm": "instance"}, "epochs": 2}
    single = train(table, "age", "regression", TrainSettings.of(hyper), tmp_path / "single")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "pipeline.learning.train", "--manifest", str(manifest), "--splits", str(splits),
           "--preproc-dir", str(preproc),
           "--fold", "fold-1", "--out-dir", str(tmp_path / "ddp"), "--config",
           json.dumps({"target": "age", "task": "regression", "channels": {"T1w": {}}, "train": hyper, "labels": None,
                       "init": None})]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = weights(tmp_path / "ddp" / "model.pt")
    for key, value in single["state_dict"].items():
        assert torch.allclose(ddp[key], value, atol=1e-5, rtol=1e-4), key
    last = [torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=True)["model"] for d in ("single", "ddp")]
    for key, value in last[0].items():
        assert torch.allclose(last[1][key], value, atol=1e-5, rtol=1e-4), key
    one = pd.read_csv(tmp_path / "single" / "history.tsv", sep="\t")
    two = pd.read_csv(tmp_path / "ddp" / "history.tsv", sep="\t")
    assert np.allclose(one["val_loss"], two["val_loss"], rtol=1e-4)
    assert (two["steps"] == one["steps"]).all()
