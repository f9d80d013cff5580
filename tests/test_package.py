"""Model packages: what export writes, ONNX parity, and the refusals of a package that was altered."""

from __future__ import annotations

import json
import pickle
import shutil
import tarfile

import numpy as np
import pandas as pd
import pytest
import torch

from minipackage import spec
from pipeline.learning.saved import package_coder, package_model
from pipeline.common import config as study_config
from pipeline.common import package
from pipeline.sharing import tarball
from pipeline.sharing import modelcard
from pipeline.common.tables import read_tsv
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.sharing.export import ONNX_TOLERANCE, Ensemble


@pytest.fixture
def copy(mini_study, tmp_path):
    """A private copy of the mini study's package folder, free to damage."""
    return shutil.copytree(mini_study / "package" / "model", tmp_path / "model")


def test_export_writes_every_file_with_its_checksum(mini_study):
    folder = mini_study / "package" / "model"
    written = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert written == sorted(package.files(["fold-1", "fold-2"]))
    listed = package.read_checksums(folder)
    assert set(listed) == set(written) - {package.CHECKSUMS}
    assert all(listed[name] == package.sha256(folder / name) for name in listed)
    pkg = package.load(folder)
    architecture = pkg.spec["architecture"]  # every argument recorded, defaults included
    assert (architecture["name"], architecture["spatial_dims"]) == ("simple_cnn", 3)
    assert architecture["args"] == {**architecture["args"], "channels": [4, 8], "norm": "batch", "dropout": 0.0}
    assert pkg.spec["sampler"]["kind"] == "image"
    assert (pkg.spec["task"], pkg.spec["target"], pkg.spec["classes"]) == ("regression", "age", None)
    assert pkg.spec["input"] == {**pkg.spec["input"], "shape": [1, 16, 16, 16], "channels": ["T1w"]}
    assert pkg.recipe["resolution"] == 4.0 and pkg.recipe["shape"] == [16, 16, 16]
    assert set(pkg.normalisation["target"]) == set(pkg.normalisation["bias_correction"]) == {"fold-1", "fold-2"}
    assert pkg.metrics["test"]["ensemble"]["n"] == 3 and set(pkg.metrics["validation"]) == {"fold-1", "fold-2"}


def test_weights_are_each_folds_trained_weights(mini_study):
    pkg = package.load(mini_study / "package" / "model")
    for fold in pkg.folds:
        record = torch.load(mini_study / "train" / fold / "model.pt", weights_only=True)
        exported = pkg.state_dict(fold)
        assert exported.keys() == record["state_dict"].keys()
        assert all(torch.equal(exported[k], record["state_dict"][k]) for k in exported)
        assert package_coder(pkg, fold).state() == record["coder"]


def test_archive_holds_the_folder_and_is_reproducible(mini_study, tmp_path):
    archive = mini_study / "package" / "model.tar.gz"
    with tarfile.open(archive) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}
    assert names == {f"model/{name}" for name in package.files(["fold-1", "fold-2"])}
    again = tarball.pack(mini_study / "package" / "model", tmp_path / "again.tar.gz")
    assert package.sha256(again) == package.sha256(archive)


def test_model_card_summarises_the_data_without_participant_ids(mini_study):
    card = (mini_study / "package" / "model" / package.CARD).read_text()
    manifest = read_tsv(mini_study / "manifest.tsv")
    assert "14 participants, 14 images" in card and "| every fold | test    |" in card
    assert "## Intended use" in card and "## Limitations" in card and "- A unit-test model." in card
    assert "sub-" not in card and not any(pid in card for pid in manifest["participant_id"])



def test_the_models_license_is_in_its_card_and_spec(mini_study):
    """config package.license: the schema's default grants none; a set one is stated as given."""
    folder = mini_study / "package" / "model"
    default = study_config.defaults(["package", "license"])
    assert default == modelcard.UNSPECIFIED and spec(folder)["license"] == default
    card = (folder / package.CARD).read_text()
    assert "## License\n\nNo license is granted for this model (config `package.license` was not set)" in card
    counts = modelcard.cohort(read_tsv(mini_study / "manifest.tsv"), read_tsv(mini_study / "splits.tsv"), "age",
                              "regression")
    metrics, recipe = (json.loads((folder / name).read_text()) for name in (package.METRICS, package.RECIPE))
    chosen = modelcard.PackageSettings.of({"license": "CC-BY-4.0"})
    card = modelcard.render(spec(folder), recipe, metrics, counts, chosen)
    assert "## License\n\nThis model (weights and documents of this package) is licensed under: CC-BY-4.0." in card

def test_onnx_ensemble_matches_pytorch(mini_study):
    import onnxruntime

    folder = mini_study / "package" / "model"
    pkg = package.load(folder)
    ensemble = Ensemble([package_model(pkg, f) for f in pkg.folds], [package_coder(pkg, f) for f in pkg.folds]).eval()
    arrays = sorted(str(p) for p in (mini_study / "derivatives").rglob("*.npy"))
    x = load_batch(arrays)
    session = onnxruntime.InferenceSession(str(folder / package.ONNX), providers=["CPUExecutionProvider"])
    theirs = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        ours = ensemble(x).numpy()
    difference = float(np.abs(theirs - ours).max())
    print(f"ONNX vs PyTorch, {len(arrays)} images: max abs difference {difference:.3g}")
    assert theirs.shape == (len(arrays), 1) and difference <= ONNX_TOLERANCE
    assert spec(folder)["onnx"]["max_abs_difference"] <= ONNX_TOLERANCE


def test_ensemble_is_the_studys_ensemble(mini_study):
    """The package's ensemble (safetensors weights, JSON coders) predicts the study's ensemble test predictions."""
    pkg = package.load(mini_study / "package" / "model")
    study = read_tsv(mini_study / "evaluate" / "predictions.tsv")
    arrays = [str(next((mini_study / "derivatives").rglob(f"{i}_*.npy"))) for i in study["image_id"]]
    ensemble = Ensemble([package_model(pkg, f) for f in pkg.folds], [package_coder(pkg, f) for f in pkg.folds]).eval()
    with torch.no_grad():
        predicted = torch.cat([ensemble(load_batch([a])) for a in arrays])[:, 0].numpy()
    np.testing.assert_allclose(predicted, study["predicted"], rtol=1e-6)


def test_loading_never_unpickles(mini_study, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a package load unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    pkg = package.load(mini_study / "package" / "model")
    for fold in pkg.folds:
        assert package_model(pkg, fold)(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 1)


def test_a_tampered_weight_file_is_refused(copy):
    weights = copy / package.weights_file("fold-1")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern of the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"fold-1\.safetensors: sha256 checksum mismatch"):
        package.load(copy)


def test_an_edited_json_document_is_refused(copy):
    spec_file = copy / package.SPEC
    spec_file.write_text(spec_file.read_text().replace('"age"', '"height"'))
    with pytest.raises(InputError, match=r"spec\.json: sha256 checksum mismatch"):
        package.load(copy)


@pytest.mark.parametrize("kind", ["torch.save", "pickle.dump"])
def test_a_pickle_posing_as_weights_is_refused_even_with_matching_checksums(copy, kind):
    weights = copy / package.weights_file("fold-2")
    state = {k: v.clone() for k, v in package.load(copy).state_dict("fold-2").items()}  # not mmapped
    if kind == "torch.save":
        torch.save(state, weights)
    else:
        with open(weights, "wb") as f:
            pickle.dump({k: v.numpy() for k, v in state.items()}, f)
    package.write_checksums(copy)  # an attacker can recompute the manifest
    with pytest.raises(InputError, match=r"fold-2\.safetensors is a .*(pickle|zip archive).* posing as safetensors"):
        package.load(copy)


def test_missing_unlisted_and_linked_files_are_refused(copy):
    (copy / "extra.py").write_text("print('hello')\n")
    with pytest.raises(InputError, match=r"extra\.py is not listed in checksums\.sha256"):
        package.load(copy)
    (copy / "extra.py").unlink()
    (copy / package.ONNX).unlink()
    with pytest.raises(InputError, match=r"model\.onnx is listed in checksums\.sha256 but missing"):
        package.load(copy)
    (copy / package.ONNX).symlink_to(copy / package.SPEC)
    with pytest.raises(InputError, match=r"model\.onnx is a link"):
        package.load(copy)


def traversal_archive(path, folder, member, kind="file"):
    """A package archive with the real files plus one hostile ``member``."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="model")
        info = tarfile.TarInfo(member)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            payload = b"owned\n"
            info.size = len(payload)
            import io

            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("member, kind, message", [
    ("model/../../escaped.txt", "file", "a path outside its folder"),
    ("/tmp/package-absolute-escape.txt", "file", "a path outside its folder"),
    ("model/weights/link.safetensors", "symlink", "holds a link"),
    ("other/readme.txt", "file", "must hold one package folder"),
])
def test_an_archive_with_paths_outside_its_folder_is_refused(mini_study, tmp_path, member, kind, message):
    archive = traversal_archive(tmp_path / "evil.tar.gz", mini_study / "package" / "model", member, kind)
    dest = tmp_path / "out" / "inner"
    with pytest.raises(InputError, match=message) as error:
        tarball.unpack(archive, dest)
    assert member.rstrip("/") in str(error.value) or kind == "symlink" or "one package folder" in message
    assert not dest.exists() and not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out" / "escaped.txt").exists()


def small_archive(path, *extra):
    """A .tar.gz of a folder ``model`` holding ``spec.json``, plus ``extra`` members (name, bytes or
    None for a folder, and optionally the size its header declares)."""
    import io

    with tarfile.open(path, "w:gz") as tar:
        for name, content, *declared in [("model", None), ("model/spec.json", b"{}"), *extra]:
            info = tarfile.TarInfo(name)
            if content is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = declared[0] if declared else len(content)
                tar.addfile(info, io.BytesIO(content) if not declared else None)
    return path


@pytest.mark.parametrize("name, content", [(".", None), ("./", None), ("", b"owned\n"), (".", b"owned\n"),
                                           ("model/.", b"owned\n")])
def test_a_member_naming_no_file_is_refused_cleanly(tmp_path, name, content):
    archive = small_archive(tmp_path / "odd.tar.gz", (name, content))
    dest = tmp_path / "out"
    with pytest.raises(InputError, match=r"odd\.tar\.gz holds a member named '(\.|model/\.|)', which names no file "
                                         r"or folder inside the package folder\. Refusing .* re-create the archive"):
        tarball.unpack(archive, dest)
    assert not dest.exists()


def test_an_archive_over_the_size_limit_is_refused_before_extracting(tmp_path, monkeypatch):
    archive = small_archive(tmp_path / "big.tar.gz", ("model/weights/fold-1.safetensors", bytes(3 * 2**20)))
    assert archive.stat().st_size < 2**16  # zeros: a small file that unpacks to 3 MiB
    dest = tmp_path / "out"
    with pytest.raises(InputError, match=r"big\.tar\.gz unpacks to at least 3\.0 MiB \(3145730 bytes\) \(up to its "
                                         r"member 'model/weights/fold-1\.safetensors'\), over the limit of 1\.0 MiB "
                                         r"\(1048576 bytes\) .* raise the limit: set the environment variable "
                                         r"PIPELINE_MAX_UNPACKED_BYTES"):
        tarball.unpack(archive, dest, max_bytes=2**20)
    monkeypatch.setenv(tarball.MAX_UNPACKED_VARIABLE, str(2**20))
    with pytest.raises(InputError, match="over the limit of 1.0 MiB"):
        tarball.unpack(archive, dest)
    assert not dest.exists()
    monkeypatch.setenv(tarball.MAX_UNPACKED_VARIABLE, str(4 * 2**20))
    assert (tarball.unpack(archive, dest) / "weights" / "fold-1.safetensors").stat().st_size == 3 * 2**20
    monkeypatch.setenv(tarball.MAX_UNPACKED_VARIABLE, "4G")
    with pytest.raises(InputError, match=r"\$PIPELINE_MAX_UNPACKED_BYTES is '4G'; set it to a whole number of bytes"):
        tarball.unpack(archive, tmp_path / "again")


def test_a_bomb_is_refused_at_its_header_without_inflating_it(tmp_path, monkeypatch):
    """A member declaring 5 TiB (its data left out): refused by the default limit from the header
    alone, before tarfile reads past it (which would fail on the missing data instead)."""
    monkeypatch.delenv(tarball.MAX_UNPACKED_VARIABLE, raising=False)
    archive = small_archive(tmp_path / "bomb.tar.gz", ("model/model.onnx", b"", 5 * 2**40))
    with pytest.raises(InputError, match=r"unpacks to at least 5120\.0 GiB .* over the limit of 4\.0 GiB"):
        tarball.unpack(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists() and tarball.MAX_UNPACKED_BYTES == 4 * 2**30


def test_input_shape_and_classes_come_from_the_recorded_model(mini_study):
    manifest = pd.read_csv(mini_study / "manifest.tsv", sep="\t")
    s = spec(mini_study / "package" / "model")
    assert s["outputs"] == 1 and s["folds"] == ["fold-1", "fold-2"] and len(manifest) == 14
    assert json.loads((mini_study / "package" / "model" / package.RECIPE).read_text())["channels"] == ["T1w"]
