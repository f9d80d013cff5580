"""A registry of model packages: ``owner/name[:version]`` → a verified package folder.

The registry is a folder (a lab's shared drive) or any fsspec URL (``s3://…``, ``memory://…``) when
the URL's backend is installed. Its location comes from the command line (``--registry``), else
config ``registry``, else the environment variable ``PIPELINE_REGISTRY``, else ``DEFAULT``.
Layout: ``<registry>/<owner>/<name>/<version>/package.tar.gz`` and ``package.tar.gz.sha256``;
a version is registered once its ``.sha256`` exists, and is never overwritten.

Without a version, ``register`` takes the next integer (1, 2, …) and ``fetch`` the highest version
(PEP 440 order; versions that are not PEP 440 come first, alphabetically). Fetching checks the
archive's sha256, refuses archives with links or paths outside their folder, then checks the
package's own checksums and weight format (``pipeline.sharing.package.verify``). Standard library only
at import: the Snakefile imports ``parse_name``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

from pipeline.sharing import package
from pipeline.common.errors import InputError

DEFAULT = "~/.local/share/pipeline/registry"
ENVIRONMENT = "PIPELINE_REGISTRY"
ARCHIVE = "package.tar.gz"
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
                             "`python -m pipeline.registry register PACKAGE --name OWNER/NAME[:VERSION]`.")
        return ref._replace(version=known[-1])
    if ref.version not in known:
        raise InputError(f"No version {ref.version!r} of {ref.owner}/{ref.name} in the registry {root}; "
                         f"registered: {', '.join(known) or 'none'}.")
    return ref


def register(source: Path, name: str, where: str) -> Ref:
    """Check the package ``source`` (a folder or its .tar.gz) and store it under ``name``; return
    the registered name with its version."""
    ref = parse_name(name)
    fs, root = open_registry(where)
    with tempfile.TemporaryDirectory() as tmp:
        folder = package.unpack(source, Path(tmp) / "unpacked") if Path(source).is_file() else Path(source)
        package.load(folder)  # checksums, weight format, spec version
        archive = package.pack(folder, Path(tmp) / ARCHIVE)
        if ref.version is None:
            numbers = [int(v) for v in versions(fs, root, ref) if v.isdigit()]
            ref = ref._replace(version=str(max(numbers, default=0) + 1))
        target = f"{root}/{ref.owner}/{ref.name}/{ref.version}"
        if fs.exists(f"{target}/{ARCHIVE}.sha256"):
            raise InputError(f"{ref} is already registered in {where}; versions are never replaced: register "
                             "under a new version.")
        fs.makedirs(target, exist_ok=True)
        fs.put_file(str(archive), f"{target}/{ARCHIVE}")
        fs.pipe_file(f"{target}/{ARCHIVE}.sha256", f"{package.sha256(archive)}  {ARCHIVE}\n".encode())
    return ref


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
        folder = package.unpack(archive, Path(tmp) / "unpacked")
        package.load(folder)
        shutil.move(str(folder), str(dest))
    return ref, dest


def main(argv=None) -> None:
    """``python -m pipeline.registry register PACKAGE --name owner/name[:version]`` and ``fetch NAME``."""
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
