"""Figures and the table of an experiment run by ``pipeline.experiments`` (read from MLflow only).

``python -m pipeline.compare --experiment NAME`` calls :func:`draw_experiment` when the MLflow
experiment carries the ``pipeline.figure`` tag the runner sets. One row per experiment run (the
newest finished MLflow run tagged with that run's name), then one figure by kind:

- ``batch``: final validation top-1 (and final training loss) against the global batch, with
  and without AGC (``agc_batch.png``);
- ``lambda``: final validation top-1 against AGC λ, the no-AGC run as a line (``agc_lambda.png``);
- ``curves``: training loss and validation top-1 against images seen, per run (``curves.png``);
- ``transfer``: downstream top-1 finetuned from each pretraining checkpoint against scratch,
  next to the pretraining's own validation top-1 at those steps (``transfer.png``).

``table.md`` holds the rows with the numbers as MLflow stores them, rounded to 5 decimals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.compare import Comparison, RunView, _new_figure, save_figure
from pipeline.experiments import (
    TAG_EXPERIMENT_RUN,
    TAG_FIGURE,
    TAG_LOAD_END,
    TAG_LOAD_START,
    TAG_MODEL_PARAMS,
)
from pipeline.tracking import TAG_PRETRAIN_STEP

COLUMNS = (
    ("run", "run"),
    ("model", "model"),
    ("params", "parameters"),
    ("batch", "global batch"),
    ("lr", "peak lr"),
    ("clipping", "AGC λ"),
    ("start", "start"),
    ("val_top1", "val top-1"),
    ("val_top1_ema", "val top-1 (EMA)"),
    ("train_loss", "train loss"),
    ("wall_s", "wall s"),
    ("load", "load avg"),
    ("status", "status"),
)


def figure_kind(comparison: Comparison, experiment: str) -> str | None:
    """The experiment's ``pipeline.figure`` tag (None for experiments not run by the runner)."""
    found = comparison.client.get_experiment_by_name(experiment)
    return found.tags.get(TAG_FIGURE) if found is not None else None


def _value(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def experiment_rows(comparison: Comparison, views: list[RunView]) -> list[dict[str, Any]]:
    """One row per experiment run, in the order the runs started."""
    newest: dict[str, RunView] = {}
    ordered = sorted(views, key=lambda v: (v.run.info.status == "FINISHED", v.run.info.start_time))
    for view in ordered:  # FINISHED last, newest last: the run that counts wins
        if view.tag(TAG_EXPERIMENT_RUN):
            newest[view.tag(TAG_EXPERIMENT_RUN)] = view
    rows = []
    for name, view in sorted(newest.items(), key=lambda item: item[1].run.info.start_time):
        params, info = view.run.data.params, view.run.info
        clipping = params.get("plan.clipping", "None")
        start = {"pretrain": "-", "scratch": "scratch"}.get(view.kind)
        wall = (info.end_time - info.start_time) / 1000 if info.end_time else None
        rows.append(
            {
                "run": name,
                "run_id": view.run_id,
                "kind": view.kind,
                "model": params.get("model.name"),
                "params": int(view.tag(TAG_MODEL_PARAMS) or 0),
                "batch": int(params.get("train.global_batch", 0)),
                "lr": float(params.get("plan.peak_lr", "nan")),
                "clipping": None if clipping == "None" else float(clipping),
                "start": start or f"step {view.tag(TAG_PRETRAIN_STEP)}",
                "pretrain_step": view.tag(TAG_PRETRAIN_STEP),
                "val_top1": _value(comparison.final(view, "val/top1")),
                "val_top1_ema": _value(comparison.final(view, "val/top1_ema")),
                "train_loss": _value(comparison.final(view, "train/loss")),
                "wall_s": None if wall is None else round(wall),
                "load": _load(view),
                "status": info.status,
                "start_ms": info.start_time,
                "end_ms": info.end_time,
                "view": view,
            }
        )
    return rows


def _load(view: RunView) -> str | None:
    """The machine's load average at the run's start and end (tags of pipeline.experiments)."""
    start, end = view.tag(TAG_LOAD_START), view.tag(TAG_LOAD_END)
    return f"{start}→{end}" if start and end else start


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and value >= 10000:
        return f"{value:,}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (values as in MLflow, metrics rounded to 5 decimals)."""
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


def _two_panels(left: tuple[str, str, str], right: tuple[str, str, str]) -> tuple[Any, Any, Any]:
    """A figure with two side-by-side axes, each given (title, x label, y label)."""
    from matplotlib.figure import Figure  # Agg, no pyplot state (as pipeline.compare)

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    for each, (title, xlabel, ylabel) in zip(axes, (left, right), strict=True):
        each.set(title=title, xlabel=xlabel, ylabel=ylabel)
        each.grid(alpha=0.3)
    return figure, axes[0], axes[1]


def _plot_batch(rows: list[dict[str, Any]], path: Path) -> dict[str, int]:
    figure, axes, loss_axes = _two_panels(
        ("AGC against batch size (same epochs)", "global batch", "final val top-1"),
        ("final training loss", "global batch", "train loss"),
    )
    series = {}
    for label, with_agc in (("with AGC", True), ("without AGC", False)):
        points = sorted(
            (r["batch"], r["val_top1"], r["train_loss"])
            for r in rows
            if (r["clipping"] is not None) == with_agc and r["val_top1"] is not None
        )
        if points:
            batches = [p[0] for p in points]
            axes.plot(batches, [p[1] for p in points], "o-", label=label)
            loss_axes.plot(batches, [p[2] for p in points], "o-", label=label)
            series[label] = len(points)
    batches = sorted({r["batch"] for r in rows})
    for each in (axes, loss_axes):
        each.set_xscale("log", base=2)
        each.set_xticks(batches, [str(batch) for batch in batches])
        each.legend(fontsize="small")
    save_figure(figure, path)
    return series


def _plot_lambda(rows: list[dict[str, Any]], path: Path) -> dict[str, int]:
    batches = sorted({r["batch"] for r in rows})
    title = f"AGC λ at global batch {', '.join(map(str, batches))}"
    figure, axes = _new_figure(title, "AGC clipping threshold λ", "final val top-1")
    points = sorted((r["clipping"], r["val_top1"]) for r in rows if r["clipping"] is not None)
    series = {}
    if points:
        axes.plot([p[0] for p in points], [p[1] for p in points], "o-", label="with AGC")
        axes.set_xscale("log")
        series["with AGC"] = len(points)
    for row in rows:
        if row["clipping"] is None and row["val_top1"] is not None:
            axes.axhline(row["val_top1"], linestyle=":", color="gray", label=f"{row['run']}")
            series[row["run"]] = 1
    axes.legend(fontsize="small")
    save_figure(figure, path)
    return series


def _plot_curves(comparison: Comparison, rows: list[dict[str, Any]], path: Path) -> dict:
    figure, loss_axes, top1_axes = _two_panels(
        ("training loss", "images seen", "train loss"),
        ("validation top-1", "images seen", "val top-1"),
    )
    series = {}
    for row in rows:
        label = f"{row['run']} ({row['model']}, {row['params']:,} params)"
        for axes, key, style in ((loss_axes, "train/loss", "-"), (top1_axes, "val/top1", "o-")):
            history = comparison.history(row["view"], key)
            if history:
                seen = [m.step * row["batch"] for m in history]
                axes.plot(seen, [m.value for m in history], style, label=label)
                series[f"{row['run']} {key}"] = len(history)
    for axes in (loss_axes, top1_axes):
        axes.legend(fontsize="small")
    save_figure(figure, path)
    return series


def _plot_transfer(comparison: Comparison, rows: list[dict[str, Any]], path: Path) -> dict:
    figure, axes, pretrain_axes = _two_panels(
        ("finetuned from each checkpoint vs. scratch", "pretraining step", "downstream val top-1"),
        ("pretraining", "step", "pretraining val top-1"),
    )
    series = {}
    finetuned = sorted(
        (int(r["pretrain_step"]), r["val_top1"]) for r in rows if r["kind"] == "finetune"
    )
    if finetuned:
        axes.plot([p[0] for p in finetuned], [p[1] for p in finetuned], "o-", label="finetuned")
        series["finetuned"] = len(finetuned)
    for row in rows:
        if row["kind"] == "scratch" and row["val_top1"] is not None:
            axes.axhline(row["val_top1"], linestyle=":", color="gray", label="scratch")
            series["scratch"] = 1
        if row["kind"] == "pretrain":
            history = comparison.history(row["view"], "val/top1")
            pretrain_axes.plot([m.step for m in history], [m.value for m in history], "o-")
            series[f"{row['run']} val/top1"] = len(history)
    axes.legend(fontsize="small")
    save_figure(figure, path)
    return series


def draw_experiment(
    comparison: Comparison, kind: str, views: list[RunView], out_dir: Path
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """The experiment's rows, ``table.md`` and its figure; returns rows and {file: series}."""
    rows = experiment_rows(comparison, views)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(markdown_table(rows))
    drawers = {
        "batch": ("agc_batch.png", lambda path: _plot_batch(rows, path)),
        "lambda": ("agc_lambda.png", lambda path: _plot_lambda(rows, path)),
        "curves": ("curves.png", lambda path: _plot_curves(comparison, rows, path)),
        "transfer": ("transfer.png", lambda path: _plot_transfer(comparison, rows, path)),
    }
    filename, draw = drawers[kind]
    return rows, {filename: draw(out_dir / filename)}
