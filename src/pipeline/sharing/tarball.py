"""A model package as one file: a gzipped tar of the package folder (``pipeline.common.package``),
written byte for byte the same from the same files, and checked before anything is extracted: one
folder of regular files, no links, no paths outside it, and at most ``MAX_UNPACKED_BYTES`` (4 GiB)
unpacked; set the environment variable ``PIPELINE_MAX_UNPACKED_BYTES`` (bytes) to allow larger
packages.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path, PurePosixPath
from typing import Iterable

from pipeline.common import atomic
from pipeline.common.errors import InputError
from pipeline.common.package import safe_relative

MAX_UNPACKED_BYTES = 4 * 2**30  # an archive unpacking to more is refused before extraction (decompression bombs)
MAX_UNPACKED_VARIABLE = "PIPELINE_MAX_UNPACKED_BYTES"  # overrides MAX_UNPACKED_BYTES


def pack(folder: Path, archive: Path) -> Path:
    """Write ``folder`` as a gzipped tar holding one top folder of the same name; the same files
    give the same bytes (sorted members, zero times and owners)."""
    folder, archive = Path(folder), Path(archive)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in [folder, *sorted(folder.rglob("*"))]:
            info = tar.gettarinfo(str(path), arcname=(Path(folder.name) / path.relative_to(folder)).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            info.mode = 0o755 if info.isdir() else 0o644
            if info.isfile():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    archive.parent.mkdir(parents=True, exist_ok=True)
    with atomic.open_(archive, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out:
        out.write(buffer.getvalue())  # no name or time in the gzip header either
    return archive


def unpacked_limit(given: int | None = None) -> int:
    """The most bytes an archive may unpack to: ``given``, else $PIPELINE_MAX_UNPACKED_BYTES, else
    ``MAX_UNPACKED_BYTES``."""
    if given is not None:
        return given
    text = os.environ.get(MAX_UNPACKED_VARIABLE, "").strip()
    if not text:
        return MAX_UNPACKED_BYTES
    if not text.isdigit():
        raise InputError(f"${MAX_UNPACKED_VARIABLE} is {text!r}; set it to a whole number of bytes "
                         f"(e.g. {8 * 2**30} for 8 GiB), or unset it for the default {readable(MAX_UNPACKED_BYTES)}.")
    return int(text)


def readable(size: int) -> str:
    """``4.0 GiB (4294967296 bytes)``, ``700 bytes``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit} ({size} bytes)"
    return f"{size} bytes"


def top_folder(member: tarfile.TarInfo, archive: Path) -> str:
    """The first folder of a member's path; InputError when it is a link, not a regular file or
    folder, names nothing inside a folder (``.``, ``""``, ``model/.``) or a path outside it."""
    if member.issym() or member.islnk():
        raise InputError(f"{archive} holds a link, {member.name} -> {member.linkname}; a package holds "
                         "regular files only. Refusing to extract it.")
    if not (member.isfile() or member.isdir()):
        raise InputError(f"{archive} holds {member.name}, which is not a regular file or folder. Refusing it.")
    parts = PurePosixPath(member.name).parts
    if not parts or (member.isfile() and len(parts) == 1):
        raise InputError(f"{archive} holds a member named {member.name!r}, which names no file or folder inside "
                         "the package folder. Refusing to extract it; re-create the archive from the package "
                         "folder (the workflow's `export` rule), or register the folder itself.")
    if not safe_relative(member.name.rstrip("/")):
        raise InputError(f"{archive} holds {member.name!r}, a path outside its folder (absolute or with '..'). "
                         "Refusing to extract it.")
    return parts[0]


def check_members(members: Iterable[tarfile.TarInfo], archive: Path,
                  max_bytes: int | None = None) -> tuple[str, list[tarfile.TarInfo]]:
    """The one top folder of an archive and its members, each checked by ``top_folder``.

    ``members`` may be an open TarFile, which reads one header at a time: the sizes are added up as
    they come, and the archive is refused at the member that takes it over ``unpacked_limit(max_bytes)``,
    so a decompression bomb is never inflated far past the limit, let alone written to disk.
    """
    limit = unpacked_limit(max_bytes)
    tops, total, checked = set(), 0, []
    for member in members:
        tops.add(top_folder(member, archive))
        total += max(member.size, 0) if member.isfile() else 0
        if total > limit:
            raise InputError(f"{archive} unpacks to at least {readable(total)} (up to its member {member.name!r}), "
                             f"over the limit of {readable(limit)} for a package. Refusing to extract it. If the "
                             f"package is genuine, raise the limit: set the environment variable "
                             f"{MAX_UNPACKED_VARIABLE} to a larger number of bytes.")
        checked.append(member)
    if len(tops) != 1:
        raise InputError(f"{archive} must hold one package folder; it holds {sorted(tops)}. Refusing it.")
    return tops.pop(), checked


def unpack(archive: Path, dest: Path, max_bytes: int | None = None) -> Path:
    """Extract a package archive into the folder ``dest`` once every member and the unpacked size
    passed ``check_members``; return the package folder inside ``dest``."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            top, members = check_members(tar, archive, max_bytes)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise InputError(f"{archive} is not a readable .tar.gz package ({exc}).") from exc
    return Path(dest) / top
