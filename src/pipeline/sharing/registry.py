"""A registry of model packages: ``owner/name[:version]`` → a verified package folder.

The registry is a folder (a lab's shared drive) or any fsspec URL (``s3://…``, ``memory://…``) when
the URL's backend is installed. Its location comes from the command line (``--registry``), else
config ``registry``, else the environment variable ``PIPELINE_REGISTRY``, else ``DEFAULT``.
Layout: ``<registry>/<owner>/<name>/<version>/`` holds ``claim.json``, ``package.tar.gz`` and
``package.tar.gz.sha256``, written in that order; a version is registered once its ``.sha256``
exists, and is never overwritten.

Registering first claims the version by creating its ``claim.json`` exclusively (mode ``"xb"``), so
of two registrations of one version at once exactly one goes on and the other is refused (without a
version, it takes the next free number). In a folder this is ``O_EXCL``, atomic on local disks and
on network mounts that honour it (NFS v3 and later). Other fsspec backends give what their ``"xb"``
gives: a check before writing (``memory://``), a conditional write, or nothing, and then two
registrations of one version at the same moment can both write: register from one place at a time
there. A registration killed midway leaves its claim, which blocks that version (the refusal says
so): delete the version's folder.

Without a version, ``register`` takes the next integer (1, 2, …) and ``fetch`` the highest version
(PEP 440 order; versions that are not PEP 440 come first, alphabetically). Fetching checks the
archive's sha256, refuses archives with links or paths outside their folder or over
$PIPELINE_MAX_UNPACKED_BYTES unpacked (default 4 GiB), then checks the
package's own checksums and weight format (``pipeline.common.package.verify``). Standard library only
at import: the Snakefile imports ``parse_name``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

from pipeline.common import package
from pipeline.sharing import tarball
from pipeline.common.errors import InputError

DEFAULT = "~/.local/share/pipeline/registry"
ENVIRONMENT = "PIPELINE_REGISTRY"
ARCHIVE = "package.tar.gz"
CLAIM = "claim.json"  # created exclusively before anything else: who registers this version
LABEL = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
NAME = re.compile(rf"(?P<owner>{LABEL})/(?P<name>{LABEL})(?::(?P<version>[A-Za-z0-9][A-Za-z0-9_.+-]*))?")


class Ref(NamedTuple):
    """A package name: ``owner/name`` and a version (None: not given)."""

    owner: str
    name: str
    version: str | None

    def __str__(self) -> str:
        return f"{self.owner}/{self.name}" + (f":{self.version}" if self.version else "")


def parse_name(text: str) -> Ref:
    """``owner/name[:version]`` → Ref; InputError for anything else."""
    match = NAME.fullmatch(text.strip())
    if not match:
        raise InputError(f"{text!r} is not a package name: use owner/name or owner/name:version (letters, digits, "
                         "'.', '_', '-'; e.g. lab/brainage:1).")
    return Ref(match["owner"], match["name"], match["version"])


def location(given: str | None = None) -> str:
    """The registry: ``given`` (command line or config), else $PIPELINE_REGISTRY, else ``DEFAULT``."""
    chosen = given or os.environ.get(ENVIRONMENT) or DEFAULT
    return chosen if "://" in chosen else str(Path(chosen).expanduser())


def open_registry(where: str):
    """(fsspec file system, root path) of a registry folder or URL."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(where)
    except (ImportError, ValueError) as exc:
        raise InputError(f"Cannot open the registry {where}: {exc}. Install the fsspec backend for its protocol "
                         "(e.g. s3fs for s3://), or use a folder.") from exc
    return fs, root.rstrip("/")


def version_key(text: str):
    """Sort key: non-PEP 440 versions (alphabetically) before PEP 440 ones (in version order)."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(text), "")
    except InvalidVersion:
        return (0, Version("0"), text)


def versions(fs, root: str, ref: Ref) -> list[str]:
    """Registered versions of ``ref`` (those with an archive checksum), lowest first."""
    found = fs.glob(f"{root}/{ref.owner}/{ref.name}/*/{ARCHIVE}.sha256")
    return sorted({Path(p).parent.name for p in found}, key=version_key)


def resolve(fs, root: str, ref: Ref) -> Ref:
    """``ref`` with its version: as given (it must exist), else the highest registered."""
    known = versions(fs, root, ref)
    if ref.version is None:
        if not known:
            raise InputError(f"No package {ref} in the registry {root}; register one with "
                             "`bids-deepstudy register PACKAGE --name OWNER/NAME[:VERSION]`.")
        return ref._replace(version=known[-1])
    if ref.version not in known:
        raise InputError(f"No version {ref.version!r} of {ref.owner}/{ref.name} in the registry {root}; "
                         f"registered: {', '.join(known) or 'none'}.")
    return ref


def register(source: Path, name: str, where: str) -> Ref:
    """Check the package ``source`` (a folder or its .tar.gz) and store it under ``name``; return
    the registered name with its version (see the module docstring for concurrent registrations)."""
    ref = parse_name(name)
    fs, root = open_registry(where)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tarball.unpack(source, Path(tmp) / "unpacked") if Path(source).is_file() else Path(source)
        check_terms(package.load(folder).spec, Path(source))  # checksums, weight format, spec version; licence
        archive = tarball.pack(folder, Path(tmp) / ARCHIVE)
        ref = claim(fs, root, ref, where)
        target = f"{root}/{ref.owner}/{ref.name}/{ref.version}"
        try:
            fs.put_file(str(archive), f"{target}/{ARCHIVE}")
            fs.pipe_file(f"{target}/.{ARCHIVE}.sha256", f"{package.sha256(archive)}  {ARCHIVE}\n".encode())
            fs.mv(f"{target}/.{ARCHIVE}.sha256", f"{target}/{ARCHIVE}.sha256")  # last, whole: now registered
        except BaseException:
            release(fs, target)
            raise
    return ref


def check_terms(spec: dict, source: Path) -> None:
    """A registry is shared: refuse a package whose licence forbids redistribution, and an imported
    package (``pipeline.sharing.importer``) that declares no licence."""
    license_ = spec.get("license")
    if spec.get("redistribution") is False:
        raise InputError(f"{source}: its licence ({license_ or 'none given'}) forbids redistribution, and a registry "
                         "shares what it holds. Keep the package as a folder and apply it from there.")
    if spec.get("source") and (not license_ or license_ == "unspecified"):
        raise InputError(f"{source} was imported from a model trained elsewhere and has no licence field; its "
                         "authors' terms decide whether it may be shared. Import it again with --license "
                         "(SPDX id or the licence's text), then register it.")


def claim(fs, root: str, ref: Ref, where: str) -> Ref:
    """``ref`` with its version, claimed for this process (``claim_folder``): the version given,
    else the next number that no registered or claimed version has."""
    prefix = f"{root}/{ref.owner}/{ref.name}"
    if ref.version is None:
        claimed = [Path(p).parent.name for p in fs.glob(f"{prefix}/*/{CLAIM}")]
        number = max((int(v) for v in versions(fs, root, ref) + claimed if v.isdigit()), default=0) + 1
        while not claim_folder(fs, f"{prefix}/{number}"):
            number += 1  # another registration took it meanwhile
        return ref._replace(version=str(number))
    target = f"{prefix}/{ref.version}"
    if fs.exists(f"{target}/{ARCHIVE}.sha256") or not claim_folder(fs, target):
        raise already_registered(fs, ref, target, where)
    return ref


def claim_folder(fs, target: str) -> bool:
    """Create ``target/claim.json`` (who and when) unless it exists; True when this call created it."""
    fs.makedirs(target, exist_ok=True)
    who = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        with fs.open(f"{target}/{CLAIM}", "xb") as f:
            f.write(json.dumps(who).encode())
    except FileExistsError:
        return False
    return True


def already_registered(fs, ref: Ref, target: str, where: str) -> InputError:
    """The refusal of a version that is registered, or claimed by a registration under way or killed."""
    message = f"{ref} is already registered in {where}; versions are never replaced: register under a new version."
    if fs.exists(f"{target}/{ARCHIVE}.sha256"):
        return InputError(message)
    try:
        who = json.loads(fs.cat_file(f"{target}/{CLAIM}"))
        by = f" by process {who['pid']} on {who['host']} at {who['time']}"
    except Exception:  # noqa: BLE001 - who claimed it is a courtesy; the claim itself is what counts
        by = ""
    folder = f"{where.rstrip('/')}/{ref.owner}/{ref.name}/{ref.version}"
    return InputError(f"{message} (It was claimed{by} and is not complete yet: if that registration is no longer "
                      f"running, it was interrupted; delete {folder} and register again.)")


def release(fs, target: str) -> None:
    """Remove a claimed version's folder after a failed registration (best effort: the error that
    caused it is the one to report)."""
    try:
        fs.rm(target, recursive=True)
    except Exception:  # noqa: BLE001
        pass


def fetch(name: str, where: str, dest: Path | None = None) -> tuple[Ref, Path]:
    """Download, check and unpack ``name``; return its resolved name and the package folder
    (``dest``, default ``models/<owner>/<name>/<version>``). A folder already there is checked
    and reused (registered versions never change)."""
    fs, root = open_registry(where)
    ref = resolve(fs, root, parse_name(name))
    dest = Path(dest or Path("models") / ref.owner / ref.name / ref.version)
    if dest.exists():
        package.load(dest)
        return ref, dest
    source = f"{root}/{ref.owner}/{ref.name}/{ref.version}/{ARCHIVE}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        archive = Path(tmp) / ARCHIVE
        fs.get_file(source, str(archive))
        expected = fs.cat_file(f"{source}.sha256").decode().split()[0]
        if package.sha256(archive) != expected:
            raise InputError(f"{source}: sha256 checksum mismatch with {source}.sha256; the registry copy is "
                             "corrupt or was tampered with. Refusing it.")
        folder = tarball.unpack(archive, Path(tmp) / "unpacked")
        package.load(folder)
        shutil.move(str(folder), str(dest))
    return ref, dest


def main(argv=None) -> None:
    """``bids-deepstudy register PACKAGE --name owner/name[:version]`` and ``fetch NAME``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    registry_help = f"registry folder or fsspec URL (default: ${ENVIRONMENT}, else {DEFAULT})"
    register_cmd = commands.add_parser("register", help="put a model package into the registry")
    register_cmd.add_argument("package", type=Path, help="package folder or .tar.gz (results/package/model)")
    register_cmd.add_argument("--name", required=True, help="owner/name[:version]")
    register_cmd.add_argument("--registry", help=registry_help)
    fetch_cmd = commands.add_parser("fetch", help="get a package from the registry, verifying its checksums")
    fetch_cmd.add_argument("name", help="owner/name[:version] (default version: the highest)")
    fetch_cmd.add_argument("--out", type=Path, help="folder to unpack into (default: models/OWNER/NAME/VERSION)")
    fetch_cmd.add_argument("--registry", help=registry_help)
    args = parser.parse_args(argv)
    where = location(args.registry)
    with InputError.exit_cleanly():
        if args.command == "register":
            ref = register(args.package, args.name, where)
            print(f"registered {ref} in {where}", file=sys.stderr)
        else:
            ref, folder = fetch(args.name, where, args.out)
            print(f"fetched {ref} from {where}", file=sys.stderr)
            print(folder)


if __name__ == "__main__":
    main()
