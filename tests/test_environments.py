"""One pinned set: requirements.lock is the source; the rules' conda environment
(workflow/envs/pipeline.yaml) lists exactly its pins plus torch, and every place that pins torch
(Makefile, environment.yml, README) pins the same build from the CPU index.

Regenerate the rules' environment after editing the lock: ``python tests/test_environments.py``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LOCK, RULE_ENV, CONDA_ENV = ROOT / "requirements.lock", ROOT / "workflow/envs/pipeline.yaml", ROOT / "environment.yml"
TORCH = "torch==2.13.0"  # installed before the lock, from the CPU index (the lock leaves torch out)
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HEADER = f"""\
# Software of every rule (snakemake --use-conda): exactly the pins of requirements.lock, plus torch
# from the CPU index. Generated from requirements.lock by `python tests/test_environments.py`;
# tests/test_environments.py fails when the two differ.
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


def rule_env(lock_text: str) -> str:
    """The text of workflow/envs/pipeline.yaml for the lock ``lock_text``."""
    lines = sorted((line.strip() for line in lock_text.splitlines() if "==" in line and not line.startswith("#")),
                   key=str.lower)
    body = {"channels": ["conda-forge"],
            "dependencies": ["python=3.11", "pip", {"pip": [f"--extra-index-url {CPU_INDEX}", TORCH, *lines]}]}
    return HEADER + yaml.safe_dump(body, sort_keys=False, default_flow_style=False)


def test_the_rules_environment_has_exactly_the_locks_pins_plus_torch():
    env = yaml.safe_load(RULE_ENV.read_text())
    listed = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lock = pins(LOCK.read_text().splitlines())
    missing = {k: v for k, v in lock.items() if pins(listed).get(k) != v}
    extra = {k: v for k, v in pins(listed).items() if k not in lock and k != "torch"}
    assert not missing and not extra, (f"{RULE_ENV} differs from {LOCK}: lacks or pins otherwise {missing}, "
                                       f"adds {extra}. Regenerate it: python tests/test_environments.py")
    assert "numba" in pins(listed)  # the augmentation needs it (issue #19)
    assert RULE_ENV.read_text() == rule_env(LOCK.read_text()), "regenerate: python tests/test_environments.py"


def test_torch_is_pinned_alike_and_from_the_cpu_index_everywhere():
    conda_pip = next(d["pip"] for d in yaml.safe_load(CONDA_ENV.read_text())["dependencies"] if isinstance(d, dict))
    rule_pip = next(d["pip"] for d in yaml.safe_load(RULE_ENV.read_text())["dependencies"] if isinstance(d, dict))
    for listed in (conda_pip, rule_pip):
        assert TORCH in listed and any(CPU_INDEX in entry for entry in listed)
    assert "-r requirements.lock" in " ".join(conda_pip)
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --quiet {TORCH} $(TORCH_INDEX)" in makefile and f"--index-url {CPU_INDEX}" in makefile
    readme = (ROOT / "README.md").read_text()
    assert f"pip install {TORCH} --index-url {CPU_INDEX}" in readme
    assert not re.search(r"pip install torch==[\d.]+\s*(#|$)", readme, re.M)  # never without the index


if __name__ == "__main__":
    RULE_ENV.write_text(rule_env(LOCK.read_text()))
    print(f"wrote {RULE_ENV}", file=sys.stderr)
