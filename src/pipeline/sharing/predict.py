"""Apply a model package to preprocessed images (the workflow's apply mode, ``bids-deepstudy apply``).

``predictions``: every fold's predictions (``fold-K/predictions.tsv``: participant_id, session,
image_id, predicted [, predicted_corrected] [, p_<class>]) and their ensemble
(``predictions.tsv``), computed exactly as the study's evaluation computes them.
``maps``: per image and method, the mean over folds of the attribution maps in template space and
in the image's native space (``maps/sub-X/…``, indexed in ``maps.tsv``), and each method's group
mean |map| with PNGs. ``labels`` (a segmentation package): every fold's label maps and their majority vote on the
template and the native grid (``pipeline.sharing.segpredict``). ``retest``: per pair of one
participant's images (two scans of one session, or of sessions close in time), the difference of
their predictions and the similarity of their maps (``retest_predictions.tsv``,
``pipeline.results.retest``). ``report``: one HTML page of predictions (or label maps), maps,
test-retest, QC and the package's card.
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
from pipeline.learning.saved import package_coder, package_model, predicting_expected_value
from pipeline.common import package
from pipeline.sharing import segpredict
from pipeline.results.attribution import Settings, attribute
from pipeline.common.tables import read_tsv
from pipeline.learning.device import for_inference
from pipeline.learning.loader import load_batch
from pipeline.common.errors import InputError
from pipeline.results.evaluate import correct, ensemble, predict
from pipeline.results.mapfigures import plot_group
from pipeline.results import maps as mapfiles
from pipeline.results.maps import FoldMeanMaps, target_index
from pipeline.results.retest import retest_table
from pipeline.common.paths import group_figure
from pipeline.intake.study import image_table


def predict_folds(pkg: package.Package, table: pd.DataFrame, out_dir: Path, out: Path,
                  device: torch.device | str = "cpu") -> pd.DataFrame:
    """Write each fold's predictions (``out_dir/fold-K/predictions.tsv``) and their ensemble (``out``),
    read back from the TSVs as ``pipeline.results.evaluate.summarise`` does, so the numbers equal the study's.
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
    """Every image's fold-mean maps (template and native space), group statistics (the study's
    map-writing path, ``pipeline.results.maps.write_maps``) and PNGs; the index. The networks run
    on ``device``."""
    def maps_of(i: int, row) -> tuple[dict[str, np.ndarray], dict]:
        return fold_mean_maps(pkg, load_batch([row.array]), methods, settings, target_class, device), {}

    index = mapfiles.write_maps(table, maps_of, nib.load(str(mask)).affine, preproc_dir, channels, out_dir, methods)
    plot_group(out_dir, template, methods, len(pkg.folds), f"{len(table)} image(s)")
    return index


def write_retest(predictions: Path, maps_dir: Path | None, mask: Path, out: Path) -> pd.DataFrame:
    """``retest_predictions.tsv`` (``pipeline.results.retest``): per pair of one participant's
    images, the difference of their predictions and, with ``maps_dir`` (its ``maps.tsv``), the
    similarity of each method's maps in template space inside the brain ``mask``."""
    maps = {}
    if maps_dir is not None:
        methods = read_tsv(maps_dir / "maps.tsv")["method"].unique()
        maps = {m: FoldMeanMaps([maps_dir], m, "template") for m in methods}  # one "fold": the folds' mean
    table = retest_table(read_tsv(predictions), maps, np.asarray(nib.load(str(mask)).dataobj))
    atomic.to_csv(table, out, sep="\t", index=False)
    print(f"test-retest: {len(table)} pair(s) of one participant's images in {out}", file=sys.stderr)
    return table


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
             "Calibrated predictions: <code>predicted_calibrated</code> in the participants and scans tables "
             "(all columns: <code>predictions_calibrated.tsv</code> in the work folder).</p>",
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
                 qc_pngs: list[Path], config: dict, out: Path, calibration: Path | None = None,
                 retest: list[Path] = ()) -> Path:
    """One HTML page: the package, the predictions (and their recalibration), group maps, test-retest
    (``retest``: ``retest.tsv`` and ``retest_predictions.tsv``, where given), QC images and
    provenance. ``explain_dir`` None: no maps were asked for."""
    from pipeline.results import retest as model_retest
    from pipeline.results.report import embed_png, provenance, retest_paragraph, table_html

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
        *(["<h2>Test–retest</h2>"] if retest else []),
        *[line for path in retest for line in (
            retest_paragraph(Path(path)) if Path(path).name == "retest.tsv"
            else model_retest.paragraph(Path(path), spec["task"], spec["target"]))],
        "<h2>Preprocessing quality control (first images)</h2>", *[embed_png(p, p.name) for p in qc_pngs],
        "<h2>Model card</h2>", f"<pre>{html.escape((pkg.folder / package.CARD).read_text())}</pre>",
        "<h2>Provenance</h2>", provenance(config),
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}pre{white-space:pre-wrap}")
    atomic.write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>Predictions</title><style>{style}</style>"
                   "</head><body>" + "\n".join(sections) + "</body></html>")
    return out


def package_for(cfg: dict, command: str) -> package.Package:
    """The fetched package of the apply config (``apply.package``); InputError where ``command``
    (``predictions``, ``maps``, ``labels``) is not for its task."""
    pkg = package.load(Path(cfg["apply"]["package"]))
    if (command == "labels") != (pkg.spec["task"] == "segmentation"):
        raise InputError(f"Package {pkg.folder} predicts {pkg.spec['task']}: use `python -m pipeline.sharing.predict "
                         f"{'labels' if pkg.spec['task'] == 'segmentation' else 'predictions'}`, not {command}.")
    return pkg


def command_line() -> argparse.ArgumentParser:
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
    retest = commands.add_parser("retest", help="test-retest of the predictions and maps (pipeline.results.retest)")
    retest.add_argument("--predictions", type=Path, required=True, help="the ensemble's predictions (TSV)")
    retest.add_argument("--maps-dir", type=Path, help="the folder of maps.tsv (omitted: predictions only)")
    retest.add_argument("--mask", type=Path, required=True, help="study-grid brain mask (NIfTI)")
    retest.add_argument("--out", type=Path, required=True, help="retest_predictions.tsv to write")
    report = commands.add_parser("report")
    add_config(report)  # the whole run's config: apply (package, name), explain.methods, and the provenance
    report.add_argument("--predictions", type=Path, required=True)
    report.add_argument("--explain-dir", type=Path, help="the group maps' folder (not for a segmentation package)")
    report.add_argument("--calibration", type=Path, help="calibration.json of a recalibrated regression package")
    report.add_argument("--qc", type=Path, nargs="*", default=[])
    report.add_argument("--retest", type=Path, nargs="*", default=[],
                        help="retest.tsv (preprocessing) and retest_predictions.tsv (predictions and maps)")
    report.add_argument("--out", type=Path, required=True)
    return parser


def main(argv=None) -> None:
    args = command_line().parse_args(argv)
    if args.command == "retest":
        write_retest(args.predictions, args.maps_dir, args.mask, args.out)
        return
    cfg = args.config
    with InputError.exit_cleanly():
        if args.command == "report":
            build_report(package.load(Path(cfg["apply"]["package"])), cfg["apply"].get("name") or cfg["apply"]["package"],
                         args.predictions, args.explain_dir, cfg["explain"]["methods"], args.qc, cfg, args.out,
                         args.calibration, args.retest)
            return
        device = for_inference(args.device)  # `device: cuda` without a GPU fails before any work
        pkg, channels = package_for(cfg, args.command), channel_names(cfg)
        if args.command == "labels":
            table = segpredict.label_table(args.manifest, args.preproc_dir, channels, pkg, cfg["label_image"])
            segpredict.predict_labels(pkg, table, args.preproc_dir, channels, args.out_dir, args.predictions, device)
            print(f"{len(table)} label map(s): {args.predictions}", file=sys.stderr)
        elif args.command == "predictions":
            combined = predict_folds(pkg, image_table(args.manifest, args.preproc_dir, channels), args.out_dir,
                                     args.predictions, device)
            print(combined.to_string(index=False), file=sys.stderr)
        else:
            torch.set_num_threads(args.threads)
            explain = cfg["explain"]
            write_maps(pkg, image_table(args.manifest, args.preproc_dir, channels), args.preproc_dir, channels,
                       args.mask, args.template, explain["methods"], Settings.of(explain),
                       explain["target_class"] or pkg.spec.get("positive_class"), args.out_dir, device)

if __name__ == "__main__":
    main()
