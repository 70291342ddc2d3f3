"""``python -m pipeline.compare [RUN_ID ... | --experiment NAME] [--out DIR]``: compare runs.

Reads MLflow only. Prints a table (per run: final and best of the main metrics, then the params
that differ between the runs) and writes PNG plots to ``--out``:

- ``loss.png`` and ``top1.png``: ``train/loss`` and ``val/top1`` (+ EMA) against step, per run;
- ``downstream.png``: finetuned ``val/top1`` against the pretraining step it started from, one line
  per task, with the task's scratch baseline as a horizontal line;
- ``finetune_vs_scratch.png``: per task, the finetune from the latest checkpoint against scratch.

Finetune and scratch runs are found through their lineage tags (``pipeline.tracking.TAG_*``) in
every experiment, so comparing a pretraining run by id also shows its downstream results.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException

from pipeline.tracking import (
    TAG_KIND,
    TAG_PRETRAIN_RUN,
    TAG_PRETRAIN_STEP,
    TAG_TASK,
    TrackingError,
    check_tracking_uri,
    resolve_tracking_uri,
)

EXIT_BAD_INPUT = 2  # design.md: exit code 2 for bad input
MAIN_METRICS = ("train/loss", "val/top1", "val/top1_ema", "train/images_per_s")
LOWER_IS_BETTER = {"train/loss"}
DOWNSTREAM_METRIC = "val/top1"


class CompareError(ValueError):
    """Runs or an experiment that cannot be compared; the message names them."""


@dataclass
class RunView:
    """One MLflow run with the tags and metric histories the comparison needs."""

    run: Run
    label: str = ""
    histories: dict[str, list[Metric]] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        """The MLflow run id."""
        return self.run.info.run_id

    def tag(self, name: str) -> str | None:
        """A tag of the run, None when unset."""
        return self.run.data.tags.get(name)

    @property
    def kind(self) -> str:
        """pretrain | finetune | scratch (pretrain when the run has no lineage tags)."""
        if self.tag(TAG_KIND):
            return self.tag(TAG_KIND)
        return "finetune" if self.tag(TAG_PRETRAIN_RUN) else "pretrain"


class Comparison:
    """Loads runs and their metric histories from one tracking URI, each history once."""

    def __init__(self, uri: str) -> None:
        self.uri = resolve_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def history(self, view: RunView, key: str) -> list[Metric]:
        """The metric's values in step order (empty when never logged)."""
        if key not in view.histories:
            metrics = self.client.get_metric_history(view.run_id, key)
            view.histories[key] = sorted(metrics, key=lambda m: (m.step, m.timestamp))
        return view.histories[key]

    def final(self, view: RunView, key: str) -> float | None:
        """The value at the last logged step."""
        values = self.history(view, key)
        return values[-1].value if values else None

    def best(self, view: RunView, key: str) -> float | None:
        """The lowest loss or the highest of any other metric."""
        values = [m.value for m in self.history(view, key)]
        if not values:
            return None
        return min(values) if key in LOWER_IS_BETTER else max(values)

    def get_runs(self, run_ids: Iterable[str]) -> list[RunView]:
        """The named runs; ``CompareError`` names an id MLflow does not know."""
        views = []
        for run_id in run_ids:
            try:
                views.append(RunView(self.client.get_run(run_id)))
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                    raise CompareError(f"run {run_id!r} not found at {self.uri}") from None
                raise
        return views

    def experiment_runs(self, name: str) -> list[RunView]:
        """Every run of the experiment, oldest first."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            raise CompareError(f"experiment {name!r} not found at {self.uri}")
        runs = self.search([experiment.experiment_id], "")
        if not runs:
            raise CompareError(f"experiment {name!r} at {self.uri} has no runs")
        return runs

    def search(self, experiment_ids: list[str], filter_string: str) -> list[RunView]:
        """All runs matching the filter (every page), oldest first."""
        found, token = [], None
        while True:
            page = self.client.search_runs(
                experiment_ids, filter_string, max_results=1000, page_token=token
            )
            found.extend(page)
            token = page.token
            if not token:
                break
        return [RunView(run) for run in sorted(found, key=lambda r: r.info.start_time or 0)]

    def all_experiment_ids(self) -> list[str]:
        """Ids of every active experiment."""
        ids, token = [], None
        while True:
            page = self.client.search_experiments(max_results=1000, page_token=token)
            ids.extend(experiment.experiment_id for experiment in page)
            token = page.token
            if not token:
                break
        return ids


def _downstream_runs(comparison: Comparison, views: list[RunView]) -> list[RunView]:
    """Finetune and scratch runs: the selected ones plus those tagged with a selected pretrain."""
    chosen = {view.run_id: view for view in views if view.kind in ("finetune", "scratch")}
    pretrain_ids = [view.run_id for view in views if view.kind == "pretrain"]
    if not pretrain_ids and not chosen:
        return []
    experiments = comparison.all_experiment_ids()
    for run_id in pretrain_ids:
        for view in comparison.search(experiments, f"tags.`{TAG_PRETRAIN_RUN}` = '{run_id}'"):
            chosen.setdefault(view.run_id, view)
    tasks = {view.tag(TAG_TASK) for view in chosen.values() if view.tag(TAG_TASK)}
    for task in sorted(tasks):
        quoted = f'"{task}"' if "'" in task else f"'{task}'"  # MLflow filters have no escapes
        scratch_filter = f"tags.`{TAG_KIND}` = 'scratch' and tags.`{TAG_TASK}` = {quoted}"
        for view in comparison.search(experiments, scratch_filter):
            chosen.setdefault(view.run_id, view)
    return list(chosen.values())


def _label_runs(views: list[RunView]) -> None:
    names = [view.run.info.run_name or view.run_id[:8] for view in views]
    for view, name in zip(views, names, strict=True):
        view.label = name if names.count(name) == 1 else f"{name} [{view.run_id[:6]}]"


def _differing_params(views: list[RunView]) -> dict[str, dict[str, str]]:
    keys = sorted({key for view in views for key in view.run.data.params})
    differing = {}
    for key in keys:
        values = {view.label: view.run.data.params.get(key, "-") for view in views}
        if len(set(values.values())) > 1:
            differing[key] = values
    return differing


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(comparison: Comparison, views: list[RunView]) -> list[dict[str, Any]]:
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


def _print_columns(header: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    for row in [header, *lines]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def print_report(rows: list[dict[str, Any]], differing: dict[str, dict[str, str]]) -> None:
    """The runs table, then the params that differ between the runs."""
    header = ["run", "kind", "status"] + [f"{key} (final/best)" for key in MAIN_METRICS]
    lines = [
        [row["run"], row["kind"], row["status"]]
        + [f"{_format(row[f'{k} final'])}/{_format(row[f'{k} best'])}" for k in MAIN_METRICS]
        for row in rows
    ]
    _print_columns(header, lines)
    if differing:
        print("\nparams that differ:")
        labels = [row["run"] for row in rows]
        _print_columns(
            ["param", *labels],
            [
                [key, *(values.get(label, "-") for label in labels)]
                for key, values in differing.items()
            ],
        )


def compare_runs(
    uri: str,
    run_ids: list[str] | None = None,
    experiment: str | None = None,
    out_dir: str | Path = "compare_out",
    quiet: bool = False,
) -> dict[str, Any]:
    """Print the comparison and write the plots; returns rows, params and plotted point counts."""
    if bool(run_ids) == bool(experiment):
        raise CompareError("give either run ids or an experiment name (not both, not neither)")
    _check_uri(uri)
    comparison = Comparison(uri)
    views = comparison.get_runs(run_ids) if run_ids else comparison.experiment_runs(experiment)
    downstream = [
        view
        for view in _downstream_runs(comparison, views)
        if view.run_id not in {v.run_id for v in views}
    ]
    _label_runs(views + downstream)
    rows = _table(comparison, views)
    differing = _differing_params(views)
    if not quiet:
        print_report(rows, differing)
    plots, skipped = write_plots(comparison, views, views + downstream, Path(out_dir))
    experiment_rows = _draw_experiment(comparison, experiment, views, Path(out_dir), plots, quiet)
    for name, reason in skipped.items():
        if not quiet:
            print(f"note: {name} skipped: {reason}")
    if not quiet and plots:
        print(f"plots written to {Path(out_dir).resolve()}: {', '.join(sorted(plots))}")
    return {
        "runs": rows,
        "differing_params": differing,
        "plots": plots,
        "skipped": skipped,
        "experiment_rows": experiment_rows,
    }


def _draw_experiment(
    comparison: Comparison,
    experiment: str | None,
    views: list[RunView],
    out_dir: Path,
    plots: dict[str, dict[str, int]],
    quiet: bool,
) -> list[dict[str, Any]]:
    """For an experiment of ``pipeline.experiments``: its figure and ``table.md`` (else nothing)."""
    from pipeline.experiment_plots import draw_experiment, figure_kind, markdown_table

    kind = figure_kind(comparison, experiment) if experiment else None
    if kind is None:
        return []
    rows, figure = draw_experiment(comparison, kind, views, out_dir)
    plots.update(figure)
    if not quiet:
        print(f"\nexperiment {experiment} ({kind}), also in {out_dir / 'table.md'}:")
        print(markdown_table(rows))
    return rows


def _check_uri(uri: str) -> None:
    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///"):
        path = Path(resolved.removeprefix("sqlite:///"))
        if not path.is_file():  # MLflow would silently create an empty database
            raise CompareError(f"tracking URI {uri}: database file {path} does not exist")
    try:
        check_tracking_uri(resolved)
    except TrackingError as exc:
        raise CompareError(str(exc)) from None


def save_figure(figure: Any, path: Path) -> None:
    """Write a PNG atomically: a half-written plot never appears under its final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def group_downstream(
    comparison: Comparison, views: list[RunView]
) -> tuple[dict[tuple[str, str], dict[int, float]], dict[str, float]]:
    """``{(pretrain run, task): {pretrain step: final top-1}}`` and ``{task: scratch top-1}``."""
    finetuned: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    scratch: dict[str, float] = {}
    # Oldest first, FINISHED last: a retried job's successful run wins over its failed attempts.
    ordered = sorted(views, key=lambda v: (v.run.info.status == "FINISHED", v.run.info.start_time))
    for view in ordered:
        task = view.tag(TAG_TASK) or "task"
        value = comparison.final(view, DOWNSTREAM_METRIC)
        if value is None:
            continue
        if view.kind == "scratch":
            scratch[task] = value
        elif view.kind == "finetune" and view.tag(TAG_PRETRAIN_STEP) is not None:
            step = int(view.tag(TAG_PRETRAIN_STEP))
            finetuned[(view.tag(TAG_PRETRAIN_RUN) or "", task)][step] = value
    return dict(finetuned), scratch


def _new_figure(title: str, xlabel: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # Figure() draws with Agg: no display, no pyplot state

    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _plot_metric_curves(
    comparison: Comparison, views: list[RunView], keys: tuple[str, ...], path: Path, title: str
) -> dict[str, int]:
    """One line per (run, metric) against step; returns series -> points (empty: nothing drawn)."""
    figure, axes = _new_figure(title, "step", " / ".join(keys))
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
        axes.legend(fontsize="small")
        save_figure(figure, path)
    return series


def _plot_downstream(
    finetuned: dict[tuple[str, str], dict[int, float]],
    scratch: dict[str, float],
    labels: dict[str, str],
    path: Path,
) -> dict[str, int]:
    figure, axes = _new_figure(
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
    axes.legend(fontsize="small")
    save_figure(figure, path)
    return series


def _plot_finetune_vs_scratch(
    finetuned: dict[tuple[str, str], dict[int, float]], scratch: dict[str, float], path: Path
) -> dict[str, int]:
    # Per task, the finetune from the most-trained checkpoint: the best over checkpoints would
    # pick the winner on the validation set it is then reported on.
    latest: dict[str, tuple[int, float]] = {}
    for (_, task), points in finetuned.items():
        step = max(points)
        if task not in latest or step > latest[task][0]:
            latest[task] = (step, points[step])
    tasks = sorted(set(latest) | set(scratch))
    figure, axes = _new_figure(f"finetuned vs. scratch ({DOWNSTREAM_METRIC})", "task", "top-1")
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
    axes.legend(fontsize="small")
    save_figure(figure, path)
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
        series = _plot_metric_curves(comparison, views, keys, out_dir / filename, title)
        if series:
            plots[filename] = series
        else:
            skipped[filename] = f"no run logged {' or '.join(keys)}"
    finetuned, scratch = group_downstream(comparison, every_view)
    labels = {view.run_id: view.label for view in every_view}
    if finetuned:
        plots["downstream.png"] = _plot_downstream(
            finetuned, scratch, labels, out_dir / "downstream.png"
        )
    else:
        skipped["downstream.png"] = (
            f"no finetune run tagged {TAG_PRETRAIN_RUN}/{TAG_PRETRAIN_STEP} has {DOWNSTREAM_METRIC}"
        )
    if finetuned or scratch:
        plots["finetune_vs_scratch.png"] = _plot_finetune_vs_scratch(
            finetuned, scratch, out_dir / "finetune_vs_scratch.png"
        )
    else:
        skipped["finetune_vs_scratch.png"] = f"no finetune or scratch run has {DOWNSTREAM_METRIC}"
    for filename in skipped:  # a plot left from an earlier comparison would pass for this one's
        (out_dir / filename).unlink(missing_ok=True)
    return plots, skipped


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; 2 on unknown runs, experiments or tracking URIs."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__)
    parser.add_argument("run_ids", nargs="*", metavar="RUN_ID", help="MLflow run ids")
    parser.add_argument("--experiment", help="compare every run of this MLflow experiment")
    parser.add_argument("--out", default="compare_out", help="folder for the PNG plots")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    args = parser.parse_args(argv)
    try:
        compare_runs(args.tracking_uri, args.run_ids or None, args.experiment, args.out)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
