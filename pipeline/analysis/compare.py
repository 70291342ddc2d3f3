"""Compare runs from MLflow: the report table, the plots and, for an experiment of the runner,
its figure and ``table.md``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypedDict

from pipeline.analysis.experiment_figures import draw_experiment, figure_kind
from pipeline.analysis.figures import write_plots
from pipeline.analysis.report import differing_params, format_report, markdown_table, table_rows
from pipeline.analysis.runs import CompareError, downstream_runs, label_runs, open_comparison

log = logging.getLogger(__name__)


class ComparisonResult(TypedDict):
    """What a comparison found and drew."""

    runs: list[dict[str, Any]]  # table rows (see ``report.table_rows``)
    differing_params: dict[str, dict[str, str]]  # {param: {run label: value}}
    plots: dict[str, dict[str, int]]  # {file: {series: points}}
    skipped: dict[str, str]  # {file: why it was not drawn}
    experiment_rows: list[dict[str, Any]]  # rows of table.md (empty unless an experiment figure)


def compare_runs(
    uri: str,
    run_ids: list[str] | None = None,
    experiment: str | None = None,
    out_dir: str | Path = "compare_out",
    quiet: bool = False,
) -> ComparisonResult:
    """Log the comparison of the runs (or of every run of the experiment) and write the plots to
    ``out_dir``; ``quiet`` logs the report at debug level only. ``CompareError`` names an unknown
    run, experiment or store."""
    if bool(run_ids) == bool(experiment):
        raise CompareError("give either run ids or an experiment name (not both, not neither)")
    report = log.debug if quiet else log.info
    out = Path(out_dir)
    comparison = open_comparison(uri)
    views = comparison.get_runs(run_ids) if run_ids else comparison.experiment_runs(experiment)
    selected = {view.run_id for view in views}
    downstream = [v for v in downstream_runs(comparison, views) if v.run_id not in selected]
    label_runs(views + downstream)
    rows = table_rows(comparison, views)
    differing = differing_params(views)
    report(format_report(rows, differing))
    plots, skipped = write_plots(comparison, views, views + downstream, out)
    experiment_rows = []
    kind = figure_kind(comparison, experiment) if experiment else None
    if kind is not None:
        experiment_rows, figure = draw_experiment(comparison, kind, views, out)
        plots.update(figure)
        report(f"\nexperiment {experiment} ({kind}), also in {out / 'table.md'}:")
        report(markdown_table(experiment_rows))
    for name, reason in skipped.items():
        report(f"note: {name} skipped: {reason}")
    if plots:
        report(f"plots written to {out.resolve()}: {', '.join(sorted(plots))}")
    return {
        "runs": rows,
        "differing_params": differing,
        "plots": plots,
        "skipped": skipped,
        "experiment_rows": experiment_rows,
    }


def compare_experiment(tracking_uri: str, experiment: str, out: Path) -> ComparisonResult:
    """Every run of the MLflow experiment compared: the report logged, the plots in ``out``."""
    return compare_runs(tracking_uri, experiment=experiment, out_dir=out)
