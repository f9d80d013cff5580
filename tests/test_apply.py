"""Apply mode without a full run: no-target ingestion, the apply config, and the Snakefile's apply plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import stage_config
from pipeline.sharing import package
from pipeline.sharing.apply import SNAKEFILE, apply_config
from pipeline.intake.ingest import ingest, main as ingest_main


def test_ingest_without_a_target_keeps_every_image(small_bids, tmp_path):
    result = ingest(small_bids, None, "regression")
    assert list(result.manifest["image_id"]) == ["sub-01", "sub-02", "sub-03_ses-01", "sub-03_ses-02", "sub-04"]
    assert "age" not in result.manifest.columns  # sub-02's n/a age no longer excludes it
    assert result.targets == {"target": None, "task": "regression", "source": None, "classes": None}
    (small_bids / "participants.tsv").unlink()  # not needed either
    ingest_main(["--config", json.dumps({**json.loads(stage_config(bids_dir=str(small_bids))), "target": None}),
                 "--manifest", str(tmp_path / "m.tsv"), "--report", str(tmp_path / "r.tsv")])
    assert json.loads((tmp_path / "targets.json").read_text())["target"] is None


def apply_run(mini_study, small_bids, out: Path, *args: str, **changes) -> subprocess.CompletedProcess:
    pkg = package.load(mini_study / "package" / "model")
    config = apply_config(small_bids, out, pkg, "lab/brainage:1", ["01", "sub-03"], None)
    for key, value in changes.items():
        config[key] = {**config[key], **value}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(out),
                           "--configfile", str(out / "config.yaml"), "--cores", "1", *args],
                          capture_output=True, text=True, env=env)


def test_apply_config_takes_the_packages_recipe_and_settings(mini_study, small_bids, tmp_path):
    pkg = package.load(mini_study / "package" / "model")
    config = apply_config(small_bids, tmp_path, pkg, "lab/brainage:1", ["01"], ["gradient"])
    assert config["preprocess"]["shape"] == [16, 16, 16] and config["preprocess"]["resolution"] == 4.0
    assert config["channels"] == {"T1w": {"suffix": "T1w"}} and config["bids_filters"] == {"datatype": "anat"}
    assert config["explain"]["methods"] == ["gradient"] and config["explain"]["gradcam_layer"] == "features.1"
    assert config["apply"] == {"package": str(pkg.folder.resolve()), "name": "lab/brainage:1"}
    assert config["participants"]["include"] == ["01"]


def test_apply_mode_plans_ingest_and_the_packages_grid_not_a_study(mini_study, small_bids, tmp_path):
    run = apply_run(mini_study, small_bids, tmp_path / "out", "-n", "-p")
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.split("Job stats:")[1].split("\n\n")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}
    assert jobs == {"ingest": 1, "exclusions": 1, "grid": 1, "predict": 1, "predict_maps": 1, "predict_report": 1,
                    "bids_validation": 1, "all": 1}
    ingest_command = next(line for line in run.stdout.splitlines() if "python -m pipeline.ingest" in line)
    assert '"target": null' in ingest_command and '"task": "regression"' in ingest_command  # images only
    grid_command = next(line for line in run.stdout.splitlines() if "python -m pipeline.grid" in line)
    assert f'"package": "{(mini_study / "package" / "model").resolve()}"' in grid_command


def test_apply_mode_refuses_a_config_that_differs_from_the_packages_recipe(mini_study, small_bids, tmp_path):
    run = apply_run(mini_study, small_bids, tmp_path / "out", "-n", preprocess={"resolution": 8})
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "differ from the recipe of apply.package" in text and "resolution: package 4.0, study 8.0" in text


def test_apply_mode_grad_cam_is_signed_for_regression_as_in_the_study(mini_study):
    """A regression package's Grad-CAM keeps both signs (no classification ReLU), as explain's does."""
    import numpy as np
    import torch

    from pipeline.learning.saved import package_model
    from pipeline.results.attribution import Settings, gradcam
    from pipeline.sharing.predict import fold_mean_maps

    pkg = package.load(mini_study / "package" / "model")
    assert pkg.spec["task"] == "regression"
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    maps = fold_mean_maps(pkg, x, ["gradcam"], Settings(gradcam_layer="features.1"), None)["gradcam"]
    signed = np.mean([gradcam(package_model(pkg, fold), x, 0, "features.1", relu=False) for fold in pkg.folds], axis=0)
    np.testing.assert_allclose(maps, signed, rtol=1e-5, atol=1e-7)
    assert (maps < 0).any() and (maps > 0).any()


def test_apply_mode_checks_the_grad_cam_layer_against_the_packages_network(mini_study, small_bids, tmp_path):
    from pipeline.results.explainconfig import problems

    pkg = package.load(mini_study / "package" / "model")
    config = apply_config(small_bids, tmp_path, pkg, "lab/brainage:1", [], ["gradcam"])
    config = {**config, "task": "regression", "explain": {**config["explain"], "stride": 4, "window": 4}}
    assert problems(config) == []
    config["explain"]["gradcam_layer"] = "features.3"  # the package's simple_cnn has two blocks
    found = problems(config)
    assert len(found) == 1 and "the package's network (simple_cnn) does not have" in found[0]
    assert "choose one of: features, features.0, features.0.0, features.1, features.1.0, head" in found[0]


def test_apply_takes_a_package_archive_or_folder_on_disk(mini_study, small_bids, tmp_path, monkeypatch):
    """--model names an archive or folder on disk: no registry; the archive is unpacked once, by its sha256."""
    from pipeline.sharing import apply as apply_cli

    calls = []
    monkeypatch.setattr(apply_cli.launch, "snakemake", lambda args: calls.append(args) or 0)
    archive, out = mini_study / "package" / "model.tar.gz", tmp_path / "out"
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            apply_cli.main([str(small_bids), str(out), "participant", "--model", str(archive),
                            "--session-label", "ses-01", "--registry", str(tmp_path / "no-registry")])
        assert done.value.code == 0
    [unpacked] = (out / "models").iterdir()
    assert unpacked.name == f"archive-{package.sha256(archive)[:16]}"
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["apply"]["package"] == str(unpacked.resolve()) and str(archive) in config["apply"]["name"]
    assert config["sessions"] == "ses-01"
    assert calls[0][:4] == ["--directory", str(out), "--configfile", str(out / "config.yaml")]

    folder = mini_study / "package" / "model"
    with pytest.raises(SystemExit):
        apply_cli.main([str(small_bids), str(out), "participant", "--model", str(folder)])
    assert yaml.safe_load((out / "config.yaml").read_text())["apply"]["package"] == str(folder.resolve())


def test_apply_refuses_a_version_it_cannot_honour(mini_study, small_bids, tmp_path, capsys):
    from pipeline.sharing import apply as apply_cli

    archive = mini_study / "package" / "model.tar.gz"
    for model, version, says in [(str(archive), "1", "is a package on disk"), ("lab/brainage:1", "2", "give one")]:
        with pytest.raises(SystemExit) as done:
            apply_cli.main([str(small_bids), str(tmp_path / "out"), "participant", "--model", model,
                            "--version", version, "--registry", str(tmp_path / "registry")])
        assert done.value.code == 2 and says in capsys.readouterr().err
