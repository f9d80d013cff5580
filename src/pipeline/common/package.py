"""A model package: a folder of JSON, safetensors and NIfTI files, checked before anything is loaded.

The file format and its reading only, below every room that reads a package (the grid of apply
mode, fine-tuning, prediction): a fold's network is built from it by ``pipeline.learning.saved``;
archives (``.tar.gz``) are written and unpacked by ``pipeline.sharing.tarball``.

Layout (every path relative to the package folder)::

    spec.json               architecture, task, target, classes, input shape and channels, folds;
                            segmentation: labels, inference (views → whole label maps), ensemble rule
    preprocessing.json      the recipe (pipeline.intake.recipe): template, grid, steps and parameters
    normalisation.json      per fold: the target coder and the brain-age bias correction
    metrics.json            validation (per fold) and test (per fold and ensemble) metrics
    model_card.md           data summary, intended use, limitations
    weights/fold-K.safetensors   each fold's state dict
    statistics/train_mean.safetensors   each fold's mean training image (integrated gradients' baseline)
    grid/template.nii.gz, grid/brain_mask.nii.gz   the study grid the images were registered to
    model.onnx              the ensemble of folds, (B, C, X, Y, Z) z-scored images → predictions;
                            segmentation: the folds' networks, views → logits (pipeline.sharing.segexport)
    checksums.sha256        sha256 of every other file (``sha256sum -c`` format)

Loading reads JSON and safetensors only, never a pickle, and only after every checksum matched.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.common import atomic
from pipeline.common.errors import InputError

FORMAT = "pipeline-model-package"
FORMAT_VERSION = 1
CHECKSUMS = "checksums.sha256"
SPEC, RECIPE, NORMALISATION, METRICS, CARD = "spec.json", "preprocessing.json", "normalisation.json", "metrics.json", "model_card.md"
TRAIN_MEAN = "statistics/train_mean.safetensors"
GRID_TEMPLATE, GRID_MASK = "grid/template.nii.gz", "grid/brain_mask.nii.gz"
ONNX = "model.onnx"


def weights_file(fold: str) -> str:
    return f"weights/{fold}.safetensors"


def files(folds: list[str]) -> list[str]:
    """Every file of a package of ``folds``, relative to its folder (the export rule's outputs)."""
    return [SPEC, RECIPE, NORMALISATION, METRICS, CARD, *map(weights_file, folds), TRAIN_MEAN, GRID_TEMPLATE,
            GRID_MASK, ONNX, CHECKSUMS]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> Path:
    """Write ``checksums.sha256`` listing every file under ``folder`` (sorted, POSIX paths)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    lines = [f"{sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    atomic.write_text(folder / CHECKSUMS, "".join(lines))
    return folder / CHECKSUMS


def read_checksums(folder: Path) -> dict[str, str]:
    """``checksums.sha256`` as {relative path: sha256}; a malformed line or an unsafe path is an error."""
    path = folder / CHECKSUMS
    if not path.is_file():
        raise InputError(f"{folder} is not a model package: it has no {CHECKSUMS}. Export one with the "
                         "workflow's `export` rule, or fetch one with `bids-deepstudy fetch`.")
    listed = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name or not safe_relative(name):
            raise InputError(f"{path} line {number} is not '<sha256>  <relative path inside the package>': {line!r}")
        listed[name] = digest
    return listed


def safe_relative(name: str) -> bool:
    """True for a relative POSIX path that stays inside its folder (no ``..``, not absolute)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name and ":" not in name


def verify(folder: Path) -> None:
    """Check the package in ``folder``: no links, exactly the listed files, every sha256 equal,
    weights in safetensors format. Each refusal names the file."""
    folder = Path(folder)
    listed = read_checksums(folder)
    present = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise InputError(f"{path} is a link; a model package holds regular files only. Refusing {folder}.")
        if path.is_file() and path.name != CHECKSUMS:
            present[path.relative_to(folder).as_posix()] = path
    missing, unlisted = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if missing:
        raise InputError(f"{folder / missing[0]} is listed in {CHECKSUMS} but missing; fetch the package again.")
    if unlisted:
        raise InputError(f"{folder / unlisted[0]} is not listed in {CHECKSUMS}: the package was altered. Refusing it.")
    for name, path in present.items():  # the format first: a pickle is named as such, whatever its checksum
        if name.endswith(".safetensors"):
            check_safetensors(path)
    for name, path in present.items():
        if sha256(path) != listed[name]:
            raise InputError(f"{path}: sha256 checksum mismatch (the file differs from the one exported); "
                             "the package is corrupt or was tampered with. Refusing it; fetch it again.")


def check_safetensors(path: Path) -> None:
    """InputError unless ``path`` starts like a safetensors file (8-byte header length, JSON header):
    a pickle (``torch.save`` or ``pickle.dump``) renamed ``.safetensors`` is refused before any load."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if head[:1] == b"\x80" or head[:2] == b"PK":
        kind = "a Python pickle" if head[:1] == b"\x80" else "a zip archive (torch.save's pickle format)"
        raise InputError(f"{path} is {kind} posing as safetensors weights. Packages carry weights as "
                         "safetensors only and are never unpickled; refusing it.")
    if len(head) < 9 or struct.unpack("<Q", head[:8])[0] + 8 > size or head[8:9] != b"{":
        raise InputError(f"{path} is not a safetensors file (no valid header). Refusing it.")


@dataclass(frozen=True)
class Package:
    """A verified package folder and its JSON documents."""

    folder: Path
    spec: dict
    recipe: dict
    normalisation: dict
    metrics: dict

    @property
    def folds(self) -> list[str]:
        return list(self.spec["folds"])

    def state_dict(self, fold: str) -> dict:
        """One fold's weights (safetensors)."""
        from safetensors.torch import load_file

        return load_file(self.folder / weights_file(fold))

    def train_mean(self, fold: str):
        """One fold's mean training image, (1, C, X, Y, Z)."""
        from safetensors.torch import load_file

        return load_file(self.folder / TRAIN_MEAN)[fold][None]


def load(folder: Path) -> Package:
    """Verify the package in ``folder`` and read its JSON documents (no weights are read yet)."""
    folder = Path(folder)
    verify(folder)
    docs = {name: json.loads((folder / name).read_text()) for name in (SPEC, RECIPE, NORMALISATION, METRICS)}
    spec = docs[SPEC]
    if spec.get("format") != FORMAT or spec.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{folder / SPEC}: format {spec.get('format')!r} version {spec.get('format_version')!r}; "
                         f"this pipeline reads {FORMAT!r} version {FORMAT_VERSION}.")
    return Package(folder, spec, docs[RECIPE], docs[NORMALISATION], docs[METRICS])
