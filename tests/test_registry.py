"""Registering and fetching model packages: folders, fsspec URLs, versions, and refusals."""

from __future__ import annotations

import hashlib
import io
import tarfile
import uuid

import pytest

from pipeline.sharing import package
from pipeline.sharing import registry
from pipeline.common.errors import InputError
from pipeline.sharing.registry import main as registry_main


@pytest.fixture
def memory_registry():
    """A fresh fsspec in-memory registry URL."""
    return f"memory://registry-{uuid.uuid4().hex}"


def tree(folder):
    return {p.relative_to(folder).as_posix(): package.sha256(p) for p in folder.rglob("*") if p.is_file()}


def test_register_and_fetch_through_an_fsspec_url(mini_study, memory_registry, tmp_path):
    folder = mini_study / "package" / "model"
    assert str(registry.register(folder, "lab/brainage", memory_registry)) == "lab/brainage:1"
    assert str(registry.register(mini_study / "package" / "model.tar.gz", "lab/brainage", memory_registry)) == "lab/brainage:2"
    assert str(registry.register(folder, "lab/brainage:2.1rc1", memory_registry)) == "lab/brainage:2.1rc1"
    ref, fetched = registry.fetch("lab/brainage", memory_registry, tmp_path / "latest")
    assert str(ref) == "lab/brainage:2.1rc1"  # the highest version, PEP 440 order
    assert tree(fetched) == tree(folder)
    ref, fetched = registry.fetch("lab/brainage:1", memory_registry, tmp_path / "one")
    assert tree(fetched) == tree(folder) and package.load(fetched).spec["target"] == "age"


def test_a_folder_is_the_default_registry(mini_study, tmp_path, monkeypatch):
    monkeypatch.setenv(registry.ENVIRONMENT, str(tmp_path / "shared"))
    monkeypatch.chdir(tmp_path)
    registry_main(["register", str(mini_study / "package" / "model"), "--name", "lab/brainage:1.0"])
    assert (tmp_path / "shared" / "lab" / "brainage" / "1.0" / registry.ARCHIVE).is_file()
    registry_main(["fetch", "lab/brainage"])
    assert tree(tmp_path / "models" / "lab" / "brainage" / "1.0") == tree(mini_study / "package" / "model")


def test_file_urls_work_and_versions_are_never_replaced(mini_study, tmp_path):
    url = f"file://{tmp_path / 'registry'}"
    registry.register(mini_study / "package" / "model", "lab/brainage:1", url)
    with pytest.raises(InputError, match="lab/brainage:1 is already registered"):
        registry.register(mini_study / "package" / "model", "lab/brainage:1", url)
    with pytest.raises(InputError, match=r"No version '7' of lab/brainage .* registered: 1"):
        registry.fetch("lab/brainage:7", url, tmp_path / "x")
    with pytest.raises(InputError, match="No package lab/other"):
        registry.fetch("lab/other", url, tmp_path / "y")
    with pytest.raises(InputError, match="not a package name"):
        registry.parse_name("brainage")


def test_a_tampered_registry_archive_is_refused(mini_study, memory_registry, tmp_path):
    import fsspec

    registry.register(mini_study / "package" / "model", "lab/brainage:1", memory_registry)
    fs, root = registry.open_registry(memory_registry)
    stored = f"{root}/lab/brainage/1/{registry.ARCHIVE}"
    data = bytearray(fs.cat_file(stored))
    data[100] ^= 0xFF
    fs.pipe_file(stored, bytes(data))
    with pytest.raises(InputError, match=r"package\.tar\.gz: sha256 checksum mismatch"):
        registry.fetch("lab/brainage:1", memory_registry, tmp_path / "fetched")
    assert not (tmp_path / "fetched").exists() and isinstance(fs, fsspec.AbstractFileSystem)


def hostile_archive(folder, member: str) -> bytes:
    """The package's files plus a member escaping its folder, as a .tar.gz."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(folder, arcname="model")
        info = tarfile.TarInfo(member)
        info.size = 6
        tar.addfile(info, io.BytesIO(b"owned\n"))
    return buffer.getvalue()


def test_a_path_traversal_archive_in_the_registry_is_refused(mini_study, memory_registry, tmp_path):
    """A registry whose archive (with a matching .sha256) holds ../: fetch refuses before extracting."""
    fs, root = registry.open_registry(memory_registry)
    archive = hostile_archive(mini_study / "package" / "model", "model/../../../escaped.txt")
    fs.pipe_file(f"{root}/evil/model/1/{registry.ARCHIVE}", archive)
    fs.pipe_file(f"{root}/evil/model/1/{registry.ARCHIVE}.sha256",
                 f"{hashlib.sha256(archive).hexdigest()}  {registry.ARCHIVE}\n".encode())
    dest = tmp_path / "a" / "b" / "c"
    with pytest.raises(InputError, match=r"holds 'model/\.\./\.\./\.\./escaped\.txt', a path outside its folder"):
        registry.fetch("evil/model", memory_registry, dest)
    assert not dest.exists() and not list(tmp_path.rglob("escaped.txt"))


def test_registering_a_pickle_posing_as_weights_is_refused(mini_study, tmp_path, memory_registry):
    import shutil

    import torch

    copy = shutil.copytree(mini_study / "package" / "model", tmp_path / "model")
    torch.save({"weight": torch.zeros(2)}, copy / package.weights_file("fold-1"))
    package.write_checksums(copy)
    with pytest.raises(InputError, match=r"fold-1\.safetensors is a zip archive .*posing as safetensors"):
        registry.register(copy, "lab/brainage", memory_registry)
    fs, root = registry.open_registry(memory_registry)
    assert not fs.exists(f"{root}/lab")


def test_cli_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        registry_main(["fetch", "lab/none", "--registry", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "ERROR: No package lab/none" in capsys.readouterr().err
