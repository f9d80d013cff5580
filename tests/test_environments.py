"""One pinned set, many forms: requirements.lock is the source. The rules' conda environment
(workflow/envs/pipeline.yaml) and the conda users' environment.yml are generated from it (its pins
plus torch from the CPU index; environment.yml adds this package); the container recipes (Dockerfile,
Apptainer.def) install the lock itself; and every place that pins torch (Makefile, both environments,
the recipes, README) pins the same build from the CPU index.

Regenerate both environments after editing the lock: ``python tests/test_environments.py``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCK, RULE_ENV, CONDA_ENV = ROOT / "requirements.lock", ROOT / "workflow/envs/pipeline.yaml", ROOT / "environment.yml"
DOCKERFILE, APPTAINER = ROOT / "Dockerfile", ROOT / "Apptainer.def"
TORCH = "torch==2.13.0"  # installed before the lock, from the CPU index (the lock leaves torch out)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REGENERATE = "python tests/test_environments.py"
HEADER = f"""\
# Software of every rule (snakemake --use-conda): exactly the pins of requirements.lock, plus torch
# from the CPU index. Generated from requirements.lock by `{REGENERATE}`;
# tests/test_environments.py fails when the two differ.
"""
CONDA_HEADER = f"""\
# Conda environment with the same pinned set that `make demo` installs into .venv (torch from the CPU
# index, then requirements.lock, then this package, editable): `conda env create -f environment.yml`.
# Generated from requirements.lock by `{REGENERATE}`; tests/test_environments.py fails
# when the two differ. The pins include snakemake-executor-plugin-slurm (workflow/profiles/slurm).
"""


def pins(lines) -> dict[str, str]:
    """``name==version`` lines → {normalised name: version} (comments and options skipped)."""
    found = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split("==", 1)
            found[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return found


def pip_entries(lock_text: str, *extra: str) -> list[str]:
    """The pip section of a generated environment: the CPU index, torch, the lock's pins (sorted), ``extra``."""
    lines = sorted((line.strip() for line in lock_text.splitlines() if "==" in line and not line.startswith("#")),
                   key=str.lower)
    return [f"--extra-index-url {CPU_INDEX}", TORCH, *lines, *extra]


def rule_env(lock_text: str) -> str:
    """The text of workflow/envs/pipeline.yaml for the lock ``lock_text``."""
    body = {"channels": ["conda-forge"], "dependencies": ["python=3.11", "pip", {"pip": pip_entries(lock_text)}]}
    return HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def conda_env(lock_text: str) -> str:
    """The text of environment.yml for the lock ``lock_text``: the rules' pins, and this package
    (editable, from the folder holding environment.yml)."""
    body = {"name": "pipeline", "channels": ["conda-forge"],
            "dependencies": ["python=3.11", "pip", {"pip": pip_entries(lock_text, "-e .")}]}
    return CONDA_HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def pip_section(path: Path) -> list[str]:
    return next(d["pip"] for d in yaml.safe_load(path.read_text())["dependencies"] if isinstance(d, dict))


@pytest.mark.parametrize("path, generate", [(RULE_ENV, rule_env), (CONDA_ENV, conda_env)], ids=["rules", "conda"])
def test_each_environment_has_exactly_the_locks_pins_plus_torch(path, generate):
    listed = pip_section(path)
    lock = pins(LOCK.read_text().splitlines())
    missing = {k: v for k, v in lock.items() if pins(listed).get(k) != v}
    extra = {k: v for k, v in pins(listed).items() if k not in lock and k != "torch"}
    assert not missing and not extra, (f"{path} differs from {LOCK}: lacks or pins otherwise {missing}, "
                                       f"adds {extra}. Regenerate it: {REGENERATE}")
    assert "numba" in pins(listed)  # the augmentation needs it (issue #19)
    assert path.read_text() == generate(LOCK.read_text()), f"{path} is out of date; regenerate: {REGENERATE}"


def test_environment_yml_installs_this_package_from_its_folder():
    assert pip_section(CONDA_ENV)[-1] == "-e ." and "-e ." not in pip_section(RULE_ENV)
    assert yaml.safe_load(CONDA_ENV.read_text())["name"] == "pipeline"


def test_torch_is_pinned_alike_and_from_the_cpu_index_everywhere():
    for listed in (pip_section(CONDA_ENV), pip_section(RULE_ENV)):
        assert TORCH in listed and any(CPU_INDEX in entry for entry in listed)
    for recipe in (DOCKERFILE, APPTAINER):
        assert re.search(rf"^\s*(RUN )?pip install {re.escape(TORCH)} --index-url ", recipe.read_text(), re.M), recipe
        assert f"TORCH_INDEX={CPU_INDEX}\n" in recipe.read_text(), f"{recipe}: the default build is the CPU one"
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --quiet {TORCH} $(TORCH_INDEX)" in makefile and f"--index-url {CPU_INDEX}" in makefile
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {TORCH} --index-url {CPU_INDEX}" in readme
    assert not re.search(r"pip install torch==[\d.]+\s*(#|$)", readme, re.M)  # never without the index


def dockerfile_copies() -> list[str]:
    """The sources of the Dockerfile's COPY instructions."""
    return [source for line in DOCKERFILE.read_text().splitlines() if line.startswith("COPY ")
            for source in line.split()[1:-1]]


def apptainer_section(name: str) -> list[str]:
    """The lines of a %section of Apptainer.def, stripped."""
    lines, inside = [], False
    for line in APPTAINER.read_text().splitlines():
        if line.startswith("%"):
            inside = line.split()[0] == f"%{name}"
        elif inside and line.strip():
            lines.append(line.strip())
    return lines


def test_the_container_recipes_install_the_lock_then_the_package_not_editable():
    """After torch (checked above): requirements.lock verbatim, then this checkout with --no-deps."""
    docker_steps = " ".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    apptainer_steps = apptainer_section("post")
    for steps in (docker_steps, " ".join(apptainer_steps)):
        torch, lock, package = (steps.index(f"pip install {TORCH}"), steps.index("pip install -r requirements.lock"),
                                steps.index("pip install --no-deps ."))
        assert torch < lock < package and "-e ." not in steps and "--editable" not in steps
    assert "requirements.lock" in dockerfile_copies() and dockerfile_copies().index("requirements.lock") == 0
    assert any(line.split()[0] == "requirements.lock" for line in apptainer_section("files"))


def test_every_file_the_recipes_copy_exists_and_the_build_needs_no_other():
    docker = dockerfile_copies()
    apptainer = [line.split()[0] for line in apptainer_section("files")]
    assert set(docker) == set(apptainer), "Dockerfile and Apptainer.def copy different files"
    assert all((ROOT / name).exists() for name in docker), [n for n in docker if not (ROOT / n).exists()]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", "src", "workflow", project["readme"], *project["license-files"]}
    assert needed <= set(docker), f"the package build needs {sorted(needed - set(docker))}"
    allowed = {line[1:] for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")}
    assert allowed == set(docker), ".dockerignore lets in exactly what the Dockerfile copies"


def test_the_images_run_the_console_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["bids-deepstudy"] == "pipeline.__main__:main"
    assert 'ENTRYPOINT ["bids-deepstudy"]' in DOCKERFILE.read_text()
    assert apptainer_section("runscript") == ['exec bids-deepstudy "$@"']


def test_the_default_image_is_this_versions_and_documented():
    from pipeline import __version__
    from pipeline.common.config import schema

    default = schema()["properties"]["container_image"]["default"]
    assert default.startswith("docker://") and default.endswith(f":{__version__}")
    assert f"`{default}`" in (ROOT / "config" / "README.md").read_text()
    assert default.removeprefix("docker://") in DOCKERFILE.read_text()  # the tag its build comment gives


def fake_apptainer(folder: Path) -> Path:
    """An `apptainer` that only tells its version: Snakemake checks it before planning any job."""
    folder.mkdir()
    (folder / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.3.4'\n")
    (folder / "apptainer").chmod(0o755)
    return folder


def test_the_workflow_runs_its_jobs_in_the_configured_image_only_with_apptainer(small_bids, tmp_path):
    """A dry run plans to pull config container_image under --sdm apptainer; without it, no image."""
    from pipeline.common.config import schema
    from pipeline.common.locations import SNAKEFILE

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config.update(bids_dir=str(small_bids), results_dir=str(tmp_path / "results"))
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    path = f"{fake_apptainer(tmp_path / 'bin')}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"

    def dry_run(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(SNAKEFILE), "-n", "--cores", "1",
                              "--configfile", "my.yaml", *args], cwd=tmp_path, env={**os.environ, "PATH": path},
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{shlex.join(run.args)}\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
        return run.stdout + run.stderr

    default = schema()["properties"]["container_image"]["default"]
    assert f"image {default} will be pulled" in dry_run("--sdm", "apptainer")
    mine = "docker://registry.example.org/lab/bids-deepstudy:mine"
    assert f"image {mine} will be pulled" in dry_run("--sdm", "apptainer", "--config", f"container_image={mine}")
    assert "will be pulled" not in dry_run()


if __name__ == "__main__":
    for path, generate in ((RULE_ENV, rule_env), (CONDA_ENV, conda_env)):
        path.write_text(generate(LOCK.read_text()))
        print(f"wrote {path}", file=sys.stderr)
