"""The comparison's PNG plots, drawn on matplotlib ``Figure`` objects (Agg: no display, no pyplot
state):

- ``loss.png`` and ``top1.png``: ``train/loss`` and ``val/top1`` (+ EMA) against step, per run;
- ``downstream.png``: finetuned ``val/top1`` against the pretraining step it started from, one line
  per task, with the task's scratch baseline as a horizontal line;
- ``finetune_vs_scratch.png``: per task, the finetune from the latest checkpoint against scratch.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from pipeline.analysis.runs import DOWNSTREAM_METRIC, Comparison, RunView, group_downstream
from pipeline.data.storage import atomic_write_bytes
from pipeline.tracking import TAG_PRETRAIN_RUN, TAG_PRETRAIN_STEP

Labels = tuple[str, str, str]  # (title, x label, y label) of one axes


def _label(axes: Any, labels: Labels) -> None:
    title, xlabel, ylabel = labels
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)


def new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    """A figure with one labelled, gridded axes."""
    from matplotlib.figure import Figure  # matplotlib takes ~0.5 s to import

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    _label(axes, (title, xlabel, ylabel))
    return figure, axes


def two_panels(left: Labels, right: Labels) -> tuple[Any, Any, Any]:
    """A figure with two side-by-side axes, each given (title, x label, y label)."""
    from matplotlib.figure import Figure  # matplotlib takes ~0.5 s to import

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    axes = figure.subplots(1, 2)
    for each, labels in zip(axes, (left, right), strict=True):
        _label(each, labels)
    return figure, axes[0], axes[1]


def save_figure(figure: Any, path: Path) -> None:
    """Write a PNG atomically: a half-written plot never appears under its final name."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(str(path), buffer.getvalue())


def save_with_legends(figure: Any, path: Path) -> None:
    """A small legend on every axes that has labelled lines or bars, then ``save_figure``."""
    for axes in figure.axes:
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    save_figure(figure, path)


def plot_metric_curves(
    comparison: Comparison, views: list[RunView], keys: tuple[str, ...], path: Path, title: str
) -> dict[str, int]:
    """One line per (run, metric) against step; returns series -> points (empty: nothing drawn)."""
    figure, axes = new_figure(title, "step", " / ".join(keys))
    series = {}
    for view in views:
        for key in keys:
            history = comparison.history(view, key)
            if history:
                name = f"{view.label} {key}"
                style = "--" if key.endswith("_ema") else "-"
                axes.plot([m.step for m in history], [m.value for m in history], style, label=name)
                series[name] = len(history)
    if series:
        save_with_legends(figure, path)
    return series


def plot_downstream(
    finetuned: dict[tuple[str, str], dict[int, float]],
    scratch: dict[str, float],
    labels: dict[str, str],
    path: Path,
) -> dict[str, int]:
    """Finetuned top-1 against pretraining step per (pretraining run, task), scratch as lines."""
    figure, axes = new_figure(
        f"downstream {DOWNSTREAM_METRIC} against pretraining step",
        "pretraining step of the checkpoint",
        f"finetuned {DOWNSTREAM_METRIC}",
    )
    series = {}
    several = len({pretrain for pretrain, _ in finetuned}) > 1
    colors = {}
    for (pretrain, task), points in sorted(finetuned.items()):
        name = f"{task} <- {labels.get(pretrain, pretrain[:8])}" if several else task
        steps = sorted(points)
        (line,) = axes.plot(steps, [points[s] for s in steps], "o-", label=name)
        colors.setdefault(task, line.get_color())
        series[name] = len(steps)
    for task, value in sorted(scratch.items()):
        if any(task == t for _, t in finetuned):
            axes.axhline(value, linestyle=":", color=colors.get(task), label=f"{task} scratch")
            series[f"{task} scratch"] = 1
    save_with_legends(figure, path)
    return series


def plot_finetune_vs_scratch(
    finetuned: dict[tuple[str, str], dict[int, float]], scratch: dict[str, float], path: Path
) -> dict[str, int]:
    """Per task, bars of the finetune from the latest checkpoint and of scratch."""
    # The most-trained checkpoint, not the best one: the best over checkpoints would pick the
    # winner on the validation set it is then reported on.
    latest: dict[str, tuple[int, float]] = {}
    for (_, task), points in finetuned.items():
        step = max(points)
        if task not in latest or step > latest[task][0]:
            latest[task] = (step, points[step])
    tasks = sorted(set(latest) | set(scratch))
    figure, axes = new_figure(f"finetuned vs. scratch ({DOWNSTREAM_METRIC})", "task", "top-1")
    width = 0.4
    positions = range(len(tasks))
    series = {}
    bars = {
        "finetuned": [latest[t][1] if t in latest else None for t in tasks],
        "scratch": [scratch.get(t) for t in tasks],
    }
    for offset, (name, values) in zip((-width / 2, width / 2), bars.items(), strict=True):
        drawn = [(i, v) for i, v in zip(positions, values, strict=True) if v is not None]
        if drawn:
            axes.bar([i + offset for i, _ in drawn], [v for _, v in drawn], width, label=name)
            series[name] = len(drawn)
    axes.set_xticks(list(positions), tasks)
    save_with_legends(figure, path)
    return series


def write_plots(
    comparison: Comparison, views: list[RunView], every_view: list[RunView], out_dir: Path
) -> tuple[dict[str, dict[str, int]], dict[str, str]]:
    """Write the four PNGs (those with data); returns {file: {series: points}}, {file: reason}."""
    plots: dict[str, dict[str, int]] = {}
    skipped: dict[str, str] = {}
    curves = {
        "loss.png": (("train/loss",), "training loss"),
        "top1.png": (("val/top1", "val/top1_ema"), "validation top-1"),
    }
    for filename, (keys, title) in curves.items():
        series = plot_metric_curves(comparison, views, keys, out_dir / filename, title)
        if series:
            plots[filename] = series
        else:
            skipped[filename] = f"no run logged {' or '.join(keys)}"
    finetuned, scratch = group_downstream(comparison, every_view)
    labels = {view.run_id: view.label for view in every_view}
    if finetuned:
        plots["downstream.png"] = plot_downstream(
            finetuned, scratch, labels, out_dir / "downstream.png"
        )
    else:
        skipped["downstream.png"] = (
            f"no finetune run tagged {TAG_PRETRAIN_RUN}/{TAG_PRETRAIN_STEP} has {DOWNSTREAM_METRIC}"
        )
    if finetuned or scratch:
        plots["finetune_vs_scratch.png"] = plot_finetune_vs_scratch(
            finetuned, scratch, out_dir / "finetune_vs_scratch.png"
        )
    else:
        skipped["finetune_vs_scratch.png"] = f"no finetune or scratch run has {DOWNSTREAM_METRIC}"
    for filename in skipped:  # a plot left from an earlier comparison would pass for this one's
        (out_dir / filename).unlink(missing_ok=True)
    return plots, skipped
