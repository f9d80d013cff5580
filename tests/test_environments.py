"""One pinned set, many forms: requirements.lock is the source. The rules' conda environment
(workflow/envs/pipeline.yaml) and the conda users' environment.yml are generated from it (its pins
plus torch from the CPU index; environment.yml adds this package); the container recipes (Dockerfile,
Apptainer.def) install the lock itself; and every place that pins torch (Makefile, both environments,
the recipes, README) pins the same build from the CPU index.

Regenerate both environments after editing the lock: ``python tests/test_environments.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCK, RULE_ENV, CONDA_ENV = ROOT / "requirements.lock", ROOT / "workflow/envs/pipeline.yaml", ROOT / "environment.yml"
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
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --quiet {TORCH} $(TORCH_INDEX)" in makefile and f"--index-url {CPU_INDEX}" in makefile
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {TORCH} --index-url {CPU_INDEX}" in readme
    assert not re.search(r"pip install torch==[\d.]+\s*(#|$)", readme, re.M)  # never without the index


if __name__ == "__main__":
    for path, generate in ((RULE_ENV, rule_env), (CONDA_ENV, conda_env)):
        path.write_text(generate(LOCK.read_text()))
        print(f"wrote {path}", file=sys.stderr)
