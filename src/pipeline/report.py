"""One self-contained HTML report of the study: cohort, exclusions, splits, training, metrics, maps."""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import pandas as pd

from pipeline import __version__
from pipeline.data import read_tsv


def embed_png(path: Path, alt: str) -> str:
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
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def table_html(table: pd.DataFrame, index: bool = False) -> str:
    return table.to_html(index=index, float_format=lambda v: f"{v:.3f}", na_rep="")


def build_report(results: Path, out: Path, qc_pngs: list[Path]) -> Path:
    """Write the HTML report from the files of a finished study under ``results``."""
    exclusions = read_tsv(results / "ingest_report.tsv")
    balance = read_tsv(results / "split_balance.tsv")
    summary = json.loads((results / "evaluate" / "metrics.json").read_text())
    metrics = pd.read_csv(results / "evaluate" / "metrics.tsv", sep="\t", index_col="model")
    folds = summary["folds"]
    histories = {fold: read_tsv(results / "train" / fold / "history.tsv") for fold in folds}
    hyper = json.loads((results / "train" / folds[0] / "hyperparameters.json").read_text())
    target, task = summary["target"], summary["task"]
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = learning_curves(histories, out.parent / "learning_curves.png")
    explain = results / "explain"
    headline = "roc_auc" if task == "classification" else "mae"
    sections = [
        f"<h1>Study report: {html.escape(task)} of <code>{html.escape(target)}</code>, {len(folds)} fold(s)</h1>",
        f"<p>Test-set {headline} of the ensemble of folds: <b>{summary['ensemble'][headline]:.3f}</b>; "
        f"per fold {summary['fold_mean'][headline]:.3f} ± {summary['fold_sd'].get(headline, float('nan')):.3f} "
        "(mean ± sd).</p>",
        "<h2>Cohort and split balance</h2>",
        "<p>Participants, images and the target's distribution in each split of each fold. "
        "The test participants are the same in every fold; no participant is in two splits.</p>",
        table_html(balance),
        f"<h2>Excluded at ingestion ({len(exclusions)})</h2>",
        table_html(exclusions) if len(exclusions) else "<p>None.</p>",
        "<h2>Training</h2>", f"<pre>{html.escape(json.dumps(hyper, indent=2))}</pre>",
        embed_png(curves, "Learning curves per fold"),
        "<h2>Test-set performance</h2>",
        "<p>One row per fold's model, their mean and sd, and the ensemble (mean prediction of the folds).</p>",
        table_html(metrics, index=True),
        embed_png(results / "evaluate" / "performance.png", "Test-set performance of the ensemble"),
        "<h2>Explanation maps (template space, mean over folds)</h2>",
        *[embed_png(explain / f"group_desc-{m}_{v}.png", f"Group mean |{m}| attribution ({v})")
          for m in ("occlusion", "gradient") for v in ("slices", "glass")],
        "<h2>Preprocessing quality control (first images)</h2>",
        *[embed_png(p, p.name) for p in qc_pngs],
        "<h2>Provenance</h2>", f"<p>pipeline {html.escape(__version__)}</p>",
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:auto}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Study report</title><style>{style}</style>"
                   "</head><body>" + "\n".join(sections) + "</body></html>")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--qc", type=Path, nargs="*", default=[])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    print(f"report: {build_report(args.results, args.out, args.qc).resolve()}")


if __name__ == "__main__":
    main()
