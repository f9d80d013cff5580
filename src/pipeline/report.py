"""One self-contained HTML report of the study: cohort, exclusions, splits, training, metrics, maps."""

from __future__ import annotations

import argparse
import base64
import html
import json
from pathlib import Path

import pandas as pd

from pipeline.data import read_tsv


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def learning_curves(history: pd.DataFrame, png: Path) -> Path:
    """Train and validation loss (and metric) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = [c for c in history.columns if c.startswith("val_") and c != "val_loss"][0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key in zip(axes, ["loss", metric.removeprefix("val_")]):
        ax.plot(history["epoch"], history[f"train_{key}"], label="train")
        ax.plot(history["epoch"], history[f"val_{key}"], label="validation")
        ax.set(xlabel="epoch", ylabel=key)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def cohort_table(manifest: pd.DataFrame, splits: pd.DataFrame, target: str, task: str) -> pd.DataFrame:
    """Per split: participants, images, and the target's distribution."""
    table = manifest.merge(splits[["image_id", "split"]], on="image_id")
    rows = []
    for name in ["train", "val", "test"]:
        part = table[table["split"] == name]
        row = {"split": name, "participants": part["participant_id"].nunique(), "images": len(part)}
        if task == "classification":
            row.update(part[target].astype(str).value_counts().sort_index().to_dict())
        else:
            values = part[target].astype(float)
            row.update({f"{target} mean": round(values.mean(), 1), f"{target} sd": round(values.std(), 1),
                        f"{target} range": f"{values.min():.1f}–{values.max():.1f}"})
        rows.append(row)
    return pd.DataFrame(rows)


def build_report(results: Path, out: Path, qc_pngs: list[Path]) -> Path:
    """Write the HTML report from the files of a finished study under ``results``."""
    manifest, splits = read_tsv(results / "manifest.tsv"), read_tsv(results / "splits.tsv")
    exclusions = read_tsv(results / "ingest_report.tsv")
    metrics = json.loads((results / "evaluate" / "metrics.json").read_text())
    history = read_tsv(results / "train" / "history.tsv")
    hyper = json.loads((results / "train" / "hyperparameters.json").read_text())
    target, task = metrics["target"], metrics["task"]
    out.parent.mkdir(parents=True, exist_ok=True)
    curves = learning_curves(history, out.parent / "learning_curves.png")
    shown = {k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in metrics.items()}
    explain = results / "explain"
    sections = [
        f"<h1>Study report: {html.escape(task)} of <code>{html.escape(target)}</code></h1>",
        "<h2>Cohort and splits</h2>", cohort_table(manifest, splits, target, task).to_html(index=False),
        f"<h2>Excluded at ingestion ({len(exclusions)})</h2>",
        exclusions.to_html(index=False) if len(exclusions) else "<p>None.</p>",
        "<h2>Training</h2>", f"<pre>{html.escape(json.dumps(hyper, indent=2))}</pre>",
        embed_png(curves, "Learning curves: loss and metric per epoch"),
        "<h2>Test-set performance</h2>", pd.DataFrame([shown]).T.to_html(header=False),
        embed_png(results / "evaluate" / "performance.png", "Test-set performance"),
        "<h2>Explanation maps (template space)</h2>",
        *[embed_png(explain / f"group_desc-{m}_{v}.png", f"Group mean |{m}| attribution ({v})")
          for m in ("occlusion", "gradient") for v in ("slices", "glass")],
        "<h2>Preprocessing quality control (first images)</h2>",
        *[embed_png(p, p.name) for p in qc_pngs],
    ]
    style = "body{font-family:sans-serif;max-width:1000px;margin:auto}img{max-width:100%}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>Study report</title><style>{style}</style></head><body>"
                   + "\n".join(sections) + "</body></html>")
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
