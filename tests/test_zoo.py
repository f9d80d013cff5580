"""The zoo a user can see: `models list` over a registry and `inspect` of a folder, archive or name."""

from __future__ import annotations

import json

import pytest

from minipackage import with_outputs
from pipeline.__main__ import main as cli
from pipeline.common import package
from pipeline.sharing import registry
from pipeline.sharing.zoo import describe, registry_rows

BINS = [float(b) for b in range(3, 83, 2)]
PARITY = {"max_abs_difference": 3.1e-06, "tolerance": 1e-4, "against": "the authors' PyTorch module",
          "reference_input": "seeded normal noise"}
SOURCE = {"file": "run_20190719_00_epoch_best_mae.p", "kind": "pytorch", "sha256": "ab" * 32,
          "prefix_stripped": "module."}


@pytest.fixture(scope="module")
def zoo(mini_study, tmp_path_factory):
    """A folder registry with our own package (two versions) and an imported-style SFCN-bins package."""
    root = tmp_path_factory.mktemp("zoo")
    imported = with_outputs(mini_study / "package" / "model", root / "imported", 40,
                            output={"type": "bins", "bins": BINS}, parity=PARITY, source=SOURCE, license="MIT")
    where = str(root / "registry")
    registry.register(mini_study / "package" / "model", "lab/brainage", where)
    registry.register(mini_study / "package" / "model.tar.gz", "lab/brainage", where)
    registry.register(imported, "uk/sfcn-age:1.0", where)
    return where, imported


def test_models_list_shows_every_package_with_its_versions_task_input_and_licence(zoo, capsys):
    where, _ = zoo
    rows = registry_rows(where)
    assert [(r["name"], r["versions"], r["license"], r["imported"]) for r in rows] == [
        ("lab/brainage", ["1", "2"], "unspecified", False), ("uk/sfcn-age", ["1.0"], "MIT", True)]
    assert rows[0]["task"] == "regression" and rows[0]["target"] == "age"
    assert rows[0]["input"] == "T1w; MNI152NLin2009aSym 4 mm, grid 16x16x16; brain extraction none"
    cli(["models", "list", "--registry", where])
    table = capsys.readouterr().out
    assert "lab/brainage     1, 2" in table and "uk/sfcn-age" in table and "MIT" in table
    cli(["models", "list", "--registry", where, "--json"])
    assert json.loads(capsys.readouterr().out) == rows


def test_inspect_reads_a_folder_an_archive_and_a_registry_name_alike(mini_study, zoo, capsys):
    where, _ = zoo
    folder = mini_study / "package" / "model"
    seen = []
    for model in (str(folder), str(mini_study / "package" / "model.tar.gz"), "lab/brainage:1"):
        cli(["inspect", model, "--registry", where, "--json"])
        seen.append(json.loads(capsys.readouterr().out))
    assert all({k: v for k, v in s.items() if k != "package"} == {k: v for k, v in seen[0].items() if k != "package"}
               for s in seen)
    assert seen[2]["package"]["name"] == "lab/brainage:1"
    described = seen[0]
    assert described["expects"]["grid"] == [16, 16, 16] and described["expects"]["voxel_size_mm"] == 4.0
    assert described["expects"]["channels"] == ["T1w"] and described["expects"]["brain_extraction"] == "none"
    assert described["predicts"]["output"] == {"type": "scalar", "outputs": 1}
    assert described["parity"]["onnx_max_abs_difference"] == package.load(folder).spec["onnx"]["max_abs_difference"]
    assert described["parity"]["source_max_abs_difference"] == "n/a"  # our own package: no foreign source
    assert described["license"]["license"] == "unspecified" and described["provenance"]["trained_by"] == "pipeline"
    cli(["inspect", str(folder)])
    text = capsys.readouterr().out
    assert "voxel size mm: 4\n" in text and "grid: [16, 16, 16]" in text and "source max abs difference: n/a" in text


def test_inspect_describes_an_imported_package_of_age_bins(zoo, capsys):
    where, imported = zoo
    described = describe(package.load(imported), "uk/sfcn-age:1.0")
    assert described["predicts"]["output"] == {"type": "soft-label bins (the prediction is their expected value)",
                                               "outputs": 40, "bins": 40, "bin_range": [3.0, 81.0]}
    assert described["parity"]["source_max_abs_difference"] == 3.1e-06
    assert described["parity"]["source_reference"] == "the authors' PyTorch module"
    assert described["provenance"] == {"imported_from": SOURCE} and described["license"]["license"] == "MIT"
    cli(["inspect", "uk/sfcn-age", "--registry", where])
    text = capsys.readouterr().out
    assert "source max abs difference: 3.1e-06" in text and "bins 40, bin_range [3, 81]" in text


def test_inspect_refuses_what_apply_refuses(mini_study, zoo, tmp_path, capsys):
    import shutil

    where, _ = zoo
    tampered = tmp_path / "tampered"
    shutil.copytree(mini_study / "package" / "model", tampered)
    (tampered / package.METRICS).write_text("{}")
    for argv, says in ((["inspect", str(tampered)], "sha256 checksum mismatch"),
                       (["inspect", "lab/nothing", "--registry", where], "No package lab/nothing"),
                       (["inspect", str(tampered), "--version", "2"], "is a package on disk")):
        with pytest.raises(SystemExit) as done:
            cli(argv)
        assert done.value.code == 2 and says in capsys.readouterr().err
    cli(["models", "list", "--registry", str(tmp_path / "empty")])
    assert "no packages in" in capsys.readouterr().err
    broken = tmp_path / "broken" / "lab" / "bad" / "1"
    broken.mkdir(parents=True)
    (broken / registry.ARCHIVE).write_bytes(b"not a gzip archive")
    (broken / f"{registry.ARCHIVE}.sha256").write_text("0" * 64 + f"  {registry.ARCHIVE}\n")
    shutil.copytree(tmp_path / "broken", tmp_path / "mixed")
    registry.register(mini_study / "package" / "model", "lab/good", str(tmp_path / "mixed"))
    rows = registry_rows(str(tmp_path / "mixed"))
    assert [r["name"] for r in rows] == ["lab/bad", "lab/good"] and rows[1]["task"] == "regression"
    assert rows[0]["task"].startswith("unreadable: ") and "not a readable package archive" in rows[0]["task"]
