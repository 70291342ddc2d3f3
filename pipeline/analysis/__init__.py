"""Analysis of logged runs, read from MLflow only: run queries, the comparison report, its plots and
the figures of the paper's experiments.

``compare_runs`` and ``compare_experiment`` are what ``python -m pipeline.compare`` and the demo
call; the modules below them, in import order: ``runs`` (``Comparison``, ``RunView``), ``report``
(table rows, differing params, Markdown), ``figures`` (the comparison plots),
``experiment_figures`` (one figure per experiment kind), ``compare``.
"""

from pipeline.analysis.compare import ComparisonResult, compare_experiment, compare_runs
from pipeline.analysis.runs import (
    DOWNSTREAM_METRIC,
    MAIN_METRICS,
    CompareError,
    Comparison,
    RunView,
    group_downstream,
)

__all__ = [
    "DOWNSTREAM_METRIC",
    "MAIN_METRICS",
    "CompareError",
    "Comparison",
    "ComparisonResult",
    "RunView",
    "compare_experiment",
    "compare_runs",
    "group_downstream",
]
