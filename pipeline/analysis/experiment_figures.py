"""Figures and the table of an experiment run by ``pipeline.experiments`` (read from MLflow only).

``python -m pipeline.compare --experiment NAME`` draws them when the MLflow experiment carries the
``pipeline.figure`` tag the runner sets. One row per experiment run (the newest finished MLflow
run tagged with that run's name), then one figure by kind:

- ``batch``: final validation top-1 (and final training loss) against the global batch for the
  NFNet with AGC, without AGC and the batch-normalised ResNet (``agc_batch.png``), and at the
  largest batch the NFNet's training loss and gradient norm per step with and without AGC
  (``agc_batch_curves.png``);
- ``lambda``: final validation top-1 against AGC λ, the no-AGC runs as a band
  (``agc_lambda.png``);
- ``curves``: training loss and validation top-1 against images seen, per run (``curves.png``);
- ``transfer``: downstream top-1 finetuned from each pretraining checkpoint against scratch,
  next to the pretraining's own validation top-1 at those steps (``transfer.png``).

Runs repeated with other seeds (``train.seed``) are drawn as the mean with a bar from the lowest
to the highest value and each seed as a dot. ``table.md`` holds the rows with the numbers as
MLflow stores them, rounded to 5 decimals.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.analysis.figures import new_figure, save_with_legends, two_panels
from pipeline.analysis.report import markdown_table
from pipeline.analysis.runs import Comparison, RunView, counting_last
from pipeline.models import get_variant

Rows = list[dict[str, Any]]
Drawn = tuple[Any, dict[str, int]]  # a figure and {series: points drawn}


def figure_kind(comparison: Comparison, experiment: str) -> str | None:
    """The experiment's ``pipeline.figure`` tag (None for experiments not run by the runner)."""
    found = comparison.client.get_experiment_by_name(experiment)
    return found.tags.get(tracking.TAG_FIGURE) if found is not None else None


def _family(model: str | None) -> str:
    """ "resnet_bn" for the batch-normalised baselines, else "nfnet" (unknown names too)."""
    try:
        return get_variant(model or "").family
    except ValueError:
        return "nfnet"


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
        "seed": int(params.get("train.seed", 0)),
        "family": _family(params.get("model.name")),
        "start": start or f"step {view.tag(tracking.TAG_PRETRAIN_STEP)}",
        "pretrain_step": view.tag(tracking.TAG_PRETRAIN_STEP),
        "val_top1": _value(comparison.final(view, "val/top1")),
        "val_top1_ema": _value(comparison.final(view, "val/top1_ema")),
        "train_loss": _value(comparison.final(view, "train/loss")),
        "nonfinite": _value(comparison.final(view, "train/nonfinite_steps")),
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


def _series(row: dict[str, Any]) -> str:
    if row["family"] == "resnet_bn":
        return "BN ResNet"
    return "NFNet, AGC" if row["clipping"] is not None else "NFNet, no AGC"


def _draw_spread(axes: Any, label: str, points: dict[float, list[float]]) -> int:
    """Mean against x, a bar from the lowest to the highest seed, each seed as a dot."""
    xs = sorted(points)
    means = [statistics.fmean(points[x]) for x in xs]
    below = [mean - min(points[x]) for x, mean in zip(xs, means, strict=True)]
    above = [max(points[x]) - mean for x, mean in zip(xs, means, strict=True)]
    seeds = max(len(values) for values in points.values())
    if seeds > 1:
        label = f"{label} (mean, min-max of up to {seeds} seeds)"
    drawn = axes.errorbar(xs, means, yerr=[below, above], fmt="o-", capsize=3, label=label)
    colour = drawn.lines[0].get_color()
    for x in xs:
        if len(points[x]) > 1:
            axes.plot([x] * len(points[x]), points[x], ".", color=colour, alpha=0.5)
    return sum(len(values) for values in points.values())


def _grouped(rows: Rows, x: str, y: str) -> dict[str, dict[float, list[float]]]:
    """{series: {x: [y of each seed]}} over the rows that have ``y``."""
    groups: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row[y] is not None and row[x] is not None:
            groups[_series(row)][row[x]].append(row[y])
    return groups


def _plot_batch(rows: Rows) -> Drawn:
    figure, axes, loss_axes = two_panels(
        ("final validation top-1 against batch size (same epochs)", "global batch", "val top-1"),
        ("final training loss", "global batch", "train loss"),
    )
    series = {}
    for each, metric in ((axes, "val_top1"), (loss_axes, "train_loss")):
        for name, points in sorted(_grouped(rows, "batch", metric).items()):
            drawn = _draw_spread(each, name, points)
            if metric == "val_top1":
                series[name] = drawn
    batches = sorted({r["batch"] for r in rows})
    for each in (axes, loss_axes):
        each.set_xscale("log", base=2)
        each.set_xticks(batches, [str(batch) for batch in batches])
    return figure, series


def _plot_largest_batch(comparison: Comparison, rows: Rows) -> Drawn:
    """Training loss and gradient norm per step of the NFNet runs at the largest batch."""
    largest = max((r["batch"] for r in rows), default=0)
    figure, loss_axes, norm_axes = two_panels(
        (f"training loss at batch {largest}", "step", "train loss"),
        (f"gradient norm at batch {largest} (before clipping)", "step", "grad norm"),
    )
    series, colours = {}, {"NFNet, AGC": "tab:blue", "NFNet, no AGC": "tab:red"}
    for row in rows:
        name = _series(row)
        if row["batch"] != largest or name not in colours:
            continue
        label = f"{name}, seed {row['seed']}, {row['nonfinite'] or 0:g} NaN/Inf steps"
        for each, key in ((loss_axes, "train/loss"), (norm_axes, "train/grad_norm")):
            history = comparison.history(row["view"], key)
            if history:
                steps, values = [m.step for m in history], [m.value for m in history]
                each.plot(steps, values, "-", color=colours[name], alpha=0.8, label=label)
                series[f"{row['run']} {key}"] = len(history)
    for each in (loss_axes, norm_axes):
        each.set_yscale("log")  # a diverging run grows by orders of magnitude
    return figure, series


def _plot_lambda(rows: Rows) -> Drawn:
    batches = sorted({r["batch"] for r in rows})
    title = f"AGC λ at global batch {', '.join(map(str, batches))}"
    figure, axes = new_figure(title, "AGC clipping threshold λ", "final val top-1")
    groups = _grouped(rows, "clipping", "val_top1")
    series = {}
    if "NFNet, AGC" in groups:
        series["with AGC"] = _draw_spread(axes, "with AGC", groups["NFNet, AGC"])
        axes.set_xscale("log")
    unclipped = [r["val_top1"] for r in rows if r["clipping"] is None and r["val_top1"] is not None]
    if unclipped:
        mean = statistics.fmean(unclipped)
        label = f"without AGC (mean of {len(unclipped)}, band min-max)"
        axes.axhline(mean, linestyle=":", color="gray", label=label)
        axes.axhspan(min(unclipped), max(unclipped), color="gray", alpha=0.15)
        series["without AGC"] = len(unclipped)
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
        "batch": {
            "agc_batch.png": lambda: _plot_batch(rows),
            "agc_batch_curves.png": lambda: _plot_largest_batch(comparison, rows),
        },
        "lambda": {"agc_lambda.png": lambda: _plot_lambda(rows)},
        "curves": {"curves.png": lambda: _plot_curves(comparison, rows)},
        "transfer": {"transfer.png": lambda: _plot_transfer(comparison, rows)},
    }
    drawn = {}
    for filename, draw in drawers[kind].items():
        figure, drawn[filename] = draw()
        save_with_legends(figure, out_dir / filename)
    return rows, drawn
