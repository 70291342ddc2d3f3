"""Figures and the table of an experiment run by ``pipeline.experiments`` (read from MLflow only).

``python -m pipeline.compare --experiment NAME`` draws them when the MLflow experiment carries the
``pipeline.figure`` tag the runner sets. One row per experiment run (the newest finished MLflow
run tagged with that run's name), then one figure by kind:

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

from pipeline import tracking
from pipeline.analysis.figures import new_figure, save_with_legends, two_panels
from pipeline.analysis.report import markdown_table
from pipeline.analysis.runs import Comparison, RunView, counting_last

Rows = list[dict[str, Any]]
Drawn = tuple[Any, dict[str, int]]  # a figure and {series: points drawn}


def figure_kind(comparison: Comparison, experiment: str) -> str | None:
    """The experiment's ``pipeline.figure`` tag (None for experiments not run by the runner)."""
    found = comparison.client.get_experiment_by_name(experiment)
    return found.tags.get(tracking.TAG_FIGURE) if found is not None else None


def _value(value: float | None) -> float | None:
    return None if value is None else round(value, 5)


def _load(view: RunView) -> str | None:
    """The machine's load average at the run's start and end."""
    start, end = view.tag(tracking.TAG_LOAD_START), view.tag(tracking.TAG_LOAD_END)
    return f"{start}→{end}" if start and end else start


def _row(comparison: Comparison, name: str, view: RunView) -> dict[str, Any]:
    params, info = view.run.data.params, view.run.info
    clipping = params.get("plan.clipping", "None")
    start = {"pretrain": "-", tracking.SCRATCH: tracking.SCRATCH}.get(view.kind)
    wall = (info.end_time - info.start_time) / 1000 if info.end_time else None
    return {
        "run": name,
        "run_id": view.run_id,
        "kind": view.kind,
        "model": params.get("model.name"),
        "params": int(view.tag(tracking.TAG_MODEL_PARAMS) or 0),
        "batch": int(params.get("train.global_batch", 0)),
        "lr": float(params.get("plan.peak_lr", "nan")),
        "clipping": None if clipping == "None" else float(clipping),
        "start": start or f"step {view.tag(tracking.TAG_PRETRAIN_STEP)}",
        "pretrain_step": view.tag(tracking.TAG_PRETRAIN_STEP),
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


def experiment_rows(comparison: Comparison, views: list[RunView]) -> Rows:
    """One row per experiment run, in the order the runs started."""
    newest: dict[str, RunView] = {}
    for view in counting_last(views):  # later views overwrite: the run that counts wins
        if view.tag(tracking.TAG_EXPERIMENT_RUN):
            newest[view.tag(tracking.TAG_EXPERIMENT_RUN)] = view
    ordered = sorted(newest.items(), key=lambda item: item[1].run.info.start_time)
    return [_row(comparison, name, view) for name, view in ordered]


def _plot_batch(rows: Rows) -> Drawn:
    figure, axes, loss_axes = two_panels(
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
    return figure, series


def _plot_lambda(rows: Rows) -> Drawn:
    batches = sorted({r["batch"] for r in rows})
    title = f"AGC λ at global batch {', '.join(map(str, batches))}"
    figure, axes = new_figure(title, "AGC clipping threshold λ", "final val top-1")
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
    return figure, series


def _plot_curves(comparison: Comparison, rows: Rows) -> Drawn:
    figure, loss_axes, top1_axes = two_panels(
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
    return figure, series


def _plot_transfer(comparison: Comparison, rows: Rows) -> Drawn:
    finetuned = sorted(
        (int(r["pretrain_step"]), r["val_top1"]) for r in rows if r["kind"] == "finetune"
    )
    figure, axes, pretrain_axes = two_panels(
        ("finetuned from each checkpoint vs. scratch", "pretraining step", "downstream val top-1"),
        ("pretraining", "step", "pretraining val top-1"),
    )
    series = {}
    if finetuned:
        axes.plot([p[0] for p in finetuned], [p[1] for p in finetuned], "o-", label="finetuned")
        series["finetuned"] = len(finetuned)
    for row in rows:
        if row["kind"] == tracking.SCRATCH and row["val_top1"] is not None:
            axes.axhline(row["val_top1"], linestyle=":", color="gray", label="scratch")
            series["scratch"] = 1
        if row["kind"] == "pretrain":
            history = comparison.history(row["view"], "val/top1")
            pretrain_axes.plot([m.step for m in history], [m.value for m in history], "o-")
            series[f"{row['run']} val/top1"] = len(history)
    return figure, series


def draw_experiment(
    comparison: Comparison, kind: str, views: list[RunView], out_dir: Path
) -> tuple[Rows, dict[str, dict[str, int]]]:
    """The experiment's rows, ``table.md`` and its figure; returns rows and {file: series}."""
    rows = experiment_rows(comparison, views)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table.md").write_text(markdown_table(rows))
    drawers = {
        "batch": ("agc_batch.png", lambda: _plot_batch(rows)),
        "lambda": ("agc_lambda.png", lambda: _plot_lambda(rows)),
        "curves": ("curves.png", lambda: _plot_curves(comparison, rows)),
        "transfer": ("transfer.png", lambda: _plot_transfer(comparison, rows)),
    }
    filename, draw = drawers[kind]
    figure, series = draw()
    save_with_legends(figure, out_dir / filename)
    return rows, {filename: series}
