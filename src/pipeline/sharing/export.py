"""Export a finished study as a model package (layout: ``pipeline.sharing.package``): folder and ``.tar.gz``.
Image-level models only: a segmentation study is refused (the workflow has no package rule for it).

Every fold's ``model.pt`` becomes safetensors weights; the package predicts with the ensemble of
folds exactly as the study's evaluation does (mean prediction, or mean class probabilities). The
ONNX export is that ensemble in one graph; its outputs are checked against PyTorch's on the
study's test images (max abs difference ≤ 1e-4, recorded in ``spec.json``) or the export fails.
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
from pipeline.sharing import modelcard
from pipeline.sharing import package
from pipeline.common.tables import read_tsv
from pipeline.intake.study import study_table
from pipeline.learning.coder import TargetCoder
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.results.explain import mean_training_image
from pipeline.learning.saved import load_model

ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17
SAME_IN_EVERY_FOLD = ("model", "target", "input_shape", "channels")


class Ensemble(nn.Module):
    """The folds' networks and target decoding in one module: (B, C, X, Y, Z) → the mean over folds
    of the prediction in target units, (B, 1), or of the class probabilities, (B, K)."""

    def __init__(self, models: list[nn.Module], coders: list[TargetCoder]):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.classification = coders[0].task == "classification"
        self.register_buffer("scale", torch.tensor([c.std for c in coders], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("shift", torch.tensor([c.mean for c in coders], dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = torch.stack([model(x) for model in self.models])  # (folds, B, outputs)
        if self.classification:
            return torch.softmax(outputs, dim=2).mean(0)
        return (outputs * self.scale + self.shift).mean(0)


def export_onnx(ensemble: Ensemble, example: torch.Tensor, path: Path) -> None:
    """Write ``ensemble`` as ONNX (input ``image``, output ``prediction``, dynamic batch).

    Uses torch's TorchScript-based exporter (``dynamo=False``): it needs only the ``onnx`` package
    and exports these networks in a second; torch is pinned, so its deprecation does not bite.
    """
    import warnings

    with warnings.catch_warnings(), atomic.path(path) as tmp:
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and instance-norm training-mode note
        torch.onnx.export(ensemble.eval(), (example,), str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=["prediction"],
                          dynamic_axes={"image": {0: "batch"}, "prediction": {0: "batch"}})


def onnx_difference(path: Path, ensemble: Ensemble, arrays: list[str]) -> float:
    """Max |ONNX Runtime − PyTorch| over the outputs for ``arrays`` (preprocessed ``.npy``), one image at a time."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for array in arrays:
            x = load_batch([array])
            ours = ensemble(x).numpy()
            theirs = session.run(None, {"image": x.numpy()})[0]
            worst = max(worst, float(np.abs(ours - theirs).max()))
    return worst


def fold_records(train_dirs: list[Path]) -> dict[str, dict]:
    """Each fold's ``model.pt`` record (tensors and plain types, read with weights_only), checked to
    share the architecture, target, input shape and channels."""
    records = {d.name: torch.load(d / "model.pt", weights_only=True, map_location="cpu") for d in train_dirs}
    first = next(iter(records.values()))
    if first["coder"]["task"] == "segmentation":
        raise InputError("Model packages hold image-level models (regression, classification); a segmentation "
                         "study (`task: segmentation`) is not exported: its fold models are "
                         "train/fold-K/model.pt and its label maps evaluate/*/labels.")
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
                    recipe: dict, explain: dict) -> dict:
    """spec.json (without the ONNX check), preprocessing.json, normalisation.json, metrics.json; returns the spec."""
    first = next(iter(records.values()))
    coder = TargetCoder(**first["coder"])
    spec = {
        "format": package.FORMAT, "format_version": package.FORMAT_VERSION,
        "architecture": first["model"], "sampler": first.get("sampler"), "task": coder.task, "target": first["target"], "classes": coder.classes,
        "positive_class": summary["ensemble"].get("positive_class"),
        "input": {"shape": list(first["input_shape"]), "channels": list(first["channels"]), "dtype": "float32",
                  "axes": "(batch, channel, x, y, z): voxels of the template grid (RAS+), z-scored per image"},
        "outputs": coder.outputs, "folds": list(records),
        "ensemble": "mean over folds of the class probabilities" if coder.task == "classification"
                    else "mean over folds of the prediction in target units",
        "explain": explain,
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
           preproc_dir: Path, template: Path, mask: Path, recipe: dict, explain: dict, card: dict,
           out_dir: Path, archive: Path) -> float:
    """Write the package folder ``out_dir`` and ``archive``; return the ONNX max abs difference."""
    records = fold_records(train_dirs)
    first = next(iter(records.values()))
    channels = list(first["channels"])
    tables = {d.name: study_table(manifest, splits, preproc_dir, d.name, channels) for d in train_dirs}
    evaluations = {d.name: json.loads((d / "metrics.json").read_text()) for d in evaluate_dirs}
    if set(evaluations) != set(records):
        raise InputError(f"Evaluated folds {sorted(evaluations)} differ from trained folds {sorted(records)}.")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    spec = write_documents(out_dir, records, evaluations, json.loads(summary.read_text()), train_dirs, recipe, explain)
    write_tensors(out_dir, records, tables)
    (out_dir / "grid").mkdir()
    atomic.copyfile(template, out_dir / package.GRID_TEMPLATE)
    atomic.copyfile(mask, out_dir / package.GRID_MASK)

    models = [load_model(d / "model.pt")[0] for d in train_dirs]
    ensemble = Ensemble(models, [TargetCoder(**r["coder"]) for r in records.values()]).eval()
    test = next(iter(tables.values()))
    test_arrays = test.loc[test["split"] == "test", "array"].tolist()
    export_onnx(ensemble, load_batch(test_arrays[:1]), out_dir / package.ONNX)
    difference = onnx_difference(out_dir / package.ONNX, ensemble, test_arrays)
    if difference > ONNX_TOLERANCE:
        raise InputError(f"{out_dir / package.ONNX}: ONNX Runtime differs from PyTorch by {difference:.2g} on the "
                         f"test images (tolerance {ONNX_TOLERANCE}); the export is not faithful.")
    spec["onnx"] = {"file": package.ONNX, "opset": ONNX_OPSET, "input": "image", "output": "prediction",
                    "max_abs_difference": difference, "checked_on": f"{len(test_arrays)} test images"}
    atomic.write_text(out_dir / package.SPEC, json.dumps(spec, indent=2) + "\n")

    counts = modelcard.cohort(read_tsv(manifest), read_tsv(splits), spec["target"], spec["task"])
    metrics = json.loads((out_dir / package.METRICS).read_text())
    atomic.write_text(out_dir / package.CARD, modelcard.render(spec, recipe, metrics, counts, card))
    package.write_checksums(out_dir)
    package.verify(out_dir)
    package.pack(out_dir, archive)
    return difference


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
    # settings), package (the model card's intended_use and limitations)
    add_config(parser)
    parser.add_argument("--out-dir", type=Path, required=True, help="the package folder to write")
    parser.add_argument("--archive", type=Path, required=True, help="the .tar.gz to write")
    args = parser.parse_args(argv)
    cfg = args.config
    with InputError.exit_cleanly():
        difference = export(args.train_dirs, args.evaluate_dirs, args.summary, args.manifest, args.splits,
                            args.preproc_dir, args.template, args.mask, cfg["recipe"], cfg["explain"],
                            cfg["package"], args.out_dir, args.archive)
    print(f"package {args.out_dir} ({args.archive}); ONNX max abs difference {difference:.3g}", file=sys.stderr)


if __name__ == "__main__":
    main()
