"""Export a finished study as a model package (layout: ``pipeline.common.package``): folder and ``.tar.gz``.

Every fold's ``model.pt`` becomes safetensors weights; the package predicts with the ensemble of
folds exactly as the study's evaluation does (mean prediction, or mean class probabilities; a
segmentation study's voxel-wise majority vote of label maps, ``pipeline.sharing.segexport``). The
ONNX export of an image-level study is that ensemble in one graph; a segmentation study's holds
the folds' networks on views. Its outputs are checked against PyTorch's on the study's test
images (max abs difference ≤ 1e-4, recorded in ``spec.json``) or the export fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import __version__
from pipeline.common import atomic
from pipeline.common.cli import add_config
from pipeline.common import package
from pipeline.sharing import modelcard, onnxcheck, segexport, tarball
from pipeline.sharing.modelcard import PackageSettings
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.coder import TargetCoder
from pipeline.learning.loader import load_batch, mean_training_image
from pipeline.learning.losses import SEGMENTATION
from pipeline.common.errors import InputError
from pipeline.learning.saved import load_model

ONNX_TOLERANCE = onnxcheck.TOLERANCE
SAME_IN_EVERY_FOLD = ("model", "target", "input_shape", "channels")


class Ensemble(nn.Module):
    """The folds' networks and target decoding in one module: (B, C, X, Y, Z) → the mean over folds
    of the prediction in target units, (B, 1), or of the class probabilities, (B, K). Soft-label
    bins (a head kept from an imported SFCN): each fold's expected value over its bins."""

    def __init__(self, models: list[nn.Module], coders: list[TargetCoder]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.classification = coders[0].task == "classification"
        self.binned = bool(coders[0].bins)
        self.register_buffer("scale", torch.tensor([c.std for c in coders], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("shift", torch.tensor([c.mean for c in coders], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("centres", torch.tensor(coders[0].bins or [0.0], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([model(x) for model in self.models])  # (folds, B, outputs)
        if self.classification:
            return torch.softmax(outputs, dim=2).mean(0)
        if self.binned:
            return (torch.softmax(outputs, dim=2) * self.centres).sum(2, keepdim=True).mean(0)
        return (outputs * self.scale + self.shift).mean(0)


def image_onnx(models: list[nn.Module], records: dict, test_arrays: list[str], path: Path) -> dict:
    """Write the folds' ``Ensemble`` as ONNX at ``path`` and check it on the test images (one at a
    time); the spec's ``onnx`` entry. InputError above ``onnxcheck.TOLERANCE``."""
    ensemble = Ensemble(models, [TargetCoder(**r["coder"]) for r in records.values()]).eval()
    onnxcheck.write(ensemble, load_batch(test_arrays[:1]), path, "prediction")
    difference = onnxcheck.difference(path, ensemble, (load_batch([a]) for a in test_arrays))
    if difference > ONNX_TOLERANCE:
        raise InputError(f"{path}: ONNX Runtime differs from PyTorch by {difference:.2g} on the "
                         f"test images (tolerance {ONNX_TOLERANCE}); the export is not faithful.")
    return {"file": package.ONNX, "opset": onnxcheck.OPSET, "input": "image", "output": "prediction",
            "max_abs_difference": difference, "checked_on": f"{len(test_arrays)} test images"}


def fold_records(train_dirs: list[Path]) -> dict[str, dict]:
    """Each fold's ``model.pt`` record (tensors and plain types, read with weights_only), checked to
    share the architecture, target, input shape and channels."""
    records = {d.name: torch.load(d / "model.pt", weights_only=True, map_location="cpu") for d in train_dirs}
    first = next(iter(records.values()))
    for fold, record in records.items():
        for key in SAME_IN_EVERY_FOLD:
            if record[key] != first[key]:
                raise InputError(f"{fold}'s model.pt has {key} {record[key]!r}, another fold {first[key]!r}; "
                                 "rerun training so every fold comes from the same settings.")
    return records


def validation_metrics(train_dir: Path, record: dict) -> dict:
    """The validation loss and metric at the fold's best epoch (from ``history.tsv``)."""
    history = read_tsv(train_dir / "history.tsv").set_index("epoch")
    row = history.loc[record["epoch"]]
    return {"best_epoch": int(record["epoch"]), **{k: float(v) for k, v in row.items() if k.startswith("val_")}}


def write_documents(folder: Path, records: dict, evaluations: dict, summary: dict, train_dirs: list[Path],
                    recipe: dict, explain: dict, models: list[nn.Module], model_license: str) -> dict:
    """spec.json (without the ONNX check), preprocessing.json, normalisation.json, metrics.json; returns
    the spec. A segmentation spec has no explanation settings and adds ``segexport.spec_entries``.
    ``model_license`` is config ``package.license``."""
    first = next(iter(records.values()))
    coder = TargetCoder(**first["coder"])
    segmentation = coder.task == SEGMENTATION
    spec = {
        "format": package.FORMAT, "format_version": package.FORMAT_VERSION,
        "architecture": first["model"], "sampler": first.get("sampler"), "task": coder.task, "target": first["target"], "classes": coder.classes,
        "positive_class": summary["ensemble"].get("positive_class"),
        "input": {"shape": list(first["input_shape"]), "channels": list(first["channels"]), "dtype": "float32",
                  "axes": "(batch, channel, x, y, z): voxels of the template grid (RAS+), z-scored per image"},
        "outputs": coder.outputs, "folds": list(records),
        **({"output": {"type": "bins", "bins": coder.bins}} if coder.bins else {}),
        "ensemble": "mean over folds of the class probabilities" if coder.task == "classification"
                    else "mean over folds of the prediction in target units",
        "explain": None if segmentation else explain,
        **(segexport.spec_entries(models, coder.classes) if segmentation else {}),
        "license": model_license,
        "software": {"pipeline": __version__, **{name: version(name) for name in ("torch", "antspyx", "nilearn", "safetensors")}},
    }
    normalisation = {"input": recipe["normalisation"],
                     "target": {fold: r["coder"] for fold, r in records.items()},
                     "bias_correction": {fold: {"slope": m["correction_slope"], "intercept": m["correction_intercept"]}
                                         for fold, m in evaluations.items() if "correction_slope" in m}}
    metrics = {"test": {"ensemble": summary["ensemble"], "fold_mean": summary["fold_mean"], "fold_sd": summary["fold_sd"],
                        "folds": evaluations,
                        **{k: summary[k] for k in ("linear", "comparison") if k in summary}},
               "validation": {d.name: validation_metrics(d, records[d.name]) for d in train_dirs}}
    for name, doc in ((package.SPEC, spec), (package.RECIPE, recipe), (package.NORMALISATION, normalisation),
                      (package.METRICS, metrics)):
        atomic.write_text(folder / name, json.dumps(doc, indent=2, default=float) + "\n")
    return spec


def write_tensors(folder: Path, records: dict, tables: dict[str, pd.DataFrame]) -> None:
    """Each fold's weights, and each fold's mean training image, as safetensors."""
    from safetensors.torch import save_file

    (folder / "weights").mkdir()
    for fold, record in records.items():
        with atomic.path(folder / package.weights_file(fold)) as tmp:
            save_file({k: v.contiguous() for k, v in record["state_dict"].items()}, tmp)
    (folder / "statistics").mkdir()
    with atomic.path(folder / package.TRAIN_MEAN) as tmp:
        save_file({fold: mean_training_image(table).contiguous() for fold, table in tables.items()}, tmp)


def export(train_dirs: list[Path], evaluate_dirs: list[Path], summary: Path, manifest: Path, splits: Path,
           preproc_dir: Path, template: Path, mask: Path, recipe: dict, explain: dict, card: PackageSettings,
           out_dir: Path, archive: Path) -> float:
    """Write the package folder ``out_dir`` and ``archive``; return the ONNX max abs difference.
    ``recipe``: the study's preprocessing recipe; ``explain``: the explanation methods and settings
    the spec records; ``card``: config ``package``."""
    records = fold_records(train_dirs)
    first = next(iter(records.values()))
    channels = list(first["channels"])
    tables = {d.name: study_table(manifest, splits, preproc_dir, d.name, channels) for d in train_dirs}
    evaluations = {d.name: json.loads((d / "metrics.json").read_text()) for d in evaluate_dirs}
    if set(evaluations) != set(records):
        raise InputError(f"Evaluated folds {sorted(evaluations)} differ from trained folds {sorted(records)}.")
    models = [load_model(d / "model.pt")[0] for d in train_dirs]
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = write_documents(out_dir, records, evaluations, json.loads(summary.read_text()), train_dirs, recipe, explain,
                           models, card.license)
    write_tensors(out_dir, records, tables)
    (out_dir / "grid").mkdir()
    atomic.copyfile(template, out_dir / package.GRID_TEMPLATE)
    atomic.copyfile(mask, out_dir / package.GRID_MASK)

    test = next(iter(tables.values()))
    test_arrays = test.loc[test["split"] == "test", "array"].tolist()
    write_onnx = segexport.network_onnx if spec["task"] == SEGMENTATION else image_onnx
    spec["onnx"] = write_onnx(models, records, test_arrays, out_dir / package.ONNX)
    atomic.write_text(out_dir / package.SPEC, json.dumps(spec, indent=2) + "\n")

    counts = modelcard.cohort(read_tsv(manifest), read_tsv(splits),
                              None if spec["task"] == SEGMENTATION else spec["target"], spec["task"])
    metrics = json.loads((out_dir / package.METRICS).read_text())
    atomic.write_text(out_dir / package.CARD, modelcard.render(spec, recipe, metrics, counts, card))
    package.write_checksums(out_dir)
    package.verify(out_dir)
    tarball.pack(out_dir, archive)
    return spec["onnx"]["max_abs_difference"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-dirs", type=Path, nargs="+", required=True, help="results/train/fold-K folders")
    parser.add_argument("--evaluate-dirs", type=Path, nargs="+", required=True, help="results/evaluate/fold-K folders")
    parser.add_argument("--summary", type=Path, required=True, help="results/evaluate/metrics.json")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--splits", type=Path, required=True)
    parser.add_argument("--preproc-dir", type=Path, required=True)
    parser.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    parser.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    # recipe (the study's preprocessing recipe, pipeline.intake.recipe), explain (methods and
    # settings), package (the model card's intended_use and limitations, the model's license)
    add_config(parser)
    parser.add_argument("--out-dir", type=Path, required=True, help="the package folder to write")
    parser.add_argument("--archive", type=Path, required=True, help="the .tar.gz to write")
    args = parser.parse_args(argv)
    cfg = args.config
    with InputError.exit_cleanly():
        difference = export(args.train_dirs, args.evaluate_dirs, args.summary, args.manifest, args.splits,
                            args.preproc_dir, args.template, args.mask, cfg["recipe"], cfg["explain"],
                            PackageSettings.of(cfg["package"]), args.out_dir, args.archive)
    print(f"package {args.out_dir} ({args.archive}); ONNX max abs difference {difference:.3g}", file=sys.stderr)


if __name__ == "__main__":
    main()
