"""Apply a model package to preprocessed images (the workflow's apply mode, ``pipeline.apply``).

``predictions``: every fold's predictions (``fold-K/predictions.tsv``: participant_id, session,
image_id, predicted [, predicted_corrected] [, p_<class>]) and their ensemble
(``predictions.tsv``), computed exactly as the study's evaluation computes them.
``maps``: per image and method, the mean over folds of the attribution maps in template space and
in the image's native space (``maps/sub-X/…``, indexed in ``maps.tsv``), and each method's group
mean |map| with PNGs. ``labels`` (a segmentation package): every fold's label maps and their majority vote on the
template and the native grid (``pipeline.sharing.segpredict``). ``report``: one HTML page of
predictions (or label maps), maps, QC and the package's card.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from pipeline.common import atomic
from pipeline.common.cli import add_config, add_device, channel_names
from pipeline.learning.saved import package_coder, package_model
from pipeline.sharing import package, segpredict
from pipeline.results.attribution import SIGNED, Settings, attribute, settings_of
from pipeline.common.tables import read_tsv
from pipeline.learning.device import for_inference
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.results.evaluate import correct, ensemble, predict
from pipeline.results.mapfigures import plot_group
from pipeline.results.maps import GroupStatistics, save_image_maps, target_index, write_statistics
from pipeline.common.paths import derivative_paths, group_figure


def image_table(manifest: Path, preproc_dir: Path, channels: list[str]) -> pd.DataFrame:
    """The manifest's rows with each image's preprocessed ``array`` path."""
    table = read_tsv(manifest)
    table["array"] = [str(derivative_paths(preproc_dir, s, i, channels)["array"])
                      for s, i in zip(table["subdir"], table["image_id"])]
    return table


def predict_folds(pkg: package.Package, table: pd.DataFrame, out_dir: Path, out: Path,
                  device: torch.device | str = "cpu") -> pd.DataFrame:
    """Write each fold's predictions (``out_dir/fold-K/predictions.tsv``) and their ensemble (``out``),
    read back from the TSVs as ``pipeline.evaluate.summarise`` does, so the numbers equal the study's.
    The networks run on ``device``."""
    corrections = pkg.normalisation.get("bias_correction", {})
    for fold in pkg.folds:
        predictions = predict(package_model(pkg, fold, device), package_coder(pkg, fold), table, None)
        if fold in corrections:
            predictions["predicted_corrected"] = correct(predictions, **corrections[fold])
        (out_dir / fold).mkdir(parents=True, exist_ok=True)
        atomic.to_csv(predictions, out_dir / fold / "predictions.tsv", sep="\t", index=False)
    folds = [read_tsv(out_dir / fold / "predictions.tsv") for fold in pkg.folds]
    combined = ensemble(folds, pkg.spec["classes"])
    atomic.to_csv(combined, out, sep="\t", index=False)
    return combined


def predicting_expected_value(model: torch.nn.Module, coder) -> torch.nn.Module:
    """A soft-label bins network (an imported SFCN) made to output its prediction, the expected value
    over the bins (B, 1), so its maps explain the predicted value rather than the first bin; module
    names stay as they are (Grad-CAM's layer). Other networks are returned as they are."""
    if coder.bins:
        centres = torch.tensor(coder.bins, dtype=torch.float32)
        model.register_forward_hook(
            lambda module, inputs, out: (torch.softmax(out, dim=1) * centres.to(out.device)).sum(1, keepdim=True))
    return model


def fold_mean_maps(pkg: package.Package, x: torch.Tensor, methods: list[str], settings: Settings,
                   target_class: str | None, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Each method's map of one image (1, C, X, Y, Z), averaged over the folds' networks (all
    attributing ``target_class``, by default the last class: ``target_index``; Grad-CAM signed for
    regression, as the study does), computed on ``device``."""
    sums = {m: 0.0 for m in methods}
    for fold in pkg.folds:
        model, coder = package_model(pkg, fold, device), package_coder(pkg, fold)
        model = predicting_expected_value(model, coder)
        target = target_index(model, x, coder, target_class)
        maps, _ = attribute(model, x, target, methods, settings, pkg.train_mean(fold),
                            classification=coder.task == "classification")  # Grad-CAM's ReLU: as the study's
        for method, data in maps.items():
            sums[method] = sums[method] + data
    return {m: (s / len(pkg.folds)).astype(np.float32) for m, s in sums.items()}


def write_maps(pkg: package.Package, table: pd.DataFrame, preproc_dir: Path, channels: list[str], mask: Path,
               template: Path, methods: list[str], settings: Settings, target_class: str | None,
               out_dir: Path, device: torch.device | str = "cpu") -> pd.DataFrame:
    """Every image's fold-mean maps (template and native space), group statistics and PNGs; the index.
    The networks run on ``device``."""
    affine = nib.load(str(mask)).affine
    groups, rows = {m: GroupStatistics(SIGNED[m]) for m in methods}, []
    for i, row in enumerate(table.itertuples(index=False), 1):
        maps = fold_mean_maps(pkg, load_batch([row.array]), methods, settings, target_class, device)
        inverse = derivative_paths(preproc_dir, row.subdir, row.image_id, channels)["inverse"]
        for method, paths in save_image_maps(maps, row, affine, inverse, out_dir, channels[0], groups).items():
            rows.append({"image_id": row.image_id, "participant_id": row.participant_id, "method": method, **paths})
        print(f"[{i}/{len(table)}] {row.image_id}", file=sys.stderr)
    for method, group in groups.items():
        write_statistics(group, affine, out_dir, method)
    plot_group(out_dir, template, methods, len(pkg.folds), f"{len(table)} image(s)")
    index = pd.DataFrame(rows)
    atomic.to_csv(index, out_dir / "maps.tsv", sep="\t", index=False)
    return index


def calibration_section(summary_file: Path) -> list[str]:
    """The report's recalibration: the fit with its intervals, who it was fitted on, the held-out scores."""
    import json

    from pipeline.results.report import table_html
    from pipeline.sharing.calibrate import summary_line

    summary = json.loads(Path(summary_file).read_text())
    counts = summary["participants"]
    lines = ["<h2>Recalibration to this site (no training)</h2>",
             f"<p>{html.escape(summary_line(summary))}; {html.escape(summary['convention'])} "
             f"({html.escape(summary['interval'])}). Calibration participants: {counts['calibration']} (never scored); "
             f"held out with a known target: {counts['evaluation']}; without one: {counts['applied']}. "
             "Calibrated predictions: <code>predictions_calibrated.tsv</code>.</p>",
             *[f"<p><b>Warning:</b> {html.escape(w)}.</p>" for w in summary.get("warnings", [])]]
    scores = summary["evaluation"]
    if scores:
        def ci(key):
            low, high = scores.get(key) or (float("nan"), float("nan"))
            return f"{low:.3f} to {high:.3f}"

        rows = [{"metric": m, "raw": scores[m], "raw 95 % CI": ci(f"{m}_ci"), "calibrated": scores[f"calibrated_{m}"],
                 "calibrated 95 % CI": ci(f"calibrated_{m}_ci")} for m in ("mae", "rmse", "r2", "pearson_r")]
        lines += [f"<p>Held-out participants ({scores['n']}), over participants with bootstrap intervals:</p>",
                  table_html(pd.DataFrame(rows))]
    return lines


def build_report(pkg: package.Package, name: str, predictions: Path, explain_dir: Path | None, methods: list[str],
                 qc_pngs: list[Path], config: dict, out: Path, calibration: Path | None = None) -> Path:
    """One HTML page: the package, the predictions (and their recalibration), group maps, QC images
    and provenance. ``explain_dir`` None: no maps were asked for."""
    from pipeline.results.report import embed_png, provenance, table_html

    spec, test = pkg.spec, pkg.metrics["test"].get("ensemble", {})
    segmentation = spec["task"] == "segmentation"
    headline = {"classification": "roc_auc", "segmentation": "dice_mean"}.get(spec["task"], "mae")
    table = read_tsv(predictions)
    what = ("Segmentation into " + ", ".join(f"{k} {html.escape(n)}" for k, n in enumerate(spec["classes"]))
            if segmentation else f"Predictions of {html.escape(spec['task'])} of <code>{html.escape(spec['target'])}</code>")
    sections = [
        f"<h1>{what} by {html.escape(name)}</h1>",
        f"<p>{len(table)} images of {table['participant_id'].nunique()} participants; the {html.escape(spec['ensemble'])} "
        f"of {len(spec['folds'])} <code>{html.escape(spec['architecture']['name'])}</code> networks. "
        + (f"The package's own test-set {headline}: {test[headline]:.3f}.</p>" if headline in test else
           "The package was imported: no test metrics of its own (see its model card's parity check).</p>"),
        *(["<h2>Label maps (template and native grid)</h2>", table_html(table)] if segmentation
          else ["<h2>Predictions</h2>", table_html(table)]),
        *(calibration_section(calibration) if calibration else []),
        *([] if segmentation else ["<h2>Explanation maps (template space, mean over folds and images)</h2>"]),
        *(["<p>Not computed: predictions only (<code>--maps none</code>).</p>"]
          if explain_dir is None and not segmentation else []),
        *[embed_png(Path(group_figure(str(explain_dir), m, v)), f"Mean |{m}| ({v})") for m in methods
          for v in ("slices", "glass") if not segmentation and explain_dir is not None],
        "<h2>Preprocessing quality control (first images)</h2>", *[embed_png(p, p.name) for p in qc_pngs],
        "<h2>Model card</h2>", f"<pre>{html.escape((pkg.folder / package.CARD).read_text())}</pre>",
        "<h2>Provenance</h2>", provenance(config),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}pre{white-space:pre-wrap}")
    atomic.write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>Predictions</title><style>{style}</style>"
                   "</head><body>" + "\n".join(sections) + "</body></html>")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for command in ("predictions", "maps", "labels"):
        sub = commands.add_parser(command)
        add_config(sub)  # apply (package: the fetched package folder), channels; maps: explain
        sub.add_argument("--manifest", type=Path, required=True)
        sub.add_argument("--preproc-dir", type=Path, required=True)
        sub.add_argument("--out-dir", type=Path, required=True)
        add_device(sub)
    commands.choices["predictions"].add_argument("--predictions", type=Path, required=True,
                                                 help="the ensemble's predictions (TSV) to write")
    commands.choices["labels"].add_argument("--predictions", type=Path, required=True,
                                            help="the ensemble's table of label maps (TSV) to write; its maps go "
                                                 "under labels/ beside it")
    maps = commands.choices["maps"]
    maps.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    maps.add_argument("--template", type=Path, required=True, help="study-grid template (NIfTI)")
    maps.add_argument("--threads", type=int, default=1)
    report = commands.add_parser("report")
    add_config(report)  # the whole run's config: apply (package, name), explain.methods, and the provenance
    report.add_argument("--predictions", type=Path, required=True)
    report.add_argument("--explain-dir", type=Path, help="the group maps' folder (not for a segmentation package)")
    report.add_argument("--calibration", type=Path, help="calibration.json of a recalibrated regression package")
    report.add_argument("--qc", type=Path, nargs="*", default=[])
    report.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cfg = args.config
    with InputError.exit_cleanly():
        if args.command != "report":  # `device: cuda` without a GPU fails before any work
            device = for_inference(args.device)
        pkg = package.load(Path(cfg["apply"]["package"]))
        if args.command == "report":
            name = cfg["apply"].get("name") or cfg["apply"]["package"]
            build_report(pkg, name, args.predictions, args.explain_dir, cfg["explain"]["methods"], args.qc, cfg,
                         args.out, args.calibration)
            return
        channels = channel_names(cfg)
        if (args.command == "labels") != (pkg.spec["task"] == "segmentation"):
            raise InputError(f"Package {pkg.folder} predicts {pkg.spec['task']}: use `python -m pipeline.predict "
                             f"{'labels' if pkg.spec['task'] == 'segmentation' else 'predictions'}`, not {args.command}.")
        if args.command == "labels":
            table = segpredict.label_table(args.manifest, args.preproc_dir, channels, pkg, cfg.get("label_image"))
            segpredict.predict_labels(pkg, table, args.preproc_dir, channels, args.out_dir, args.predictions, device)
            print(f"{len(table)} label map(s): {args.predictions}", file=sys.stderr)
            return
        table = image_table(args.manifest, args.preproc_dir, channels)
        if args.command == "predictions":
            print(predict_folds(pkg, table, args.out_dir, args.predictions, device).to_string(index=False),
                  file=sys.stderr)
        else:
            torch.set_num_threads(args.threads)
            explain = cfg["explain"]
            write_maps(pkg, table, args.preproc_dir, channels, args.mask, args.template, explain["methods"],
                       settings_of(explain), explain["target_class"] or pkg.spec.get("positive_class"), args.out_dir,
                       device)


if __name__ == "__main__":
    main()
