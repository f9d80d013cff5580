"""What evaluation over folds shares between tasks: the summary table of the folds' test metrics
and the samples left out before the split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.common.tables import read_tsv


def summary_table(metrics: list[dict], names: list[str], overall: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The folds' numeric test metrics (``table``) and the summary: each fold, their mean and sd,
    and the ensemble's ``overall`` figures with ``<metric>_ci_low``/``_ci_high`` columns."""
    numeric = [k for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    table = pd.DataFrame([{k: m[k] for k in numeric} for m in metrics], index=names)
    ensemble_row = {k: v for k, v in overall.items() if k in table.columns}
    ensemble_row.update({f"{k}_low": v[0] for k, v in overall.items() if k.endswith("_ci")})
    ensemble_row.update({f"{k}_high": v[1] for k, v in overall.items() if k.endswith("_ci")})
    summary = pd.concat([table, table.mean().to_frame("mean").T, table.std().to_frame("sd").T,
                         pd.DataFrame([ensemble_row], index=["ensemble"])])
    summary.index.name = "model"
    return table, summary


def excluded_by_stage(excluded: Path) -> dict[str, list[str]]:
    """``excluded.tsv`` as {stage: [image id, or participant id without an image]}."""
    left_out = read_tsv(excluded).fillna("")
    return {stage: [r.image_id or r.participant_id for r in rows.itertuples()]
            for stage, rows in left_out.groupby("stage", sort=False)}
