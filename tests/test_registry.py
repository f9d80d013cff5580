"""Registering and fetching model packages: folders, fsspec URLs, versions, and refusals."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import tarfile
import uuid

import pytest

from pipeline.common import package
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


def register_in_a_race(barrier, source, name, where, results):
    """In a child process: register ``name``, waiting at the exclusive claim until every child is
    there (so each has found the version free); put ("registered", name), ("refused", message) or
    ("crashed", error)."""
    claim_folder, waited = registry.claim_folder, []

    def at_the_same_time(fs, target):
        if not waited:
            waited.append(barrier.wait(timeout=120))
        return claim_folder(fs, target)

    registry.claim_folder = at_the_same_time
    try:
        results.put(("registered", str(registry.register(source, name, where))))
    except InputError as exc:
        results.put(("refused", str(exc)))
    except BaseException as exc:  # reported, so that the test fails at once instead of waiting for it
        results.put(("crashed", repr(exc)))


def race(source, name, where, processes=2) -> list[tuple[str, str]]:
    """The sorted outcomes of ``processes`` real processes registering ``name`` at once."""
    context = multiprocessing.get_context("spawn")  # not fork: the test process may hold torch's threads
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=register_in_a_race, args=(barrier, str(source), name, where, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0] * processes
    return sorted(outcomes)


def test_of_two_processes_registering_one_version_at_once_exactly_one_wins(mini_study, tmp_path):
    where = str(tmp_path / "registry")
    outcomes = race(mini_study / "package" / "model", "lab/brainage:1", where)
    assert [kind for kind, _ in outcomes] == ["refused", "registered"] and outcomes[1][1] == "lab/brainage:1"
    assert outcomes[0][1].startswith(f"lab/brainage:1 is already registered in {where}; versions are never replaced")
    stored = tmp_path / "registry" / "lab" / "brainage" / "1"
    assert sorted(p.name for p in stored.iterdir()) == [registry.CLAIM, registry.ARCHIVE, f"{registry.ARCHIVE}.sha256"]
    ref, fetched = registry.fetch("lab/brainage:1", where, tmp_path / "fetched")  # archive sha256, package checksums
    assert tree(fetched) == tree(mini_study / "package" / "model")


def test_two_processes_registering_without_a_version_get_two_versions(mini_study, tmp_path):
    where = f"file://{tmp_path / 'registry'}"
    registry.register(mini_study / "package" / "model", "lab/brainage", where)
    outcomes = race(mini_study / "package" / "model.tar.gz", "lab/brainage", where)
    assert outcomes == [("registered", "lab/brainage:2"), ("registered", "lab/brainage:3")]
    fs, root = registry.open_registry(where)
    assert registry.versions(fs, root, registry.parse_name("lab/brainage")) == ["1", "2", "3"]
    for version in ("2", "3"):
        assert tree(registry.fetch(f"lab/brainage:{version}", where, tmp_path / version)[1]) == tree(
            mini_study / "package" / "model")


def test_an_interrupted_registration_is_named_and_skipped(mini_study, memory_registry, monkeypatch):
    fs, root = registry.open_registry(memory_registry)
    fs.pipe_file(f"{root}/lab/brainage/1/{registry.CLAIM}", b'{"pid": 4242, "host": "node7", "time": "then"}')
    with pytest.raises(InputError, match=r"lab/brainage:1 is already registered .*\(It was claimed by process 4242 on "
                                         r"node7 at then and is not complete yet: .* delete memory://registry-\w+/lab/"
                                         r"brainage/1 and register again"):
        registry.register(mini_study / "package" / "model", "lab/brainage:1", memory_registry)
    assert str(registry.register(mini_study / "package" / "model", "lab/brainage", memory_registry)) == "lab/brainage:2"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fs), "put_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        registry.register(mini_study / "package" / "model", "lab/brainage:3", memory_registry)
    assert not fs.exists(f"{root}/lab/brainage/3")  # a failed registration gives its claim back
    monkeypatch.undo()
    assert str(registry.register(mini_study / "package" / "model", "lab/brainage:3", memory_registry)) == "lab/brainage:3"


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
