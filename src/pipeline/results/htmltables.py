"""The report's tables as HTML that fits a laptop screen (1366 px): cells as a reader wants them
(integers as integers, values rounded to what their interval supports, ``n/a``), long names that
wrap, tables of at most ``MAX_COLUMNS`` columns, the metrics' chosen columns first and the rest in a
``<details>``, and settings as a two-column table grouped by section.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

MAX_COLUMNS = 8  # a wider table is split into tables of this many columns (its first column repeated)
SHOWN_METRICS = {"regression": ["n", "mae", "rmse", "r2", "pearson_r", "baseline_mae"],
                 "classification": ["n", "roc_auc", "balanced_accuracy", "accuracy", "f1"],
                 "segmentation": ["n", "dice_mean"]}  # the metrics table's first view; the rest in a <details>


def cell(value, decimals: int = 3) -> str:
    """One table cell: an integer-valued number as an integer (``10``, not ``10.000``), other numbers
    with ``decimals`` decimals, a missing value as ``n/a``."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "n/a"
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:.{decimals}f}"


def breakable(text: str) -> str:
    """``text`` escaped for HTML with, when longer than 20 characters, a line-break opportunity after
    each ``/`` and ``_``, so that a long path or identifier wraps inside its cell instead of widening
    the table."""
    escaped = html.escape(text)
    return escaped.replace("/", "/<wbr>").replace("_", "_<wbr>") if len(text) > 20 else escaped


def table_html(table: pd.DataFrame, index: bool = False, decimals: dict[str, int] | None = None,
               max_columns: int = MAX_COLUMNS) -> str:
    """``table`` as HTML that fits the page: cells as ``cell`` writes them (``decimals`` by column,
    3 by default), and a table of more than ``max_columns`` columns split into several, each
    repeating the first column, so that no table is wider than a laptop screen."""
    table = table.reset_index() if index else table
    text = pd.DataFrame({c: [breakable(cell(v, (decimals or {}).get(c, 3))) for v in table[c]] for c in table.columns},
                        columns=table.columns)
    text.columns = [breakable(str(c)) for c in text.columns]
    if len(text.columns) <= max_columns:
        return text.to_html(index=False, escape=False)
    key, rest = text.columns[0], list(text.columns[1:])
    return "\n".join(text[[key, *rest[i:i + max_columns - 1]]].to_html(index=False, escape=False)
                      for i in range(0, len(rest), max_columns - 1))


def ci_decimals(low: float, high: float) -> int:
    """Decimals a value with the 95 % interval [low, high] supports: the interval's first significant
    digit and one more (a width of 0.5 gives 2 decimals, of 3 gives 1, of 30 gives 0); 3 without one."""
    width = high - low
    if not (np.isfinite(width) and width > 0):
        return 3
    return int(min(4, max(0, 1 - np.floor(np.log10(width)))))


def metrics_html(metrics: pd.DataFrame, task: str = "regression") -> str:
    """The metrics table (models as rows): the task's chosen metrics, each rounded to what the
    ensemble's interval supports and the ensemble's value shown as ``value [low, high]``; every
    other column one click away in a ``<details>``, split to fit the page."""
    values = [c for c in metrics.columns if not c.endswith(("_ci_low", "_ci_high"))]
    decimals = {c: ci_decimals(metrics.at["ensemble", f"{c}_ci_low"], metrics.at["ensemble", f"{c}_ci_high"])
                for c in values if f"{c}_ci_low" in metrics and "ensemble" in metrics.index}
    shown = metrics[values].copy().astype(object)
    for column, d in decimals.items():
        low, high = metrics.at["ensemble", f"{column}_ci_low"], metrics.at["ensemble", f"{column}_ci_high"]
        shown.at["ensemble", column] = (f"{cell(metrics.at['ensemble', column], d)} [{cell(low, d)}, "
                                        f"{cell(high, d)}]")
    chosen = [c for c in SHOWN_METRICS.get(task, []) if c in shown] or values[:MAX_COLUMNS - 1]
    others = [c for c in values if c not in chosen]
    html_ = table_html(shown[chosen], index=True, decimals=decimals)
    if others:
        html_ += (f"<details><summary>The other {len(others)} columns of <code>evaluate/metrics.tsv</code> "
                  "(described in <code>metrics_dictionary.json</code>)</summary>"
                  + table_html(shown[others], index=True, decimals=decimals) + "</details>")
    return html_


def settings_html(settings: dict) -> str:
    """Settings as a two-column table (setting, value) grouped by section: a nested dict's keys
    under its name as a heading row, deeper levels as dotted names."""
    def flat(node: dict, prefix: str = ""):
        for key, value in node.items():
            if isinstance(value, dict) and value:
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield prefix + str(key), value

    def shown(value) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(shown(v) for v in value) or "(none)"
        if value is None or value == {}:
            return "null"
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)  # numbers as written in the file (0.001, not 0.001000)

    plain = [(k, v) for k, v in settings.items() if not (isinstance(v, dict) and v)]
    sections = [("", plain)] + [(k, list(flat(v))) for k, v in settings.items() if isinstance(v, dict) and v]
    rows = []
    for name, entries in sections:
        if name and entries:
            rows.append(f"<tr><th colspan='2' class='section'>{html.escape(name)}</th></tr>")
        rows += [f"<tr><td><code>{breakable(str(key))}</code></td><td>{breakable(shown(value))}</td></tr>"
                 for key, value in entries]
    return "<table class='settings'><tr><th>setting</th><th>value</th></tr>" + "".join(rows) + "</table>"
