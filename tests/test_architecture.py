"""The house rules of the code (docs/ARCHITECTURE.md), checked on the real source: imports go down
the layers, no import cycle, no module over 450 lines, every rule's code inputs derived from the import graph, one source per
fact (defaults in the schema, registries behind the schema's enums, one preprocessing chain)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from pipeline.common import codegraph, config
from pipeline.common.locations import PACKAGE, WORKFLOW
from pipeline.intake import ingest, recipe, steps
from pipeline.learning import models
from pipeline.results import linear
from pipeline.results import attribution, metrics

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
ROOMS = ("common", "intake", "learning", "results", "sharing")  # the layers, lowest first


def modules() -> list[str]:
    """Dotted names of every module of the package."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def layer(name: str) -> int | str:
    """A module's layer: -1 the package itself (``pipeline``: its version), 0 to 4 its room in
    ``ROOMS``, 5 the top (``pipeline.__main__``, ``pipeline.run``, ``pipeline.check``), "demo" beside them."""
    parts = name.split(".")
    if len(parts) == 1:
        return -1
    if parts[1] == "demo":
        return "demo"
    return ROOMS.index(parts[1]) if parts[1] in ROOMS else len(ROOMS)


def upward_imports(names: list[str], package: Path = PACKAGE) -> list[str]:
    """Each import, at module level or inside a function, that runs up the layers: a room importing
    a higher room or an entry point, anything but an entry point importing ``demo``, ``demo``
    importing an entry point, the package itself importing any of its modules."""
    found = []
    for name in names:
        here = layer(name)
        for other in sorted(codegraph.imported(codegraph.module_file(name, package), package)):
            there = layer(other)
            if there == "demo":
                bad = here not in ("demo", len(ROOMS))
            elif here == "demo":
                bad = there == len(ROOMS)
            else:
                bad = there > here
            if bad:
                found.append(f"{name} -> {other}")
    return found


def test_imports_go_down_the_layers():
    """common < intake < learning < results < sharing < entry points, demo beside: a module never
    imports one of a higher layer, so a job's code (its import closure, ``codegraph``) holds no
    module of a later stage, and editing one reruns no earlier stage."""
    assert upward_imports(modules()) == []


def test_later_stages_hold_no_other_stages_command():
    """Downward imports the layers allow that would still rerun jobs for nothing: the stages that
    carry maps or labels to native space hold geometry, not the preprocessing chain (ANTs jobs'
    code), and export holds the mean training image, not the explain command."""
    for stage in ("results.evaluate", "results.explain", "sharing.predict", "sharing.export"):
        assert "pipeline.intake.preprocess" not in codegraph.closure(f"pipeline.{stage}"), stage
    assert "pipeline.results.explain" not in codegraph.closure("pipeline.sharing.export")


def test_the_layer_check_sees_imports_inside_functions(tmp_path):
    root = tmp_path / "pipeline"
    for folder in (root, *(root / room for room in (*ROOMS, "demo"))):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (root / "stage.py").write_text("from pipeline.sharing import pack\nfrom pipeline.demo import cohort\n")
    (root / "common" / "base.py").write_text("import numpy\n")
    (root / "intake" / "grid.py").write_text("from pipeline.common import base\n\n\n"
                                             "def f():\n    from pipeline.sharing import pack\n")
    (root / "learning" / "train.py").write_text("import pipeline.results.diagnostics\nimport pipeline.stage\n")
    (root / "results" / "diagnostics.py").write_text("from pipeline.intake.grid import f\n")
    (root / "sharing" / "pack.py").write_text("from pipeline import demo\n")
    (root / "demo" / "cohort.py").write_text("from pipeline.intake import grid\nfrom pipeline import stage\n")
    names = ["pipeline.stage", "pipeline.common.base", "pipeline.intake.grid", "pipeline.learning.train",
             "pipeline.results.diagnostics", "pipeline.sharing.pack", "pipeline.demo.cohort"]
    assert upward_imports(names, root) == [
        "pipeline.intake.grid -> pipeline.sharing", "pipeline.intake.grid -> pipeline.sharing.pack",
        "pipeline.learning.train -> pipeline.results.diagnostics", "pipeline.learning.train -> pipeline.stage",
        "pipeline.sharing.pack -> pipeline.demo", "pipeline.demo.cohort -> pipeline.stage"]


def test_no_import_cycle_and_no_long_module():
    graph = {name: codegraph.imported(codegraph.module_file(name)) for name in modules()}
    done, path = set(), []

    def visit(name):
        if name in path:
            raise AssertionError(f"import cycle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for other in graph.get(name, ()):
            visit(other)
        path.pop()
        done.add(name)

    for name in graph:
        visit(name)
    long = {name: n for name in graph if (n := len(codegraph.module_file(name).read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_code_inputs_follow_imports_inside_functions_and_through_packages(tmp_path):
    root = tmp_path / "pipeline"
    for folder in (root, root / "a"):
        folder.mkdir()
        (folder / "__init__.py").write_text("")
    (root / "entry.py").write_text("from pipeline.a import lib\n")
    (root / "a" / "lib.py").write_text("def f():\n    from pipeline.a.deep import g\n    import pipeline.other\n")
    (root / "a" / "deep.py").write_text("g = 1\n")
    (root / "other.py").write_text("")
    (root / "unused.py").write_text("")
    found = {p.relative_to(root).as_posix() for p in codegraph.code_of("pipeline.entry", package=root)}
    assert found == {"__init__.py", "entry.py", "a/__init__.py", "a/lib.py", "a/deep.py", "other.py"}


def test_the_code_fingerprint_moves_with_code_and_not_with_docstrings_or_comments(tmp_path):
    """Editing a docstring or a comment of a module a command imports leaves the command's
    fingerprint file untouched (its jobs do not rerun); editing code rewrites it."""
    root = tmp_path / "pipeline"
    root.mkdir()
    (root / "__init__.py").write_text('"""The package."""\n')
    (root / "atomic.py").write_text('"""Atomic writes."""\n\n\ndef write(x):\n    """Write x."""\n    return x + 1\n')
    (root / "stage.py").write_text("from pipeline import atomic\n\nprint(atomic.write(1))\n")
    (root / "unrelated.py").write_text("y = 2\n")
    folder = tmp_path / ".snakemake" / "pipeline-code"
    path = codegraph.fingerprint_file("pipeline.stage", folder, package=root)
    before = path.read_text()
    assert [line.split("  ")[1] for line in before.splitlines()] == ["pipeline/__init__.py", "pipeline/atomic.py",
                                                                    "pipeline/stage.py"]
    os.utime(path, (1, 1))
    (root / "atomic.py").write_text('"""Atomic writes, reworded."""\n\n\ndef write(x):\n    # a comment\n\n'
                                    '    """Write x, reworded."""\n    return x + 1  # and another\n')
    (root / "unrelated.py").write_text("y = 3\n")
    assert codegraph.fingerprint_file("pipeline.stage", folder, package=root) == path
    assert path.stat().st_mtime == 1 and path.read_text() == before
    (root / "atomic.py").write_text('"""Atomic writes."""\n\n\ndef write(x):\n    return x + 2\n')
    codegraph.fingerprint_file("pipeline.stage", folder, package=root)
    assert path.stat().st_mtime > 1 and path.read_text() != before
    assert before.splitlines()[2] == path.read_text().splitlines()[2]  # stage.py itself did not change


def workflow_rules() -> list[tuple[str, str, str]]:
    """(file, rule name, text) of every rule and checkpoint of ``workflow/rules/*.smk``."""
    found = []
    for smk in sorted((WORKFLOW / "rules").glob("*.smk")):
        for text in re.split(r"\n(?=\s*(?:rule|checkpoint) \w+:)", smk.read_text()):
            if (name := re.match(r"\s*(?:rule|checkpoint) (\w+):", text)):
                found.append((smk.name, name.group(1), text))
    return found


def test_every_rule_runs_a_room_module_and_declares_its_code():
    """A rule runs one command, ``python -m pipeline.<room>.<module>`` (train: through its launcher,
    ``{params.launcher} -m …``), and lists ``code("<room>.<module>")`` (the derived import closure)
    among its inputs: editing anything that module imports reruns it, and nothing is listed by hand."""
    checked = 0
    for smk, name, rule in workflow_rules():
        if "shell:" not in rule:
            continue
        shell = rule.split("shell:")[1]
        commands = re.findall(r"-m pipeline\.([\w.]+)", shell)
        assert len(commands) == 1, (smk, name, commands)
        room = commands[0].split(".")[0]
        assert room in ROOMS and commands[0].count(".") == 1, (smk, name, commands[0])
        assert re.findall(r'code=code\("([\w.]+)"\)', rule) == commands, (smk, name)
        assert "source(" not in rule
        assert (PACKAGE / f"{commands[0].replace('.', '/')}.py").exists()
        checked += 1
    assert checked >= 15


def test_every_rule_is_named_after_what_it_runs():
    """A rule is named after the module it runs (``rule export`` runs ``pipeline.sharing.export``),
    or after the module and its subcommand where the module has several (``evaluate_summary`` runs
    ``pipeline.results.evaluate summary``, ``registry_fetch`` ``pipeline.sharing.registry fetch``).
    A rule name is what a log, a SLURM job and a dry run's table show: it leads to the code in one step."""
    named = 0
    for smk, name, rule in workflow_rules():
        if "shell:" not in rule:
            continue
        module, after = re.search(r"-m pipeline\.\w+\.(\w+)(?: ([a-z]\w*))?", rule.split("shell:")[1]).groups()
        assert name == module or (after and name == f"{module}_{after}"), (smk, name, module, after)
        named += 1
    assert named >= 20


def test_no_module_only_forwards_to_another():
    """The package's top level is its door (``__main__``: ``bids-deepstudy``) and the two commands
    that draw on every room (``run``, ``check``); every other command is a room's module, run as
    it is (``python -m pipeline.intake.ingest``), with no forwarding module in between."""
    from pipeline.__main__ import COMMANDS

    top = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "check", "run"]
    for name, (module, _) in COMMANDS.items():
        main = importlib.import_module(module).main
        assert main.__module__ == module, (name, module, main.__module__)  # its own main, not an import


def schema_keys(node=None, prefix=""):
    node = config.schema() if node is None else node
    for key, prop in node.get("properties", {}).items():
        yield prefix + key, prop
        if "properties" in prop:
            yield from schema_keys(prop, f"{prefix}{key}.")


def test_config_readme_gives_the_schema_defaults():
    """config/README.md documents every key with a default, and the default it states is the schema's."""
    text = (REPO / "config" / "README.md").read_text()
    documented = dict(re.findall(r"^\| `([a-z0-9_.]+)` \| ([^|]*) \|", text, re.M))
    schema = dict(schema_keys())
    words = {"train.augmentation": "see below"}
    for key, prop in schema.items():
        if "default" not in prop or ("properties" in prop and key not in documented):
            continue  # a section: its keys are documented one by one
        if key.startswith("train.augmentation."):
            continue  # documented in the augmentation row's text
        assert key in documented, f"config/README.md does not document {key}"
        cell = documented[key].strip()
        if key in words:
            assert cell == words[key]
            continue
        literal = re.match(r"`([^`]*)`", cell)
        assert literal, (key, cell)
        assert yaml.safe_load(literal.group(1)) == prop["default"], (key, literal.group(1), prop["default"])
    assert config.defaults(["explain", "methods"]) == [m for m in attribution.METHODS if m != "gradcam"]  # opt-in
    augmentation = documented["train.augmentation"]
    assert "All are off by default" in text and augmentation.strip() == "see below"
    assert all(v == 0 or v == [] for v in config.defaults(["train", "augmentation"]).values())


def test_registries_are_the_schemas_choices():
    assert set(config.section(["train", "model"])["enum"]) == set(models.REGISTRY)
    assert config.section(["explain", "methods"])["items"]["enum"] == list(attribution.METHODS)
    assert set(attribution.SIGNED) == set(attribution.METHODS)
    for task, headline in metrics.HEADLINE.items():
        assert headline in [m.name for m in metrics.METRICS[task]]


def test_code_defaults_that_mirror_the_config_are_the_schemas():
    """The few keyword defaults of library functions that stand for config keys (calls without a config)."""
    assert inspect.signature(linear.run).parameters["memory_mb"].default == config.defaults(["linear", "memory_mb"])
    assert inspect.signature(linear.fit_fold).parameters["memory_mb"].default == config.defaults(["linear", "memory_mb"])


# The modules that read settings objects or the resolved config: none `.get`s a config key with a
# default of its own. In SETTINGS_READERS every `.get` of a config key's name counts; in
# CONFIG_READERS, whose records share names with config keys (a model's `sampler`, a summary's
# `positive_class`), a `.get` on the config itself (`config`, `cfg`, `args.config`, `hyper`, …).
SETTINGS_READERS = ("intake/ingest.py", "intake/preflight.py", "intake/preprocess.py", "intake/steps.py",
                    "learning/settings.py", "learning/train.py", "learning/trainer.py", "learning/tracking.py",
                    "learning/checkpoints.py", "learning/variants.py", "learning/launch.py",
                    "learning/finetuneconfig.py", "results/attribution.py", "results/explain.py",
                    "results/explainconfig.py", "results/linear.py")
CONFIG_READERS = ("learning/finetune.py", "results/evaluate.py", "results/report.py", "sharing/export.py",
                  "sharing/modelcard.py")
CONFIG_NAMES = re.compile(r"^(args\.)?(config|cfg|hyper|settings|train|explain|card)\b")


def test_settings_are_one_object_per_section_filled_from_the_schema():
    """Ingest, preprocessing, training, the explanation methods and the model card read their config
    as one frozen settings object whose fields are the config's keys, built by ``config.build`` (the
    schema's defaults filled there, an unknown key refused); the modules that read settings or the
    resolved config have no ``.get("<config key>", …)`` of their own."""
    from dataclasses import FrozenInstanceError, fields

    from pipeline.common.errors import InputError
    from pipeline.learning.settings import TrainSettings
    from pipeline.sharing.modelcard import PackageSettings

    assert [f.name for f in fields(steps.PreprocessSettings)] == list(config.section(["preprocess"])["properties"])
    assert {f.name for f in fields(ingest.IngestSettings)} <= set(config.schema()["properties"])
    assert steps.PreprocessSettings.of({}).asdict() == config.defaults(["preprocess"])
    given = ingest.IngestSettings.of({"bids_dir": "ds", "target": None,
                                      "participants": {"include": ["01"], "exclude": []}})
    assert (given.bids_dir, given.target, given.participants["include"]) == ("ds", None, ["01"])
    assert (given.sessions, given.channels) == (config.defaults(["sessions"]), config.defaults(["channels"]))
    with pytest.raises(FrozenInstanceError):
        given.target = "age"
    with pytest.raises(InputError, match="n4_shrink"):
        steps.PreprocessSettings.of({"n4_shrink": 2})
    # train: one variant's settings; asdict() is the mapping hyperparameters.json and the checkpoints'
    # fingerprint were always made of (the workflow's sorted --config), key order included
    train_keys = [k for k in config.section(["train"])["properties"] if k != "variants"]
    assert [f.name for f in fields(TrainSettings)] == train_keys
    defaults = {k: v for k, v in config.defaults(["train"]).items() if k != "variants"}
    assert list(TrainSettings.of({}).asdict().items()) == sorted(defaults.items())
    variant = TrainSettings.of({"epochs": 3, "variants": {"long": {"epochs": 9}}})
    assert (variant.epochs, variant.batch_size) == (3, defaults["batch_size"])
    with pytest.raises(InputError, match="'epoch'"):
        TrainSettings.of({"epoch": 3})
    assert [f.name for f in fields(attribution.Settings) if f.name != "seed"] == [
        k for k in config.section(["explain"])["properties"] if k in {f.name for f in fields(attribution.Settings)}]
    assert attribution.Settings.of({}).window == config.defaults(["explain", "window"])
    assert attribution.Settings.of({"methods": ["gradient"]}).seed == 0  # SmoothGrad's noise: no config key
    with pytest.raises(InputError, match="windw"):
        attribution.Settings.of({"windw": 3})
    assert [f.name for f in fields(PackageSettings)] == list(config.section(["package"])["properties"])
    assert PackageSettings.of({}).license == config.defaults(["package", "license"])
    keys = set(config.schema()["properties"]).union(
        *(config.section([name]).get("properties", {}) for name in config.schema()["properties"]))
    for name in SETTINGS_READERS + CONFIG_READERS:
        tree = ast.parse(source := (PACKAGE / name).read_text())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                    and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
                    and (name in SETTINGS_READERS
                         or CONFIG_NAMES.match(ast.get_source_segment(source, node.func.value)))):
                pytest.fail(f"{name}:{node.lineno}: .get({node.args[0].value!r}, …) of a config key: "
                            "read the settings object or the resolved config")


def test_the_preprocessing_chain_is_one_list():
    """Each step's switch is a preprocess key, the recipe compares every key that changes the images,
    and the recipe's steps and a sidecar's Steps are both written from ``steps.STEPS``, each step
    with the code that runs it (``tests/test_preprocess.py`` adds one and finds it in both)."""
    keys = set(config.section(["preprocess"])["properties"])
    assert {step.key for step in steps.STEPS if step.key} <= keys
    assert all(callable(step.run) for step in steps.STEPS) and len({s.name for s in steps.STEPS}) == len(steps.STEPS)
    settings = config.defaults(["preprocess"])
    study = recipe.from_config(settings, {"T1w": {"suffix": "T1w"}, "FLAIR": {"suffix": "FLAIR"}}, {})
    assert set(recipe.COMPARED) <= set(study) and keys - {"seed"} <= set(study)
    assert len(study["steps"]) == len([s for s in steps.STEPS if s.key is None or settings[s.key] not in steps.OFF])
    assert "rigid co-registration of FLAIR to T1w (ANTs)" in study["steps"]
    ran = recipe.active(settings)
    assert recipe.sidecar_steps(ran, settings, ["T1w", "FLAIR"], "FLAIR")[2] == "ants.registration:Rigid to T1w"
    off = recipe.steps({**settings, "n4": False, "antialias": False}, ["T1w"])
    assert not any("N4" in s or "anti-aliasing" in s for s in off)


@pytest.mark.parametrize("command", ["intake.ingest", "intake.grid", "intake.preprocess", "intake.split",
                                     "learning.train", "results.linear", "results.evaluate", "results.explain",
                                     "sharing.export", "sharing.predict", "results.report", "learning.variants"])
def test_stages_take_their_settings_as_one_config(command):
    """Every stage that reads settings takes them as ``--config`` (no flag per key)."""
    module = importlib.import_module(f"pipeline.{command}")
    source = inspect.getsource(inspect.getmodule(module.main))
    assert "add_config(" in source
    for flag in ("--target", "--task", "--channels", "--settings", "--hyperparameters", "--methods"):
        assert f'"{flag}"' not in source, (command, flag)


def test_parsed_modules_are_cached_by_content_across_processes(tmp_path, monkeypatch):
    """A Snakemake start reads each module's imports and hash from the user's cache; an edited
    module (even one of the same size and modification time) is parsed again."""
    monkeypatch.setattr(codegraph, "CACHE", tmp_path / "cache" / "codegraph.json")
    codegraph.read_cache.cache_clear()
    module = tmp_path / "m.py"
    module.write_text("import pipeline.a\n")
    first = codegraph.parsed(module)
    codegraph.save_cache()
    saved = json.loads(codegraph.CACHE.read_text())
    assert [names for names, _ in saved.values()] == [["pipeline.a"]]
    codegraph.read_cache.cache_clear()  # a new process
    stat = module.stat()
    module.write_text("import pipeline.b\n")  # same size, same times
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert codegraph.parsed(module)[0] == {"pipeline.b"} and codegraph.parsed(module)[1] != first[1]
    codegraph.read_cache.cache_clear()
