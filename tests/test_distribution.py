"""The distribution: a wheel that carries the workflow, its console command, and jobs that run on
the interpreter Snakemake runs on (no activated environment needed)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.common import launch
from pipeline.common.locations import DISTRIBUTION, PROFILES, SNAKEFILE

ROOT = Path(__file__).resolve().parents[1]
BARE_PATH = "/usr/bin:/bin"  # no virtual environment and no `python` on it


def bare_env(**extra: str) -> dict[str, str]:
    """The environment of a user who never activated anything: no PYTHONPATH, no venv on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PATH": BARE_PATH, **extra}


def study_config(folder: Path, bids: Path) -> Path:
    """config/config.yaml pointed at ``bids``, results in ``folder/results``."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(bids_dir=str(bids), results_dir=str(folder / "results"))
    config["explain"]["groundtruth"] = None  # the demo's ground truth is not this dataset's
    path = folder / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_pyproject_lists_every_subpackage_and_the_workflow():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {"pipeline"} | {f"pipeline.{p.parent.name}" for p in (ROOT / "src" / "pipeline").glob("*/__init__.py")}
    assert listed == found | {"pipeline.workflow", "pipeline.config"}
    assert project["project"]["name"] == DISTRIBUTION and "bids-deepstudy" in project["project"]["scripts"]


def test_run_adds_cores_unless_given_and_names_packaged_profiles():
    assert launch.command(["-n"])[-3:] == ["--cores", "all", "-n"]
    assert launch.command(["-n"])[:5] == [sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE)]
    assert "all" not in launch.command(["--cores", "2"]) and "all" not in launch.command(["-j=4"])
    assert launch.command(["--profile", "slurm"])[-2:] == ["--profile", str(PROFILES / "slurm")]
    assert launch.command(["--profile=slurm"])[-1] == f"--profile={PROFILES / 'slurm'}"
    assert launch.command(["--profile", "my/profile"])[-1] == "my/profile"
    assert launch.environment()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_checkout_snakemake_runs_jobs_on_its_own_interpreter_without_activation(small_bids, tmp_path):
    """`.venv/bin/snakemake …` with neither the venv nor any `python` on PATH: the ingest job runs."""
    config = study_config(tmp_path, small_bids)
    snakemake = Path(sys.executable).parent / "snakemake"
    run = subprocess.run([str(snakemake), str(tmp_path / "results" / "manifest.tsv"), "-s", str(SNAKEFILE),
                          "--cores", "1", "--configfile", str(config)],
                         cwd=tmp_path, env=bare_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results" / "manifest.tsv").read_text().count("sub-0") >= 4


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding the wheel built from this checkout, installed (not editable) without its
    dependencies; those come from this interpreter's site-packages through a .pth file (a path line
    only: the editable install there stays inactive, so `pipeline` is the wheel's)."""
    start = time.perf_counter()
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: the build's own files stay out of the checkout
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name if source.exists() else source.mkdir() or source / name)
    for name in ("src", "workflow", "config"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(root / "dist")], check=True, capture_output=True, env=bare_env())
    [wheel] = (root / "dist").glob("bids_deepstudy-*.whl")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-deps",
                    "--no-index", "-q", str(wheel)], check=True, capture_output=True, env=bare_env())
    print(f"built and installed {wheel.name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return venv


def command(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "bids-deepstudy"), *args], cwd=cwd, env=bare_env(),
                          capture_output=True, text=True, timeout=300)


def test_the_installed_wheel_carries_the_workflow(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import pipeline, pipeline.common.locations as l; print(pipeline.__file__); print(l.SNAKEFILE); "
                            "print(l.STUDY_CONFIG)"],
                           cwd=tmp_path, env=bare_env(), capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(installed) for p in where) and Path(where[1]).is_file()
    assert Path(where[2]).read_text() == (ROOT / "config" / "study.yaml").read_text()  # what `init` fills in


def test_the_console_command_dry_runs_a_study_and_checks_configs_from_another_folder(installed, small_bids, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = study_config(tmp_path, small_bids)
    check = command(installed, "check", str(config), cwd=elsewhere)
    assert check.returncode == 0 and "no problems" in check.stdout, check.stderr
    dry = command(installed, "run", "-n", "-p", "--configfile", str(config), cwd=elsewhere)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "python -m pipeline.intake.ingest" in dry.stdout and f"profile {installed}" in dry.stderr  # the packaged one


@pytest.mark.slow  # 13 s more; the checkout test above covers the PATH prefix
def test_the_console_command_runs_a_job_on_its_interpreter(installed, small_bids, tmp_path):
    config = study_config(tmp_path, small_bids)
    run = command(installed, "run", str(tmp_path / "results" / "targets.json"), "--cores", "1",
                  "--configfile", str(config), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "results" / "manifest.tsv").exists()


def test_the_console_commands_help(installed, tmp_path):
    for args, expected in [(["apply", "--help"], "--session-label"), (["fetch", "--help"], "--registry"),
                           (["demo", "--help"], "--n-subjects"), (["--help"], "bids-deepstudy run"),
                           (["--version"], "bids-deepstudy 0.")]:
        run = command(installed, *args, cwd=tmp_path)
        assert run.returncode == 0 and expected in run.stdout, (args, run.stdout, run.stderr)
    assert command(installed, "nonsense", cwd=tmp_path).returncode != 0
