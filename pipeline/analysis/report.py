"""The comparison as text: one row per run (final and best of the main metrics), the params that
differ between the runs, and an experiment's Markdown table."""

from __future__ import annotations

from typing import Any

from pipeline.analysis.runs import MAIN_METRICS, Comparison, RunView

# (row key, column title) of an experiment's table.md
COLUMNS = (
    ("run", "run"),
    ("model", "model"),
    ("params", "parameters"),
    ("batch", "global batch"),
    ("lr", "peak lr"),
    ("clipping", "AGC λ"),
    ("seed", "seed"),
    ("start", "start"),
    ("val_top1", "val top-1"),
    ("val_top1_ema", "val top-1 (EMA)"),
    ("train_loss", "train loss"),
    ("nonfinite", "NaN/Inf steps"),
    ("wall_s", "wall s"),
    ("load", "load avg"),
    ("status", "status"),
)


def table_rows(comparison: Comparison, views: list[RunView]) -> list[dict[str, Any]]:
    """Per run: label, id, kind, status and ``"<metric> final"``/``"<metric> best"``."""
    rows = []
    for view in views:
        row: dict[str, Any] = {
            "run": view.label,
            "id": view.run_id,
            "kind": view.kind,
            "status": view.run.info.status,
        }
        for key in MAIN_METRICS:
            row[f"{key} final"] = comparison.final(view, key)
            row[f"{key} best"] = comparison.best(view, key)
        rows.append(row)
    return rows


def differing_params(views: list[RunView]) -> dict[str, dict[str, str]]:
    """``{param: {run label: value}}`` for the params whose value is not the same in every run."""
    keys = sorted({key for view in views for key in view.run.data.params})
    differing = {}
    for key in keys:
        values = {view.label: view.run.data.params.get(key, "-") for view in views}
        if len(set(values.values())) > 1:
            differing[key] = values
    return differing


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _columns(header: list[str], lines: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *lines]
    ]


def format_report(rows: list[dict[str, Any]], differing: dict[str, dict[str, str]]) -> str:
    """The runs table, then the params that differ between the runs."""
    header = ["run", "kind", "status"] + [f"{key} (final/best)" for key in MAIN_METRICS]
    lines = [
        [row["run"], row["kind"], row["status"]]
        + [f"{_number(row[f'{k} final'])}/{_number(row[f'{k} best'])}" for k in MAIN_METRICS]
        for row in rows
    ]
    text = _columns(header, lines)
    if differing:
        labels = [row["run"] for row in rows]
        params = [
            [key, *(values.get(label, "-") for label in labels)]
            for key, values in differing.items()
        ]
        text += ["", "params that differ:", *_columns(["param", *labels], params)]
    return "\n".join(text)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Experiment rows as a Markdown table (values as in MLflow, metrics rounded to 5 decimals)."""
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[key]) for key, _ in COLUMNS) + " |")
    ends = [row["end_ms"] for row in rows if row["end_ms"]]
    if ends:
        total = (max(ends) - min(row["start_ms"] for row in rows)) / 60000
        lines.append(f"\nExperiment wall time (first run start to last run end): {total:.1f} min")
    return "\n".join(lines) + "\n"
