"""`bids-deepstudy import`: foreign checkpoints become ordinary packages that compute what their sources compute."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.__main__ import COMMANDS
from pipeline.common.errors import InputError
from pipeline.intake import brainmask, recipe
from pipeline.learning.saved import package_coder, package_model
from pipeline.common import package
from pipeline.sharing import registry
from pipeline.sharing.importer import import_package, main

GRID = [32, 32, 32]
WIDTHS = [2, 3, 3, 4, 4, 3]
INPUTS = {"channels": ["T1w"], "voxel_size": 6.0, "shape": GRID}
BINS = [42.5 + i for i in range(40)]
TERMS = {"license": "MIT"}


class AuthorsSFCN(nn.Module):
    """SFCN as its authors' published PyTorch code lays it out (UKBiobank_deep_pretrain's sfcn.py),
    re-typed for this test: their fixed average pool, their list output."""

    def __init__(self, channel_number, output_dim=40, avg_shape=(1, 1, 1)):
        super().__init__()
        self.feature_extractor = nn.Sequential()
        for i, out in enumerate(channel_number):
            cin = 1 if i == 0 else channel_number[i - 1]
            if i < len(channel_number) - 1:
                layer = nn.Sequential(nn.Conv3d(cin, out, 3, padding=1), nn.BatchNorm3d(out), nn.MaxPool3d(2, stride=2),
                                      nn.ReLU())
            else:
                layer = nn.Sequential(nn.Conv3d(cin, out, 1, padding=0), nn.BatchNorm3d(out), nn.ReLU())
            self.feature_extractor.add_module(f"conv_{i}", layer)
        self.classifier = nn.Sequential()
        self.classifier.add_module("average_pool", nn.AvgPool3d(avg_shape))
        self.classifier.add_module("dropout", nn.Dropout(0.5))
        self.classifier.add_module(f"conv_{len(channel_number)}", nn.Conv3d(channel_number[-1], output_dim, 1))

    def forward(self, x):
        return [F.log_softmax(self.classifier(self.feature_extractor(x)), dim=1)]


def trained_like(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics (not the defaults, which would hide a mix-up)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=generator)
                tensor.copy_(values + 0.5 if name.endswith("running_var") else values - 0.5)
    return module.eval()


def authors_checkpoint(tmp_path: Path) -> tuple[Path, nn.Module]:
    """An SFCN state dict saved as DataParallel saves it (``module.`` keys)."""
    source = trained_like(AuthorsSFCN(WIDTHS))
    path = tmp_path / "run_20190719_00_epoch_best_mae.p"
    torch.save(nn.DataParallel(source).state_dict(), path)
    return path, source


def reference(tmp_path: Path, source, shape=(1, *GRID)) -> tuple[Path, Path, torch.Tensor]:
    x = torch.from_numpy(np.random.default_rng(3).normal(0, 1, (1, *shape)).astype(np.float32))
    with torch.no_grad():
        out = source(x)
    out = out[0] if isinstance(out, list) else out
    np.save(tmp_path / "x.npy", x[0].numpy())
    np.save(tmp_path / "y.npy", out.numpy())
    return tmp_path / "x.npy", tmp_path / "y.npy", x


def package_output(folder: Path, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(network output, decoded prediction) of an imported package, loaded as `apply` loads it."""
    pkg = package.load(folder)
    model, coder = package_model(pkg, "fold-1"), package_coder(pkg, "fold-1")
    with torch.no_grad():
        out = model(x)
    return out.numpy(), coder.decode(out)


@pytest.fixture(scope="module")
def sfcn_package(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sfcn")
    path, source = authors_checkpoint(tmp)
    x_path, y_path, x = reference(tmp, source)
    spec = import_package(path, tmp / "package", {"name": "sfcn_peng", "args": {"channels": WIDTHS}}, INPUTS,
                          {"type": "bins", "bins": BINS}, TERMS, reference=(x_path, y_path), target="age")
    return tmp, source, x, spec


def test_sfcn_in_its_authors_layout_imports_with_parity_and_predicts_the_expected_age(sfcn_package):
    tmp, source, x, spec = sfcn_package
    out, age = package_output(tmp / "package", x)
    with torch.no_grad():
        theirs = source(x)[0].flatten(1).numpy()
    assert np.abs(out - theirs).max() <= 1e-4
    assert spec["parity"]["max_abs_difference"] <= 1e-4 and "--reference-output" in spec["parity"]["against"]
    assert spec["source"]["prefix_stripped"] == "module." and spec["outputs"] == 40
    expected = (np.exp(theirs) * np.array(BINS)).sum(1)
    assert np.allclose(age, expected, atol=1e-4) and 42.5 <= age[0] <= 81.5
    card = (tmp / "package" / "model_card.md").read_text()
    assert "sfcn_peng" in card and "expected value over 40 soft-label bins" in card and "Parity" in card
    assert spec["onnx"]["max_abs_difference"] <= 1e-4


def test_the_command_table_runs_import_and_it_refuses_an_occupied_folder(sfcn_package, capsys):
    tmp, *_ = sfcn_package
    assert COMMANDS["import"][0] == "pipeline.sharing.importer"
    command = [str(tmp / "run_20190719_00_epoch_best_mae.p"), "--architecture", "sfcn_peng", "--arch-args",
               json.dumps({"channels": WIDTHS}), "--voxel-size", "6", "--shape", "32", "32", "32", "--output", "bins",
               "--bin-range", "42", "82", "1", "--target", "age", "--license", "MIT", "--intensity", "mean"]
    main([*command, "--out", str(tmp / "cli")])
    spec = package.load(tmp / "cli").spec
    assert spec["output"]["bins"] == BINS and spec["target"] == "age" and spec["license"] == "MIT"
    assert "apply will refuse this package" in capsys.readouterr().err  # --intensity mean: not made here
    with pytest.raises(SystemExit) as stop:
        main([*command, "--out", str(tmp / "package")])
    assert stop.value.code == 2 and "not empty" in capsys.readouterr().err


def test_an_imported_package_is_registered_fetched_and_fine_tuned_from(sfcn_package, tmp_path, capsys):
    tmp, _, x, _ = sfcn_package
    ref = registry.register(tmp / "package", "lab/sfcn", str(tmp_path / "registry"))
    _, folder = registry.fetch(str(ref), str(tmp_path / "registry"), tmp_path / "fetched")
    assert np.allclose(package_output(folder, x)[0], package_output(tmp / "package", x)[0])
    from pipeline.learning.coder import TargetCoder
    from pipeline.learning.finetune import initialise
    from pipeline.learning.models import build_model
    from pipeline.learning.settings import TrainSettings

    pkg = package.load(folder)
    model = build_model("sfcn_peng", 1, 1, channels=WIDTHS)
    hyper = {"model": "sfcn_peng", "model_args": {"channels": WIDTHS}, "freeze": 0, "package_head": "keep"}
    initialise(model, folder, TrainSettings.of(hyper), TargetCoder("regression", mean=50.0, std=10.0), "age", ["T1w"],
               pkg.recipe, "fold-1")
    start = pkg.state_dict("fold-1")
    assert torch.equal(model.state_dict()["feature_extractor.conv_0.0.weight"], start["feature_extractor.conv_0.0.weight"])
    assert "new head" in capsys.readouterr().err and model.eval()(x).shape == (1, 1)


def test_fine_tuning_an_imported_package_compares_only_the_declared_input(sfcn_package):
    from pipeline.learning.finetune import check_preprocessing

    tmp, *_ = sfcn_package
    theirs = package.load(tmp / "package").recipe
    ours = {**theirs, "imported": False, "n4": False, "registration_resolution": 4, "antialias": False}
    check_preprocessing(theirs, ours, tmp / "package")  # how the study registers is its own choice
    with pytest.raises(InputError, match=r"resolution: package 6.0, study 4.0"):
        check_preprocessing(theirs, {**ours, "resolution": 4.0}, tmp / "package")
    with pytest.raises(InputError, match=r"registration_resolution: package 2, study 4"):
        check_preprocessing({**theirs, "imported": False}, ours, tmp / "package")  # our own packages: all of it


def test_the_predict_stage_of_apply_writes_the_expected_age(sfcn_package, tmp_path):
    from pipeline.sharing.predict import predict_folds

    tmp, _, x, _ = sfcn_package
    array = tmp_path / "sub-01_T1w.npy"
    np.save(array, x[0].numpy())
    table = __import__("pandas").DataFrame({"participant_id": ["sub-01"], "session": [""], "image_id": ["sub-01"],
                                            "array": [str(array)]})
    pkg = package.load(tmp / "package")
    predictions = predict_folds(pkg, table, tmp_path / "predict", tmp_path / "predictions.tsv")
    assert np.isclose(predictions["predicted"][0], package_output(tmp / "package", x)[1][0], atol=1e-4)
    from pipeline.sharing.predict import build_report, fold_mean_maps
    from pipeline.results.attribution import Settings

    from pipeline.sharing.predict import predicting_expected_value

    model = predicting_expected_value(package_model(pkg, "fold-1"), package_coder(pkg, "fold-1"))
    with torch.no_grad():
        assert np.isclose(float(model(x)), predictions["predicted"][0], atol=1e-4)  # maps explain the age itself
    maps = fold_mean_maps(pkg, x, ["gradient", "gradcam"], Settings.of(pkg.spec["explain"]), None)
    assert maps["gradcam"].shape == tuple(GRID) and np.abs(maps["gradient"]).sum() > 0
    page = build_report(pkg, "lab/sfcn:1", tmp_path / "predictions.tsv", tmp_path, [], [], {}, tmp_path / "report.html")
    assert "imported: no test metrics of its own" in page.read_text()


def test_a_safetensors_folder_and_a_lightning_checkpoint_import_with_parity(tmp_path):
    from safetensors.torch import save_file

    source = trained_like(AuthorsSFCN(WIDTHS, output_dim=3), seed=1)
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(source.state_dict(), hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps({"model_type": "sfcn"}))
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, tmp_path / "l.ckpt")
    x_path, y_path, x = reference(tmp_path, source)
    for path, out in ((hf, "a"), (tmp_path / "l.ckpt", "b")):
        spec = import_package(path, tmp_path / out, {"name": "sfcn_peng", "args": {"channels": WIDTHS}}, INPUTS,
                              {"type": "logits", "classes": ["CN", "MCI", "AD"]}, TERMS, reference=(x_path, y_path),
                              target="diagnosis")
        assert spec["parity"]["max_abs_difference"] <= 1e-4 and spec["task"] == "classification"
        with torch.no_grad():
            assert np.abs(package_output(tmp_path / out, x)[0] - source(x)[0].flatten(1).numpy()).max() <= 1e-4
    assert spec["source"]["prefix_stripped"] == "model."


def write_bundle(root: Path, network: nn.Module | None = None) -> Path:
    """A MONAI bundle made with MONAI's own tools: ``init_bundle`` with MONAI's default inference config
    (its `$` expressions included) around a DenseNet ``network_def`` with references, and its weights."""
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import DEFAULT_INFERENCE, DEFAULT_METADATA, init_bundle

    inference = {**DEFAULT_INFERENCE, "spatial_dims": 3, "classes": 2,
                 "network_def": {"_target_": "DenseNet", "spatial_dims": "@spatial_dims", "in_channels": 1,
                                 "out_channels": "@classes", "init_features": 4, "growth_rate": 2,
                                 "block_config": [1, 1], "bn_size": 1}}
    metadata = {**DEFAULT_METADATA, "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": GRID}},
        "outputs": {"pred": {"type": "probabilities", "format": "classification", "num_channels": 2,
                             "channel_def": {"0": "control", "1": "patient"}}}}}
    parser = ConfigParser(inference)
    network = network or trained_like(parser.get_parsed_content("network_def"), seed=2)
    init_bundle(str(root), network=network, metadata_str=metadata, inference_str=inference)
    return root


def test_a_monai_bundle_folder_and_zip_import_with_parity_against_monais_network(tmp_path):
    from monai.networks.nets import DenseNet

    folder = write_bundle(tmp_path / "bundle", None)
    source = DenseNet(3, 1, 2, init_features=4, growth_rate=2, block_config=(1, 1), bn_size=1)
    source.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    x = torch.randn(1, 1, *GRID)
    with zipfile.ZipFile(tmp_path / "bundle.zip", "w") as archive:
        for path in folder.rglob("*"):
            archive.write(path, Path("bundle") / path.relative_to(folder))
    for name, path in (("from_folder", folder), ("from_zip", tmp_path / "bundle.zip")):
        spec = import_package(path, tmp_path / name, {}, INPUTS, {"type": "logits"}, TERMS, target="group")
        assert spec["classes"] == ["control", "patient"] and spec["architecture"]["name"] == "monai_bundle"
        assert spec["parity"]["max_abs_difference"] <= 1e-4 and "MONAI" in spec["parity"]["against"]
        with torch.no_grad():
            assert np.abs(package_output(tmp_path / name, x)[0] - source.eval()(x).numpy()).max() <= 1e-4


def test_the_npz_route_with_a_mapping_file(tmp_path):
    source = trained_like(AuthorsSFCN(WIDTHS, output_dim=2), seed=4)
    names = {}  # a TensorFlow-like dump: "layer_i/kernel" in (D, H, W, in, out), BatchNorm as gamma/beta/mean/var
    for key, value in source.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        dumped = key.replace("feature_extractor.", "encoder/").replace("classifier.", "head/")
        array = value.numpy()
        if key.endswith(".weight") and value.dim() == 5:
            array = array.transpose(2, 3, 4, 1, 0)
        names[dumped.replace(".", "/")] = array
    np.savez(tmp_path / "dump.npz", **names, global_step=np.array(1000))
    (tmp_path / "mapping.yaml").write_text(
        "rules:\n"
        "  - {match: 'encoder/(conv_\\d)/0/weight', name: 'feature_extractor.\\1.0.weight', layout: dhwio}\n"
        "  - {match: 'head/(conv_\\d)/weight', name: 'classifier.\\1.weight', layout: dhwio}\n"
        "  - {match: 'encoder/(conv_\\d)/(\\d)/(\\w+)', name: 'feature_extractor.\\1.\\2.\\3'}\n"
        "  - {match: 'head/(conv_\\d)/bias', name: 'classifier.\\1.bias'}\n"
        "ignore: ['global_step']\n")
    x_path, y_path, x = reference(tmp_path, source)
    spec = import_package(tmp_path / "dump.npz", tmp_path / "package", {"name": "sfcn_peng", "args": {"channels": WIDTHS}},
                          INPUTS, {"type": "logits", "classes": ["a", "b"]}, TERMS, tmp_path / "mapping.yaml",
                          (x_path, y_path), "group")
    out, probabilities = package_output(tmp_path / "package", x)
    with torch.no_grad():
        assert np.abs(out - source(x)[0].flatten(1).numpy()).max() <= 1e-4
    assert spec["parity"]["max_abs_difference"] <= 1e-4 and np.allclose(probabilities, np.exp(out), atol=1e-5)
    (tmp_path / "partial.yaml").write_text("rules:\n  - {match: 'encoder/.*', name: 'x'}\n")
    with pytest.raises(InputError, match=r"partial.yaml leaves \d+ tensor\(s\) unmatched: .*head/conv_6/weight"):
        import_package(tmp_path / "dump.npz", tmp_path / "partial", {"name": "sfcn_peng", "args": {"channels": WIDTHS}},
                       INPUTS, {"type": "scalar"}, TERMS, tmp_path / "partial.yaml")
    assert not (tmp_path / "partial").exists()


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_bad_checkpoints_get_one_clear_message_and_leave_nothing(tmp_path):
    path, source = authors_checkpoint(tmp_path)
    sfcn = {"name": "sfcn_peng", "args": {"channels": WIDTHS}}
    bins = {"type": "bins", "bins": BINS}
    with pytest.raises(InputError, match=r"does not fit sfcn_peng .*: 0 missing, 0 unexpected, 7 wrongly") as wrong:
        import_package(path, tmp_path / "a", {"name": "sfcn_peng", "args": {"channels": [2, 3, 3, 4, 5, 3]}},
                       INPUTS, bins, TERMS)
    assert "wrong shape feature_extractor.conv_4.0.weight" in str(wrong.value)
    with pytest.raises(InputError, match=r"(?s)does not fit sfcn .*missing features.0.0.weight \(2, 1, 3, 3, 3\) "
                                         r"\(closest: feature_extractor.conv_0.0.weight"):
        import_package(path, tmp_path / "b", {"name": "sfcn", "args": {"channels": WIDTHS}}, INPUTS, bins, TERMS)
    torch.save(source, tmp_path / "whole.pt")
    with pytest.raises(InputError, match=r"pickled Python objects.*torch.save\(model.state_dict\(\)"):
        import_package(tmp_path / "whole.pt", tmp_path / "c", sfcn, INPUTS, bins, TERMS)
    torch.jit.save(torch.jit.trace(source, torch.randn(1, 1, *GRID), strict=False), tmp_path / "scripted.pt")
    with pytest.raises(InputError, match="TorchScript archive.*state_dict"):
        import_package(tmp_path / "scripted.pt", tmp_path / "d", sfcn, INPUTS, bins, TERMS)
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint: truncated or corrupt"):
        import_package(tmp_path / "cut.pth", tmp_path / "e", sfcn, INPUTS, bins, TERMS)
    from safetensors.torch import save_file

    save_file(source.state_dict(), tmp_path / "whole.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "whole.safetensors").read_bytes()[:3000])
    with pytest.raises(InputError, match="cut.safetensors is not a readable safetensors file: truncated"):
        import_package(tmp_path / "cut.safetensors", tmp_path / "f", sfcn, INPUTS, bins, TERMS)
    assert not any((tmp_path / n).exists() for n in "abcdef") and leftovers(tmp_path) == []


def test_an_input_this_pipeline_cannot_make_is_refused_by_apply_naming_the_difference(sfcn_package, tmp_path):
    from pipeline.sharing.apply import apply_config

    tmp, *_ = sfcn_package
    declared = {**INPUTS, "space": "MNI152Lin", "intensity": "mean", "crop": "11:171,13:205,0:160",
                "brain_extraction": "bet"}
    import_package(tmp / "run_20190719_00_epoch_best_mae.p", tmp_path / "sfcn", {"name": "sfcn_peng",
                   "args": {"channels": WIDTHS}}, declared, {"type": "bins", "bins": BINS}, TERMS)
    pkg = package.load(tmp_path / "sfcn")
    with pytest.raises(InputError) as refused:
        apply_config(tmp_path, tmp_path / "out", pkg, "lab/sfcn", [], None)
    text = str(refused.value)
    assert "space: the model expects MNI152Lin" in text and "divide by the mean" in text and "crop" in text
    assert "brain extraction: the model expects bet" in text and recipe.BRAIN_EXTRACTIONS == brainmask.METHODS
    assert "cannot make this input" in (tmp_path / "sfcn" / "model_card.md").read_text()
    assert apply_config(tmp_path, tmp_path / "out", package.load(tmp / "package"), "lab/sfcn", [], None)["preprocess"][
        "shape"] == GRID


def test_the_registry_refuses_a_licence_that_forbids_sharing_and_an_import_without_one(sfcn_package, tmp_path):
    tmp, *_ = sfcn_package
    where = tmp_path / "registry"
    for name, terms, message in (("closed", {"license": "CC-BY-NC-ND-4.0", "redistribution": False},
                                  "forbids redistribution"), ("unlicensed", {}, "has no licence field")):
        import_package(tmp / "run_20190719_00_epoch_best_mae.p", tmp_path / name, {"name": "sfcn_peng",
                       "args": {"channels": WIDTHS}}, INPUTS, {"type": "bins", "bins": BINS}, terms)
        with pytest.raises(InputError, match=message):
            registry.register(tmp_path / name, f"lab/{name}", str(where))
    assert not where.exists() or not any(where.rglob("*"))


def test_user_code_and_a_segmentation_network_import_and_label_as_their_source(tmp_path, monkeypatch):
    (tmp_path / "labnets.py").write_text(
        "from monai.networks.nets import BasicUNet\n\n"
        "def tiny_unet(classes=3):\n"
        "    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=classes, features=(2, 2, 2, 2, 2, 2))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from labnets import tiny_unet

    source = trained_like(tiny_unet(), seed=5)
    torch.save({"model": source.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}, tmp_path / "unet.pth")
    x_path, y_path, x = reference(tmp_path, source, (1, *GRID))
    spec = import_package(tmp_path / "unet.pth", tmp_path / "package", {"factory": "labnets:tiny_unet",
                          "kwargs": {"classes": 3}}, INPUTS,
                          {"type": "labels", "classes": ["background", "grey", "white"]}, TERMS,
                          reference=(x_path, y_path), target="tissue")
    written = json.loads((tmp_path / "package" / "spec.json").read_text())
    assert written["task"] == "segmentation" and written["labels"] == {"0": "background", "1": "grey", "2": "white"}
    assert spec["source"]["user_code"] and "**user code**" in (tmp_path / "package" / "model_card.md").read_text()
    with torch.no_grad():
        ours = package_model(package.load(tmp_path / "package"), "fold-1")(x).numpy()
        assert np.abs(ours - source(x).numpy()).max() <= 1e-4
    assert spec["onnx"]["max_abs_difference"] <= 1e-4


def test_the_apply_workflow_plans_an_imported_package(sfcn_package, small_bids, tmp_path):
    import os
    import subprocess
    import sys

    import yaml

    from pipeline.sharing.apply import SNAKEFILE, apply_config

    tmp, *_ = sfcn_package
    config = apply_config(small_bids, tmp_path / "out", package.load(tmp / "package"), "lab/sfcn:1", ["01"], None)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(tmp_path / "out"),
                          "--configfile", str(tmp_path / "config.yaml"), "--cores", "1", "-n"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "predict_maps" in run.stdout and "predict_report" in run.stdout


def test_a_declared_output_that_does_not_match_the_networks_is_refused(tmp_path):
    folder = write_bundle(tmp_path / "bundle", None)
    with pytest.raises(InputError, match=r"network gives \(1, 2\).*declared output has 3 \(logits"):
        import_package(folder, tmp_path / "package", {}, INPUTS, {"type": "logits", "classes": ["a", "b", "c"]}, TERMS)
    assert not (tmp_path / "package").exists() and leftovers(tmp_path) == []


def test_apply_runs_an_imported_package_folder_into_a_new_output_folder(sfcn_package, small_bids, tmp_path, monkeypatch):
    import yaml

    from pipeline.sharing import apply as apply_cli

    tmp, *_ = sfcn_package
    calls = []
    monkeypatch.setattr(apply_cli.launch, "snakemake", lambda args, readable=False: calls.append(args) or 0)
    with pytest.raises(SystemExit) as done:
        apply_cli.main([str(small_bids), str(tmp_path / "new" / "out"), "participant", "--model", str(tmp / "package"),
                        "--work-dir", str(tmp_path / "new" / "work")])
    assert done.value.code == 0 and len(calls) == 1
    config = yaml.safe_load((tmp_path / "new" / "work" / "config.yaml").read_text())
    assert config["preprocess"]["shape"] == GRID and config["apply"]["package"] == str((tmp / "package").resolve())
