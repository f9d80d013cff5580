"""Apply mode without a full run: no-target ingestion, the apply config, and the Snakefile's apply plan."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import ingested, stage_config
from pipeline.common import package
from pipeline.sharing.apply import SNAKEFILE, apply_config
from pipeline.intake.ingest import main as ingest_main


def test_ingest_without_a_target_keeps_every_image(small_bids, tmp_path):
    result = ingested(small_bids, None, "regression")
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
    assert config["apply"] == {"package": str(pkg.folder.resolve()), "name": "lab/brainage:1", "maps": True,
                               "calibration": None}
    assert config["participants"]["include"] == ["01"]


def test_apply_mode_plans_ingest_and_the_packages_grid_not_a_study(mini_study, small_bids, tmp_path):
    run = apply_run(mini_study, small_bids, tmp_path / "out", "-n", "-p")
    assert run.returncode == 0, run.stderr[-3000:]
    table = run.stdout.split("Job stats:")[1].split("\n\n")[0]
    jobs = {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}
    assert jobs == {"ingest": 1, "exclusions": 1, "grid": 1, "predict": 1, "predict_maps": 1, "predict_report": 1,
                    "bidsvalidation": 1, "all": 1, "qc": 1, "predict_retest": 1,  # test-retest: qc's and the model's
                    "applyout": 1}  # the output folder as a BIDS derivative dataset
    ingest_command = next(line for line in run.stdout.splitlines() if "python -m pipeline.intake.ingest" in line)
    assert '"target": null' in ingest_command and '"task": "regression"' in ingest_command  # images only
    grid_command = next(line for line in run.stdout.splitlines() if "python -m pipeline.intake.grid" in line)
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
    maps = fold_mean_maps(pkg, x, ["gradcam"], Settings.of({"gradcam_layer": "features.1"}), None)["gradcam"]
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
    """--model names an archive or folder on disk: no registry; the archive is unpacked once, by its
    sha256, into the work folder, where the config goes and Snakemake runs."""
    from pipeline.sharing import apply as apply_cli

    calls = []
    monkeypatch.setattr(apply_cli.launch, "snakemake", lambda args, readable=False: calls.append(args) or 0)
    archive, out, work = mini_study / "package" / "model.tar.gz", tmp_path / "out", tmp_path / "work"
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            apply_cli.main([str(small_bids), str(out), "participant", "--model", str(archive), "--work-dir", str(work),
                            "--session-label", "ses-01", "--registry", str(tmp_path / "no-registry")])
        assert done.value.code == 0
    [unpacked] = (work / "models").iterdir()
    assert unpacked.name == f"archive-{package.sha256(archive)[:16]}"
    config = yaml.safe_load((work / "config.yaml").read_text())
    assert config["apply"]["package"] == str(unpacked.resolve()) and str(archive) in config["apply"]["name"]
    assert config["sessions"] == "ses-01" and config["work_dir"] == str(work.resolve())
    assert calls[0][:6] == ["--directory", str(work.resolve()), "--configfile", str(work.resolve() / "config.yaml"),
                            "--cores", "all"]  # the same default as run's

    folder = mini_study / "package" / "model"
    with pytest.raises(SystemExit):
        apply_cli.main([str(small_bids), str(out), "participant", "--model", str(folder), "--work-dir", str(work)])
    assert yaml.safe_load((work / "config.yaml").read_text())["apply"]["package"] == str(folder.resolve())


def test_apply_dry_run_writes_nothing_and_plans_one_line_per_job(mini_study, small_bids, tmp_path, capsys,
                                                                   monkeypatch):
    """`apply … --dry-run` (Snakemake plans for real): the archive unpacked, the config written and
    Snakemake's state kept in a scratch folder; no OUTPUT_DIR and no work folder afterwards."""
    from pipeline.sharing import apply as apply_cli

    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SystemExit) as done:
        apply_cli.main([str(small_bids), "out", "participant", "--model", str(mini_study / "package" / "model.tar.gz"),
                        "--skip-bids-validation", "--dry-run"])
    out = capsys.readouterr()
    assert done.value.code == 0, out.err[-3000:]
    assert out.out.startswith("plan: ") and "  predict" in out.out and "add --print-commands (-p)" in out.out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # neither out/ nor work/


def test_apply_refuses_a_version_it_cannot_honour(mini_study, small_bids, tmp_path, capsys):
    from pipeline.sharing import apply as apply_cli

    archive = mini_study / "package" / "model.tar.gz"
    for model, version, says in [(str(archive), "1", "is a package on disk"), ("lab/brainage:1", "2", "give one")]:
        with pytest.raises(SystemExit) as done:
            apply_cli.main([str(small_bids), str(tmp_path / "out"), "participant", "--model", model,
                            "--version", version, "--registry", str(tmp_path / "registry"),
                            "--work-dir", str(tmp_path / "work")])
        assert done.value.code == 2 and says in capsys.readouterr().err


def planned_jobs(run: subprocess.CompletedProcess) -> dict[str, int]:
    table = run.stdout.split("Job stats:")[1].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def test_apply_can_predict_only_or_compute_chosen_maps(mini_study, small_bids, tmp_path, monkeypatch):
    """--maps none plans no map job (the report says so); --maps a,b puts those methods in the run's config."""
    from pipeline.sharing import apply as apply_cli

    monkeypatch.setattr(apply_cli.launch, "snakemake", lambda args, readable=False: 0)
    folder, out, work = mini_study / "package" / "model", tmp_path / "out", tmp_path / "work"
    for maps, methods, enabled in (("none", ["occlusion", "gradient"], False), ("saliency,occlusion",
                                                                               ["gradient", "occlusion"], True)):
        with pytest.raises(SystemExit):
            apply_cli.main([str(small_bids), str(out), "participant", "--model", str(folder), "--maps", maps,
                            "--work-dir", str(work)])
        config = yaml.safe_load((work / "config.yaml").read_text())
        assert config["apply"]["maps"] is enabled and config["explain"]["methods"] == methods
    with pytest.raises(SystemExit) as done:
        apply_cli.main([str(small_bids), str(out), "participant", "--model", str(folder), "--maps", "shap"])
    assert done.value.code == 2

    pkg = package.load(folder)
    config = apply_config(small_bids, out, pkg, "lab/brainage:1", [], None, maps=False)
    out.mkdir(exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(out),
                          "--configfile", str(out / "config.yaml"), "--cores", "1", "-n"], capture_output=True, text=True,
                         env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "predict_maps" not in planned_jobs(run) and planned_jobs(run)["predict"] == 1


def write_predictions(path: Path, n: int = 12, seed: int = 0) -> pd.DataFrame:
    """An ensemble's predictions.tsv of a site whose scanner shifts and compresses the predictions:
    predicted = 15 + 0.6 * true + noise; sub-01 has two sessions."""
    rng = np.random.default_rng(seed)
    ages = np.linspace(20, 80, n)
    rows = [{"participant_id": f"sub-{i:02d}", "session": "", "image_id": f"sub-{i:02d}", "true": age} for i, age in
            enumerate(ages, 1)]
    rows.append({"participant_id": "sub-01", "session": "2", "image_id": "sub-01_ses-2", "true": ages[0]})
    table = pd.DataFrame(rows)
    table["predicted"] = 15 + 0.6 * table["true"] + rng.normal(0, 1.5, len(table))
    table.drop(columns="true").to_csv(path, sep="\t", index=False)
    return table


def test_calibration_fits_on_the_labelled_subset_and_scores_only_the_others(tmp_path):
    from pipeline.sharing.calibrate import main as calibrate_main

    truth = write_predictions(tmp_path / "predictions.tsv")
    ages = truth.drop_duplicates("participant_id")
    labelled = ages.assign(age=ages["true"].round(1).astype(str))
    labelled.loc[labelled["participant_id"] == "sub-12", "age"] = "n/a"  # no target: applied, not scored
    labelled.assign(participant_id=labelled["participant_id"].str.removeprefix("sub-"))[["participant_id", "age"]] \
        .to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    calibrate_main(["--predictions", str(tmp_path / "predictions.tsv"), "--table", str(tmp_path / "participants.tsv"),
                    "--column", "age", "--participants", "01", "03", "05", "07", "09", "sub-11",
                    "--out-json", str(tmp_path / "calibration.json"), "--out-tsv", str(tmp_path / "calibrated.tsv")])
    summary = json.loads((tmp_path / "calibration.json").read_text())
    table = pd.read_csv(tmp_path / "calibrated.tsv", sep="\t", dtype={"session": str})

    chosen = ["sub-01", "sub-03", "sub-05", "sub-07", "sub-09", "sub-11"]
    means = truth[truth["participant_id"].isin(chosen)].groupby("participant_id")[["true", "predicted"]].mean()
    slope, intercept = np.polyfit(means["true"].round(1), means["predicted"], 1)
    assert summary["calibration_participants"] == chosen and summary["n"] == 6
    assert summary["slope"] == pytest.approx(slope) and summary["intercept"] == pytest.approx(intercept)
    assert summary["slope_ci"][0] < 0.6 < summary["slope_ci"][1] and summary["intercept_ci"][0] < summary["intercept"]
    assert summary["participants"] == {"calibration": 6, "evaluation": 5, "applied": 1}
    assert summary["warnings"] == [] and summary["without_predictions"] == []
    roles = table.set_index("image_id")["role"]
    assert roles["sub-01_ses-2"] == "calibration" and roles["sub-02"] == "evaluation" and roles["sub-12"] == "applied"
    calibrated = table[table["role"] == "calibration"]["predicted_calibrated"]
    assert calibrated.isna().all()  # the calibration participants get no calibrated value, and no score
    others = table[table["role"] != "calibration"]
    np.testing.assert_allclose(others["predicted_calibrated"], (others["predicted"] - intercept) / slope)
    scores = summary["evaluation"]
    assert scores["n"] == 5 and scores["calibrated_mae"] < scores["mae"] / 3  # the site's bias is gone
    held = others[others["role"] == "evaluation"]
    assert scores["mae"] == pytest.approx(np.mean(np.abs(held["predicted"] - held["true"])))
    assert scores["calibrated_mae_ci"][0] <= scores["calibrated_mae"] <= scores["calibrated_mae_ci"][1]


def test_calibration_is_checked_before_any_job_and_reaches_the_plan_and_the_report(mini_study, small_bids, tmp_path):
    from pipeline.common.errors import InputError
    from pipeline.sharing.calibrate import main as calibrate_main
    from pipeline.sharing.predict import build_report

    pkg, out = package.load(mini_study / "package" / "model"), tmp_path / "out"
    participants = small_bids / "participants.tsv"  # ages of sub-01, -03, -04, -05; sub-02 n/a
    with pytest.raises(InputError, match=r"--calibrate-participants sub-02: no age in"):
        apply_config(small_bids, out, pkg, "x", [], None, calibration={"table": str(participants),
                                                                      "participants": ["02", "03", "04"]})
    with pytest.raises(InputError, match=r"sub-04 are not among --participant-label"):
        apply_config(small_bids, out, pkg, "x", ["01", "03"], None,
                     calibration={"table": str(participants), "participants": ["01", "03", "04"]})
    with pytest.raises(InputError, match=r"has no column 'height'"):
        apply_config(small_bids, out, pkg, "x", [], None, calibration={"table": str(participants), "column": "height"})
    config = apply_config(small_bids, out, pkg, "x", [], None, maps=False,
                          calibration={"table": str(participants), "participants": ["01", "03", "04"]})
    assert config["apply"]["calibration"] == {"table": str(participants.resolve()), "column": "age",
                                              "participants": ["01", "03", "04"]}
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "--directory", str(out),
                          "--configfile", str(out / "config.yaml"), "--cores", "1", "-n", "-p"], capture_output=True,
                         text=True, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert planned_jobs(run)["calibrate"] == 1 and "predict_maps" not in planned_jobs(run)
    command = next(line for line in run.stdout.splitlines() if "python -m pipeline.sharing.calibrate" in line)
    assert f"--table {participants.resolve()}" in command and "--participants 01 03 04" in command

    # The report of a recalibrated, predictions-only run (real calibration files).
    write_predictions(tmp_path / "predictions.tsv")
    (tmp_path / "ages.tsv").write_text("participant_id\tage\n" + "".join(
        f"sub-{i:02d}\t{age:.1f}\n" for i, age in enumerate(np.linspace(20, 80, 12), 1)))
    calibrate_main(["--predictions", str(tmp_path / "predictions.tsv"), "--table", str(tmp_path / "ages.tsv"),
                    "--column", "age", "--participants", "01", "04", "08", "12", "--out-json",
                    str(tmp_path / "calibration.json"), "--out-tsv", str(tmp_path / "calibrated.tsv")])
    report = build_report(pkg, "lab/brainage:1", tmp_path / "predictions.tsv", None, [], [], config,
                          tmp_path / "report.html", tmp_path / "calibration.json").read_text()
    assert "Recalibration to this site" in report and "fitted on 4 participants" in report
    assert "Calibration participants: 4 (never scored); held out with a known target: 8" in report
    assert "Not computed: predictions only" in report and "calibrated 95 % CI" in report
