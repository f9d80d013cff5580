"""Config `device` and `train.gpus`: the device code paths run on the CPU, equal to the code before them.

No GPU is needed: every stage is called with its device as a parameter (``cpu``), and its results
are checked bit for bit against what the code computed before devices existed (the literal old
expressions, or captum's implementation); ``device: cuda`` on a machine without a GPU is an error
naming the key before any data is read; ``train.gpus`` changes the train rule's command and GPUs.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from captum.attr import NoiseTunnel, Saliency

from conftest import stage_config, write_bids
from pipeline.common.cli import DEVICES
from pipeline.common.config import schema
from pipeline.common.errors import InputError
from pipeline.intake.study import study_table
from pipeline.learning import device as devices
from pipeline.learning import launch
from pipeline.learning.loader import load_batch
from pipeline.learning.models import build_model
from pipeline.learning.saved import load_model, package_coder, package_model
from pipeline.results import attribution, sanity
from pipeline.results.evaluate import evaluate_fold, predict

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_schema_offers_the_devices_the_code_knows():
    assert schema()["properties"]["device"]["enum"] == list(DEVICES)
    assert schema()["properties"]["device"]["default"] == "auto"


def test_auto_and_cpu_are_the_cpu_without_a_gpu_and_cuda_is_an_error_naming_the_key(no_gpu):
    assert devices.resolve("auto") == devices.resolve("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match=r"`device: cuda` asks for a GPU, but this job sees none.*`device: auto`"):
        devices.resolve("cuda")


def test_a_process_beyond_the_jobs_gpus_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve("auto", local_rank=0) == torch.device("cuda:0")
    with pytest.raises(InputError, match="needs GPU 1, but the job sees 1.*train.gpus"):
        devices.resolve("cuda", local_rank=1)


@pytest.mark.parametrize("module, arguments", [
    ("pipeline.learning.train", []),
    ("pipeline.results.evaluate", ["fold", "--model", "missing.pt", "--out-dir", "out"]),
    ("pipeline.results.explain", ["fold", "--model", "missing.pt", "--mask", "missing.nii.gz", "--out-dir", "out"]),
])
def test_a_stage_asked_for_cuda_without_a_gpu_stops_before_reading_anything(module, arguments, no_gpu, capsys):
    import importlib

    main = importlib.import_module(module).main
    study = ["--manifest", "missing.tsv", "--splits", "missing.tsv", "--fold", "fold-1", "--preproc-dir", "missing"]
    arguments = arguments[:1] + study + arguments[1:] if arguments else study + ["--out-dir", "out"]
    with pytest.raises(SystemExit) as stop:
        main([*arguments, "--config", stage_config(), "--device", "cuda"])
    assert stop.value.code == 2
    assert "`device: cuda` asks for a GPU" in capsys.readouterr().err  # not a missing file: nothing was read


def test_predict_asked_for_cuda_without_a_gpu_stops_before_reading_anything(mini_study, no_gpu, capsys):
    from pipeline.sharing.predict import main

    config = stage_config(apply={"package": str(mini_study / "package" / "model")})
    with pytest.raises(SystemExit):
        main(["predictions", "--config", config, "--manifest", "missing.tsv", "--preproc-dir", "missing",
              "--out-dir", "out", "--predictions", "out.tsv", "--device", "cuda"])
    assert "`device: cuda` asks for a GPU" in capsys.readouterr().err


def fold_table(root: Path, fold: str = "fold-1") -> pd.DataFrame:
    return study_table(root / "manifest.tsv", root / "splits.tsv", root / "derivatives", fold, ["T1w"])


def test_evaluation_on_the_device_path_equals_the_code_before_it(mini_study, tmp_path):
    table, model_path = fold_table(mini_study), mini_study / "train" / "fold-1" / "model.pt"
    model, coder, _ = load_model(model_path, torch.device("cpu"))
    rows = table[table["split"].isin(["val", "test"])]
    with torch.no_grad():  # the code before config `device`: CPU tensors straight into the model
        before = coder.decode(torch.cat([model(load_batch([p])) for p in rows["array"]]))
    now = predict(model, coder, rows, "age")
    assert np.array_equal(now["predicted"].to_numpy(), np.asarray(before))
    evaluate_fold(table, model_path, tmp_path / "eval", device="cpu")
    written = pd.read_csv(tmp_path / "eval" / "predictions.tsv", sep="\t")
    study = pd.read_csv(mini_study / "evaluate" / "fold-1" / "predictions.tsv", sep="\t")
    pd.testing.assert_frame_equal(written, study)


def test_apply_mode_on_the_device_path_reproduces_the_study(mini_study, tmp_path):
    from pipeline.common import package
    from pipeline.sharing.predict import fold_mean_maps, predict_folds

    pkg = package.load(mini_study / "package" / "model")
    table = fold_table(mini_study)
    test = table[table["split"] == "test"].drop(columns="split")
    predict_folds(pkg, test, tmp_path / "predict", tmp_path / "predictions.tsv", device="cpu")
    for fold in pkg.folds:
        ours = pd.read_csv(tmp_path / "predict" / fold / "predictions.tsv", sep="\t").set_index("image_id")
        study = pd.read_csv(mini_study / "evaluate" / fold / "predictions.tsv", sep="\t").set_index("image_id")
        assert np.array_equal(ours["predicted"], study.loc[ours.index, "predicted"])
    x = load_batch([test["array"].iloc[0]])
    settings = attribution.Settings.of({"window": 4, "stride": 4, "smoothgrad_samples": 3, "ig_steps": 4,
                                        "ig_baseline": "train_mean", "gradcam_layer": "features.1"})
    maps = fold_mean_maps(pkg, x, list(attribution.METHODS), settings, None, device="cpu")
    for method, data in maps.items():  # each fold's map as the code before devices computed it: CPU throughout
        folds = [attribution.attribute(package_model(pkg, f), x, 0, [method], settings, pkg.train_mean(f),
                                       classification=package_coder(pkg, f).task == "classification")[0][method]
                 for f in pkg.folds]
        assert np.array_equal(data, (sum(folds) / len(folds)).astype(np.float32)), method


def test_explanation_of_a_fold_on_the_device_path_equals_the_maps_of_the_cpu_model(mini_study, tmp_path,
                                                                                  monkeypatch):
    from pipeline.results import explain, maps as mapfiles

    written = {}  # the maps explain_fold saves (native space needs real preprocessing: not in this study)

    def save(maps, row, affine, inverse, out_dir, reference, groups):
        written[row.image_id] = maps
        for method, data in maps.items():
            groups[method].add(data)
        return {m: {"template": "", "native": ""} for m in maps}

    monkeypatch.setattr(mapfiles, "save_image_maps", save)  # write_maps saves through it
    settings = attribution.Settings.of({"window": 4, "stride": 4, "smoothgrad_samples": 2, "ig_steps": 4,
                                        "gradcam_layer": "features.1"})
    methods, table = list(attribution.METHODS), fold_table(mini_study)
    model_path = mini_study / "train" / "fold-1" / "model.pt"
    explain.explain_fold(table, model_path, mini_study / "grid" / "mask.nii.gz", mini_study / "derivatives", tmp_path,
                         methods, settings, ["T1w"], sanity_images=0, device="cpu")
    model, _, _ = load_model(model_path)
    mean = explain.mean_training_image(table)[None]
    test = table[table["split"] == "test"]
    assert sorted(written) == sorted(test["image_id"])
    for row in test.itertuples():
        before, _ = attribution.attribute(model, load_batch([row.array]), 0, methods, settings, mean, False)
        for method in methods:
            assert np.array_equal(written[row.image_id][method], before[method]), method


@pytest.mark.parametrize("samples, batch", [(16, 8), (10, 8), (5, 2)])
def test_smoothgrad_draws_captums_noise_on_the_cpu_bit_for_bit(samples, batch):
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 2, channels=(4, 8)).eval()
    x = torch.randn(1, 1, 9, 11, 7)
    torch.manual_seed(5)
    theirs = NoiseTunnel(Saliency(model)).attribute(x.clone().requires_grad_(True), nt_type="smoothgrad",
                                                    nt_samples=samples, nt_samples_batch_size=batch, stdevs=0.3,
                                                    target=1, abs=True)
    ours = attribution.smoothgrad(model, x, 1, samples, 0.3, seed=5, batch=batch)
    assert np.array_equal(ours, theirs[0].sum(0).detach().numpy())


def test_randomised_weights_are_drawn_as_before_devices(monkeypatch):
    torch.manual_seed(0)
    model = build_model("simple_cnn", 1, 1, channels=(4, 8)).eval()
    before = copy.deepcopy(model)  # the code before devices: re-initialised in place, on the model's device
    network = before
    torch.manual_seed(3)
    for block in list(sanity.blocks(network).values())[-2:]:
        for module in block:
            module.reset_parameters()
    now = sanity.randomised(model, 2, seed=3)
    for key, value in before.state_dict().items():
        assert torch.equal(now.state_dict()[key], value), key


def test_model_device_and_to_numpy():
    assert devices.model_device(torch.nn.Linear(2, 1)) == torch.device("cpu")
    assert devices.model_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU
    t = torch.ones(2, requires_grad=True) * 2
    assert devices.to_numpy(t).tolist() == [2.0, 2.0]


def test_train_gpus_chooses_the_launcher_and_the_gpus_requested():
    config = {"gpu": False, "train": {"gpus": 1, "variants": {"wide": {"gpus": 4}}}}
    assert launch.launcher(launch.processes(config["train"])) == "python"
    assert launch.gpus_requested(config) == 0
    assert launch.gpus_requested({**config, "gpu": True}) == 1
    assert launch.processes(config["train"], "wide") == launch.gpus_requested(config, "wide") == 4
    assert launch.launcher(4) == "python -m torch.distributed.run --standalone --nproc_per_node 4"


def test_config_check_refuses_gpus_on_the_cpu_and_batches_that_do_not_divide():
    from pipeline import check

    with pytest.raises(InputError) as found:
        check.check({"device": "cpu", "train": {"gpus": 3, "batch_size": 8}})
    assert "`train.gpus` asks for 3 GPUs, but `device` is 'cpu'" in str(found.value)
    assert "`train.batch_size` (8) does not divide among `train.gpus`'s 3 processes" in str(found.value)
    check.check({"device": "auto", "train": {"gpus": 2, "batch_size": 8}})


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--cores", "1", *args]
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


def test_train_gpus_runs_training_under_torchrun_and_requests_the_gpus(tmp_path):
    """Ingest for real (the plan after the checkpoint needs the manifest), then dry runs print the
    train rule's command and resources for train.gpus 1 and 2."""
    people = [{"participant_id": f"sub-{i:02d}", "age": str(20 + 5 * i)} for i in range(1, 9)]
    bids = write_bids(tmp_path / "bids", people, {p["participant_id"]: [""] for p in people}, shape=(4, 4, 4))
    config = {"bids_dir": str(bids), "results_dir": "results", "split": {"folds": 2, "test": 0.25}}
    (tmp_path / "config").mkdir()

    def plan(**train):
        (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump({**config, "train": train, "device": "cuda"}))
        run = snakemake(tmp_path, "-n", "-p", "results/train/fold-1/model.pt")
        assert run.returncode == 0, run.stderr[-3000:]
        lines = run.stdout.splitlines()
        command = next(line for line in lines if "-m pipeline.learning.train" in line).split("Shell command:")[-1].strip()
        block = run.stdout.split("rule train:")[1].split("\n\n")[0]
        return command, block

    (tmp_path / "config" / "config.yaml").write_text(yaml.safe_dump(config))
    ingest = snakemake(tmp_path, "results/manifest.tsv")
    assert ingest.returncode == 0, ingest.stderr[-3000:]
    command, block = plan()
    assert command.startswith("python -m pipeline.learning.train") and "--device cuda" in command
    assert "gpu=0" in block
    command, block = plan(gpus=2, batch_size=8)
    assert command.startswith("python -m torch.distributed.run --standalone --nproc_per_node 2 -m pipeline.learning.train")
    assert "--device cuda" in command and "gpu=2" in block


def test_the_gpu_benchmark_refuses_a_machine_without_a_gpu(no_gpu, capsys):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu

    assert gpu.main(["--out", "unused.md"]) == 2
    assert "this machine has none" in capsys.readouterr().err


def test_the_gpu_benchmark_runs_every_part_on_the_cpu(tmp_path):
    """A smoke test (about 25 s on 2 cores): small grids, every loader, training and method row."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--device", "cpu", "--quick",
                          "--out", str(tmp_path / "gpu.md")], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    table = (tmp_path / "gpu.md").read_text()
    assert table.startswith("Device: CPU") and "| 1 mm | 28×32×28 |" in table
    assert all(f"| {method} |" in table for method in attribution.METHODS)
    assert "data wait at 1 mm with AMP" in table
