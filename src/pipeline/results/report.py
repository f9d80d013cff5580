"""One self-contained HTML report of the study: cohort, exclusions, splits, training, metrics, maps.
A segmentation study (``task: segmentation``) shows per-label Dice and HD95 and has no explanation maps."""

from __future__ import annotations

import argparse
import base64
import html
import json
import subprocess
from pathlib import Path

import pandas as pd

from pipeline.common import atomic
from pipeline.common.cli import add_config
from pipeline import __version__
from pipeline.common.locations import CHECKOUT, REPOSITORY
from pipeline.common.paths import group_figure
from pipeline.common.tables import read_tsv
from pipeline.results.htmltables import cell, ci_decimals, metrics_html, settings_html, table_html
from pipeline.results import retest


def embed_png(path: Path, alt: str) -> str:
    """A PNG inlined as a figure; an empty file (the QC of a sample preprocessing excluded) as a note."""
    if Path(path).stat().st_size == 0:
        return f"<p>{html.escape(alt)}: no image (the sample was excluded; see excluded.tsv).</p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def learning_curves(histories: dict[str, pd.DataFrame], png: Path) -> Path:
    """Train and validation loss (and metric) per epoch, one line pair per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(histories.values()))
    metric = [c for c in first.columns if c.startswith("val_") and c != "val_loss"][0].removeprefix("val_")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for (fold, history), colour in zip(histories.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 9):
        for ax, key in zip(axes, ["loss", metric]):
            ax.plot(history["epoch"], history[f"train_{key}"].astype(float), color=colour, ls=":", lw=1)
            ax.plot(history["epoch"], history[f"val_{key}"].astype(float), color=colour, label=fold)
    for ax, key in zip(axes, ["loss", metric]):
        ax.set(xlabel="epoch", ylabel=key, title=f"{key}: validation (solid), training (dotted)")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    atomic.savefig(fig, png, dpi=90)
    plt.close(fig)
    return png


def provenance(config: dict) -> str:
    """Package versions, the code's git commit and the study's configuration."""
    from importlib.metadata import version

    packages = ["torch", "antspyx", "monai", "captum", "nibabel", "nilearn", "pybids", "snakemake",
                "scikit-learn", "numpy", "pandas"]
    versions = {"pipeline": __version__}
    for name in packages:
        try:
            versions[name] = version(name)
        except Exception:  # not installed
            versions[name] = "not installed"
    described = f"installed package, version {__version__} (not a git checkout)"
    if CHECKOUT:
        repo = REPOSITORY
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True)
        if commit.returncode == 0:
            described = commit.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    return (f"<p>Code: {html.escape(described)}</p>"
            + table_html(pd.DataFrame(list(versions.items()), columns=["package", "version"]))
            + "<p>The study's configuration (config/README.md explains each key):</p>" + settings_html(config))


def variant_tables(train: Path, folds: list[str]) -> list[str]:
    """With train.variants: each fold's variants.tsv (best validation loss per variant, the chosen one)
    under the training folder ``train``."""
    tables = {fold: train / fold / "variants.tsv" for fold in folds}
    if not all(t.exists() for t in tables.values()):
        return []
    joined = pd.concat([read_tsv(t).assign(fold=fold) for fold, t in tables.items()])
    return ["<h3>Hyperparameter variants (chosen by validation loss; segmentation: validation Dice)</h3>",
            table_html(joined[["fold", *[c for c in joined.columns if c != "fold"]]])]


def design_warnings(balance: pd.DataFrame) -> list[str]:
    """The split's warnings (``split_balance.tsv``'s ``warning`` column: a class share more than 10
    points off, a training set too small for its task), one list item each."""
    if "warning" not in balance:
        return []
    rows = balance[balance["warning"].fillna("").astype(str) != ""]
    return [f"<li><b>design, {html.escape(str(r.fold))} {html.escape(str(r.split))}</b>: {html.escape(str(r.warning))}"
            "</li>" for r in rows.itertuples()]


def verdicts_sentence(comparison: pd.DataFrame) -> str:
    """Every model's verdict against the linear baseline on the headline metric (``comparison.tsv``),
    fold by fold and the ensemble, in one sentence; empty without a comparison."""
    from pipeline.results.metrics import HEADLINE

    if comparison.empty:
        return ""
    names = [n for n in HEADLINE.values() if n in set(comparison["metric"])]
    rows = comparison[comparison["metric"] == names[0]] if names else comparison.iloc[0:0]
    parts = [f"{r.model}: {r.verdict} (deep − linear {r.difference:+.3g}, 95 % interval {r.difference_ci_low:+.3g} "
             f"to {r.difference_ci_high:+.3g})" for r in rows.itertuples()]
    if not parts:
        return ""
    worse = [r.model for r in rows.itertuples() if r.verdict == "linear better"]
    return (f"Deep against linear on test {names[0]}, model by model: {'; '.join(parts)}. "
            + (f"The linear baseline is better for {', '.join(worse)}." if worse else
               "The linear baseline is better for no model."))


def diagnostics_html(evaluate: Path, balance: pd.DataFrame | None = None) -> list[str]:
    """The study's learning diagnostics (``evaluate/diagnostics.json``), one sentence each, by fold,
    after the design's warnings (``balance``: the split balance table), and a sentence naming every
    model's verdict against the linear baseline (``comparison.tsv``)."""
    path = evaluate / "diagnostics.json"
    design = design_warnings(balance) if balance is not None else []
    comparison = read_tsv(evaluate / "comparison.tsv") if (evaluate / "comparison.tsv").exists() else pd.DataFrame()
    verdicts = verdicts_sentence(comparison)
    closing = [f"<p>{html.escape(verdicts)}</p>"] if verdicts else []
    if not path.exists():
        return (["<h2>Diagnostics</h2>", "<ul class='warn'>", *design, "</ul>"] if design else []) + closing
    found = json.loads(path.read_text())
    items = design + [f"<li><b>study</b>: {html.escape(f['message'])}</li>" for f in found["study"]]
    items += [f"<li><b>{html.escape(fold)}</b>: {html.escape(f['message'])}</li>"
              for fold, findings in found["folds"].items() for f in findings]
    if not items:
        return ["<h2>Diagnostics</h2>", "<p>No warning from training: every fold fitted its training data without "
                "its validation loss diverging.</p>", *closing]
    return ["<h2>Diagnostics</h2>", "<ul class='warn'>", *items, "</ul>", *closing]


def comparison_html(evaluate: Path, summary: dict) -> list[str]:
    """Deep model against the linear baseline on the same test images (``comparison.tsv``)."""
    path = evaluate / "comparison.tsv"
    if not path.exists():
        return []
    table = read_tsv(path)
    linear = summary.get("linear", {})
    described = (f" ({html.escape(linear['model'])})" if "model" in linear else "")
    return ["<h2>Deep model against a linear baseline</h2>",
            f"<p>A linear model{described} fitted per fold to the same preprocessed images and splits "
            "(ridge or L2 logistic regression on the brain voxels, penalty chosen on each fold's validation "
            "images; <code>linear/fold-K</code>). <code>difference</code> is deep − linear on the same test "
            "images, with its 95 % bootstrap interval over participants (each row rounded to what its interval "
            "supports); the verdict names a winner only where the interval excludes 0.</p>",
            table_html(rounded_to_intervals(table)) if len(table) else "<p>No fold could be compared (see Diagnostics).</p>"]


def rounded_to_intervals(comparison: pd.DataFrame) -> pd.DataFrame:
    """``comparison.tsv``'s numbers, each row to the decimals its difference's interval supports."""
    numbers = ["deep", "linear", "difference", "difference_ci_low", "difference_ci_high"]
    table = comparison.copy().astype({c: object for c in numbers if c in comparison})
    for i, row in comparison.iterrows():
        d = ci_decimals(row["difference_ci_low"], row["difference_ci_high"])
        for column in numbers:
            if column in comparison:
                table.at[i, column] = cell(row[column], d)
    return table


def build_report(results: Path, out: Path, qc_table: Path | None, config: dict, train: Path | None = None) -> Path:
    """Write the HTML report from the files of a finished study under ``results``; ``qc_table``:
    ``qc.tsv`` (``pipeline.intake.qc``, worst first), or None for a study from before it; ``train``:
    the training folder (``train/fold-K/``; default ``results/train``; config ``work_dir``/train)."""
    train = results / "train" if train is None else train
    # excluded.tsv: ingest's and preprocessing's exclusions (a study from before it: ingest's report).
    excluded = results / "excluded.tsv"
    exclusions = read_tsv(excluded if excluded.exists() else results / "ingest_report.tsv")
    balance = read_tsv(results / "split_balance.tsv")
    summary = json.loads((results / "evaluate" / "metrics.json").read_text())
    metrics = pd.read_csv(results / "evaluate" / "metrics.tsv", sep="\t", index_col="model")
    folds = summary["folds"]
    histories = {fold: read_tsv(train / fold / "history.tsv") for fold in folds}
    hyper = json.loads((train / folds[0] / "hyperparameters.json").read_text())
    target, task = summary["target"], summary["task"]
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = learning_curves(histories, out.parent / "learning_curves.png")
    explain = results / "explain"
    methods = config["explain"]["methods"]
    segmentation = task == "segmentation"
    headline = {"classification": "roc_auc", "segmentation": "dice_mean"}.get(task, "mae")
    low, high = summary["ensemble"][f"{headline}_ci"]
    d = ci_decimals(low, high)
    what = "segmentation of the label image" if segmentation else f"{html.escape(task)} of <code>{html.escape(target)}</code>"
    sections = [
        f"<h1>Study report: {what}, {len(folds)} fold(s)</h1>",
        f"<p>Test-set {headline} of the ensemble of folds: <b>{cell(summary['ensemble'][headline], d)}</b> "
        f"(95 % bootstrap interval {cell(low, d)}–{cell(high, d)}); per fold {cell(summary['fold_mean'][headline], d)} ± "
        f"{cell(summary['fold_sd'].get(headline, float('nan')), d)} (mean ± sd; rounded to what the interval "
        "supports).</p>",
        *diagnostics_html(results / "evaluate", balance),
        *targets_html(results / "targets.json"),
        "<h2>Cohort and split balance</h2>",
        "<p>Participants, images and the target's distribution in each split of each fold. "
        "The test participants are the same in every fold; no participant is in two splits.</p>",
        table_html(balance),
        f"<h2>Excluded ({len(exclusions)})</h2>",
        "<p>Samples and participants left out, at which stage and why (<code>excluded.tsv</code>).</p>",
        table_html(exclusions) if len(exclusions) else "<p>None.</p>",
        "<h2>Training</h2>", "<p>The settings of the training (<code>train/fold-K/hyperparameters.json</code>; "
        "config/README.md explains each key):</p>", settings_html(hyper),
        *variant_tables(train, folds),
        embed_png(curves, "Learning curves per fold: loss and metric per epoch over the fold's training images "
                          "(dotted, during the epoch) and validation images (solid)"),
        "<h2>Test-set performance</h2>",
        "<p>One row per fold's model, their mean and sd, and the ensemble ("
        + ("voxel-wise majority vote of the folds' label maps" if segmentation else "mean prediction of the folds")
        + ") with 95 % bootstrap intervals over participants." + unit_sentence(summary)
        + (" <code>corrected_*</code>: after the brain-age bias correction fitted on each fold's validation "
           "images." if task == "regression" else "")
        + (" Per label (0, the background, left out): Dice, and <code>hd95_*</code>, the 95th-percentile "
           "Hausdorff distance in mm on the template grid (mean over the images where the label is in both maps). "
           "Predicted label maps: <code>evaluate/fold-K/labels</code> (template and native grid) and "
           "<code>evaluate/labels</code> (the ensemble, template and native grid)." if segmentation else "") + "</p>",
        metrics_html(metrics, task),
        *[f"<p>Undefined (left empty): {html.escape(why)}.</p>" for why in summary["ensemble"].get("undefined", [])],
        embed_png(results / "evaluate" / "performance.png", performance_caption(summary)),
        *comparison_html(results / "evaluate", summary),
    ]
    if not segmentation:
        sections += explanation_sections(explain, methods, config["explain"]["atlas"], summary["ensemble"].get("n"))
        sections += retest.paragraph(results / retest.FILE, task, target)
    sections += [*qc_sections(qc_table, config["preprocess"]["qc_min"]), "<h2>Provenance</h2>", provenance(config)]
    style = STYLE
    atomic.write_text(out, f"<!doctype html><html><head><meta charset='utf-8'><title>Study report</title><style>{style}</style>"
                   "</head><body>" + "\n".join(sections) + "</body></html>")
    return out


# The page fits a 1366 px laptop screen: tables no wider than MAX_COLUMNS columns, long words and
# paths wrap, images shrink (tests/test_workflow.py measures it in headless Chromium when installed).
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:0 8px}img{max-width:100%}"
         "table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ccc;padding:2px 6px;"
         "overflow-wrap:break-word}th.section{text-align:left;background:#eef}pre{white-space:pre-wrap}"
         "details{margin:4px 0}summary{cursor:pointer}"
         ".warn{background:#fff4e0;border-left:4px solid #e69500;padding:6px 6px 6px 24px}")
QC_ROWS, QC_FIGURES = 20, 4  # the worst images shown in the QC table, and with their QC image


def qc_sections(qc_table: Path | None, qc_min: float | None, rows: int = QC_ROWS, figures: int = QC_FIGURES) -> list[str]:
    """The preprocessing quality control: the worst ``rows`` of ``qc_table`` (ranked worst first)
    with a note of the total, then the QC images of the worst ``figures`` that have one."""
    if qc_table is None or not Path(qc_table).exists():
        return ["<h2>Preprocessing quality control</h2>", "<p>No QC table (a study from before qc.tsv).</p>"]
    table = read_tsv(qc_table)
    scores = [c for c in table.columns if c.endswith("_with_template")]
    for column in scores:
        table[column] = pd.to_numeric(table[column], errors="coerce")
    excluded = int((table["excluded"] == "yes").sum())
    gate = (f"an image below <code>preprocess.qc_min</code> {qc_min:g} is excluded" if qc_min is not None
            else "<code>preprocess.qc_min</code> is null: no image is excluded for its scores")
    pngs = [Path(p) for p in table["qc_png"] if Path(p).exists() and Path(p).stat().st_size > 0][:figures]
    shown = table[["image_id", *scores, "excluded", *(["flagged_because"] if "flagged_because" in table else [])]].head(rows)
    return ["<h2>Preprocessing quality control (worst first)</h2>", *retest_paragraph(Path(qc_table).with_name("retest.tsv")),
            f"<p>Registration scores of every image against the template, lowest correlation first (no score: "
            f"preprocessing failed); {gate}. The worst {len(shown)} of {len(table)} images ({excluded} excluded); "
            "all in <code>qc.tsv</code>. The QC images of the worst follow: template brain outline red, the "
            "image's own brain mask cyan.</p>",
            table_html(shown), *[embed_png(p, f"QC image of {p.name}") for p in pngs]]


def retest_paragraph(path: Path) -> list[str]:
    """One sentence on test-retest reproducibility from ``retest.tsv`` (``pipeline.intake.qc.retest``,
    beside ``qc.tsv``): how many pairs of one participant's images, and their correlations."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    pairs = read_tsv(path)
    if pairs.empty:
        return ["<p>Test–retest: no participant has two images left in the study.</p>"]
    r = pd.to_numeric(pairs["correlation"], errors="coerce")
    return [f"<p>Test–retest reproducibility of preprocessing: {len(pairs)} pair(s) of images of one participant "
            f"({pairs['participant_id'].nunique()} participant(s)); correlation of their preprocessed images inside "
            f"the template brain median {r.median():.3f}, {r.min():.3f}–{r.max():.3f} (<code>retest.tsv</code>).</p>"]


def performance_caption(summary: dict) -> str:
    """The performance figure's caption: what a point counts, as in the metrics table."""
    ensemble = summary["ensemble"]
    if summary["task"] == "segmentation":
        return "Test-set performance of the ensemble, per label"
    if ensemble.get("unit") != "participant":
        return "Test-set performance of the ensemble, over test images"
    return (f"Test-set performance of the ensemble over {ensemble['n']} test participant row(s) (each participant's "
            "mean prediction over its images), the unit of the table above")


def unit_sentence(summary: dict) -> str:
    """What the metrics count: participants (a participant's mean prediction over its test images),
    and a binary target's positive class."""
    ensemble = summary["ensemble"]
    if ensemble.get("unit") != "participant":
        return ""
    images = ensemble.get("image_level", {}).get("n", ensemble["n"])
    sentence = (f" Metrics count participants, not images: each participant's mean prediction over its test "
                f"images ({ensemble['n']} participant row(s), {images} image(s); the same over images: "
                "<code>evaluate/metrics_images.tsv</code>).")
    if ensemble.get("positive_class"):
        sentence += (f" Positive class (ROC AUC, F1, precision-recall): <code>{html.escape(ensemble['positive_class'])}"
                     "</code> (config <code>positive_class</code>).")
    return sentence


def targets_html(path: Path) -> list[str]:
    """Where the targets came from, with row counts per table when more than one served."""
    if not path.exists():
        return []
    targets = json.loads(path.read_text())
    rows = targets.get("rows_from") or {}
    counted = "; ".join(f"{n} image(s) from {html.escape(where)}" for where, n in rows.items())
    return [f"<p>Target <code>{html.escape(str(targets.get('target')))}</code> from "
            f"{html.escape(str(targets.get('source')))}" + (f" ({counted})" if len(rows) > 1 else "") + ".</p>"]


def atlas_sentence(atlas: dict | None) -> str:
    """Which atlas the region table used (config ``explain.atlas``) and what its columns mean."""
    if not atlas:
        return "<p>Coarse atlas derived from the template's tissue maps and MNI coordinates (pipeline.results.atlas).</p>"
    return (f"<p>Atlas: <code>{html.escape(str(atlas['image']))}</code> with the labels of "
            f"<code>{html.escape(str(atlas['labels']))}</code> (config <code>explain.atlas</code>), resampled onto the "
            "study grid by nearest neighbour. <code>&lt;method&gt;_mass</code>: the region's share of the method's "
            "total |attribution| in the brain; a label with 0 voxels is not on the grid (smaller than a grid voxel). "
            "Full table: <code>explain/regions.tsv</code>.</p>")


def explanation_sections(explain: Path, methods: list[str], atlas: dict | None = None,
                         participants: int | None = None) -> list[str]:
    """The report's explanation maps, region table (of ``atlas``, config ``explain.atlas``) and ground-truth
    validation (image-level tasks); ``participants``: how many test participants the group maps average."""
    over = f"{participants} test participants" if participants else "the test participants"
    sections = [
        "<h2>Explanation maps (template space, mean over folds and test participants)</h2>",
        *[embed_png(Path(group_figure(str(explain), m, v)),
                    f"Group mean |{m}| ({v}): over {over}, each the mean of its images' maps averaged over the folds")
          for m in methods for v in ("slices", "glass")],
        embed_png(explain / "subjects_best_worst.png", f"{methods[0]} maps of the three best and three worst predicted "
                  "test images (one image each, the mean over the folds' maps)"),
        "<p>Each test image's maps (mean over the folds, template and native grid) and the predictions form the BIDS "
        "derivative dataset <code>derivatives/predictions</code>.</p>",
        "<h3>Regions ranked by mean |attribution| (relative to the brain mean)</h3>",
        atlas_sentence(atlas),
        table_html(read_tsv(explain / "regions.tsv").head(12)),
    ]
    if (explain / "validation.tsv").exists():
        validation = read_tsv(explain / "validation.tsv")
        checks = ["method", "random_model_top5_overlap", "random_model_spearman_signed", "random_model_spearman",
                  "random_verdict", "fold_consistency_r", "consistency_verdict"]
        truth = ["method", *[c for c in validation.columns if c.startswith(("enrichment_", "chance_"))]]
        sections += ["<h3>What each method's maps can tell</h3>",
                     table_html(validation[["method", "reading"]]) if "reading" in validation else "",
                     "<h3>Sanity checks and consistency</h3>",
                     "<p>Model-parameter randomisation (Adebayo et al. 2018): the maps of the first test image(s) of "
                     "each fold computed again after re-initialising the network's blocks from the output down "
                     "(<code>explain/randomisation.tsv</code>), compared with the trained model's maps: the share of "
                     "the top 5 % of |map| that stays in the top 5 % (chance 0.05), and the Spearman rank correlation "
                     "of the signed maps and of |map|. The verdict reads the top-5 % overlap after randomising the "
                     "whole model (passes below 0.5): the strongest voxels are what a reader looks at, while the "
                     "ranks of |map| keep the image's structure for methods that multiply by the input whatever the "
                     "weights (Adebayo et al.). Consistency: the Pearson correlation of the folds' group maps, pair "
                     "by pair (flagged below 0.5).</p>",
                     table_html(validation[[c for c in checks if c in validation]])]
        if len(truth) > 1:
            sections += ["<h3>Validation against the simulated ground truth</h3>",
                         "<p>Share of each method's top 5 % of |attribution| inside the true effect, relative to "
                         "chance (1 = no better than chance), for the group mean map and each subject's map on the "
                         "template grid, and each subject's map in its native space; <code>chance_*</code>: the "
                         "effect's share of the brain.</p>", table_html(validation[truth])]
    return sections


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--qc-table", type=Path, help="qc.tsv: every image's registration scores, worst first")
    parser.add_argument("--train-dir", type=Path, help="the folds' training folders' parent (default: RESULTS/train)")
    add_config(parser)  # the whole study config: explain.methods, and the provenance section
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"report: {build_report(args.results, args.out, args.qc_table, args.config, args.train_dir).resolve()}")


if __name__ == "__main__":
    main()
