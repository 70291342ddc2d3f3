"""MLflow runs as the comparison sees them: one ``RunView`` per run, each metric history read once.

Finetune and scratch runs are found through their lineage tags (``pipeline.tracking.TAG_*``) in
every experiment, so comparing a pretraining run by id also finds its downstream runs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException

from pipeline.config import absolute_sqlite_uri
from pipeline.tracking import (
    SCRATCH,
    TAG_KIND,
    TAG_PRETRAIN_RUN,
    TAG_PRETRAIN_STEP,
    TAG_TASK,
    TrackingError,
    check_tracking_uri,
)

MAIN_METRICS = ("train/loss", "val/top1", "val/top1_ema", "train/images_per_s", "train/mfu")
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


def _every_page(fetch: Callable[[str | None], Any]) -> list[Any]:
    """Every item of a paged MLflow search; ``fetch(page_token)`` returns one page."""
    found, token = [], None
    while True:
        page = fetch(token)
        found.extend(page)
        token = page.token
        if not token:
            return found


class Comparison:
    """Loads runs and their metric histories from one tracking URI, each history once."""

    def __init__(self, uri: str) -> None:
        self.uri = absolute_sqlite_uri(uri)
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
        found = _every_page(
            lambda token: self.client.search_runs(
                experiment_ids, filter_string, max_results=1000, page_token=token
            )
        )
        return [RunView(run) for run in sorted(found, key=lambda r: r.info.start_time or 0)]

    def all_experiment_ids(self) -> list[str]:
        """Ids of every active experiment."""
        experiments = _every_page(
            lambda token: self.client.search_experiments(max_results=1000, page_token=token)
        )
        return [experiment.experiment_id for experiment in experiments]


def open_comparison(uri: str) -> Comparison:
    """A ``Comparison`` of an existing store; ``CompareError`` when the URI cannot be read."""
    resolved = absolute_sqlite_uri(uri)
    if resolved.startswith("sqlite:///"):
        path = Path(resolved.removeprefix("sqlite:///"))
        if not path.is_file():  # MLflow would silently create an empty database
            raise CompareError(f"tracking URI {uri}: database file {path} does not exist")
    try:
        check_tracking_uri(resolved)
    except TrackingError as exc:
        raise CompareError(str(exc)) from None
    return Comparison(resolved)


def downstream_runs(comparison: Comparison, views: list[RunView]) -> list[RunView]:
    """Finetune and scratch runs: the selected ones plus those tagged with a selected pretrain."""
    chosen = {view.run_id: view for view in views if view.kind in ("finetune", SCRATCH)}
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
        scratch_filter = f"tags.`{TAG_KIND}` = '{SCRATCH}' and tags.`{TAG_TASK}` = {quoted}"
        for view in comparison.search(experiments, scratch_filter):
            chosen.setdefault(view.run_id, view)
    return list(chosen.values())


def label_runs(views: list[RunView]) -> None:
    """Give each run its name as label, with an id prefix where two runs share a name."""
    names = [view.run.info.run_name or view.run_id[:8] for view in views]
    for view, name in zip(views, names, strict=True):
        view.label = name if names.count(name) == 1 else f"{name} [{view.run_id[:6]}]"


def counting_last(views: list[RunView]) -> list[RunView]:
    """Oldest first with FINISHED runs last: a retried job's successful run wins over its failed
    attempts when later runs overwrite earlier ones."""
    return sorted(views, key=lambda v: (v.run.info.status == "FINISHED", v.run.info.start_time))


def group_downstream(
    comparison: Comparison, views: list[RunView]
) -> tuple[dict[tuple[str, str], dict[int, float]], dict[str, float]]:
    """``{(pretrain run, task): {pretrain step: final top-1}}`` and ``{task: scratch top-1}``."""
    finetuned: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    scratch: dict[str, float] = {}
    for view in counting_last(views):
        task = view.tag(TAG_TASK) or "task"
        value = comparison.final(view, DOWNSTREAM_METRIC)
        if value is None:
            continue
        if view.kind == SCRATCH:
            scratch[task] = value
        elif view.kind == "finetune" and view.tag(TAG_PRETRAIN_STEP) is not None:
            step = int(view.tag(TAG_PRETRAIN_STEP))
            finetuned[(view.tag(TAG_PRETRAIN_RUN) or "", task)][step] = value
    return dict(finetuned), scratch
