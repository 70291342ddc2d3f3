"""The paper's claims as experiments: runs of one MLflow experiment, trained one at a time.

An experiment is a YAML file in ``configs/experiments/``: a base run config, the datasets it
needs, overrides common to every run, a list of runs (each a name and its overrides, optionally
finetuned from an earlier run's checkpoint) and a time budget. ``run_experiment``:

1. writes the datasets that are missing (``shapes``/``digits`` shards under the output folder);
2. joins the Ray cluster at ``RAY_ADDRESS`` (or the address given) or starts one on 127.0.0.1;
3. trains the runs one at a time through :func:`pipeline.run.launch.launch`, each as a run of
   MLflow experiment NAME tagged with its name;
4. skips runs that already finished, so a stopped experiment continues where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Literal

from mlflow import MlflowClient
from pydantic import Field, field_validator, model_validator

from pipeline.config import (
    ConfigError,
    RunConfig,
    Section,
    absolute_sqlite_uri,
    load_config,
    load_yaml_model,
)
from pipeline.data.sources import digits, shapes
from pipeline.data.storage import url_exists
from pipeline.data.writer import write_shards
from pipeline.models import count_params
from pipeline.run import ROOT
from pipeline.run.launch import launch
from pipeline.run.preflight import check_reachable, plan_run
from pipeline.run.ray_cluster import connect_ray
from pipeline.run.references import resolve_reference
from pipeline.tracking import (
    SCRATCH,
    TAG_EXPERIMENT_RUN,
    TAG_FIGURE,
    TAG_LOAD_END,
    TAG_LOAD_START,
    TAG_MODEL_PARAMS,
    experiment_id,
    lineage_tags,
)

log = logging.getLogger(__name__)

EXPERIMENTS_DIR = ROOT / "configs" / "experiments"
_REFERENCE = re.compile(r"^([a-z0-9_.-]+)@(\d+)$")


class DatasetSpec(Section):
    """Shards an experiment writes when they are missing."""

    source: Literal["shapes", "digits"]
    url: str = Field(description="where the shards go; {out} is the experiment's output folder")
    num_samples: int | None = Field(None, gt=0, description="shapes: images; digits: first N")
    resolution: int = Field(32, gt=0)
    samples_per_shard: int = Field(1000, gt=0)
    val_samples: int | None = Field(None, gt=0, description="None: 10 % of the samples")
    seed: int = 0


class RunSpec(Section):
    """One run of an experiment."""

    name: str = Field(pattern=r"^[a-z0-9_.-]+$")
    overrides: list[str] = Field(default_factory=list)
    config: str | None = Field(None, description="a run config other than the experiment's base")
    finetune_from: str | None = Field(
        None, description="'scratch' or 'RUN@STEP' (an earlier run of this experiment)"
    )
    task: str | None = Field(None, description="downstream task name of a finetune (MLflow tag)")

    @field_validator("finetune_from")
    @classmethod
    def _reference(cls, value: str | None) -> str | None:
        if value is not None and value != SCRATCH and not _REFERENCE.match(value):
            raise ValueError(f"{value!r} is neither 'scratch' nor RUN@STEP")
        return value

    @property
    def kind(self) -> str:
        """pretrain, finetune or scratch (the MLflow kind tag)."""
        if self.finetune_from is None:
            return "pretrain"
        return SCRATCH if self.finetune_from == SCRATCH else "finetune"

    @property
    def parent(self) -> tuple[str, int] | None:
        """``(run name, step)`` of the earlier run this one is finetuned from."""
        match = _REFERENCE.match(self.finetune_from or "")
        return (match.group(1), int(match.group(2))) if match else None


class ExperimentSpec(Section):
    """An experiment file: what it tests, its runs and its budget."""

    claim: str = Field(min_length=1, description="the paper's claim the experiment tests")
    figure: Literal["batch", "lambda", "curves", "transfer"]
    base: str = Field(description="run config every run starts from (relative to the repo)")
    budget_minutes: float = Field(gt=0, description="wall time on 2 idle CPU cores")
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict)
    overrides: list[str] = Field(default_factory=list)
    runs: list[RunSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _references_resolve(self) -> ExperimentSpec:
        seen: set[str] = set()
        for run in self.runs:
            if run.name in seen:
                raise ValueError(f"run name {run.name!r} appears twice")
            if run.parent and run.parent[0] not in seen:
                raise ValueError(
                    f"run {run.name!r}: finetune_from {run.finetune_from!r} names no earlier run"
                )
            seen.add(run.name)
        return self


def available() -> list[str]:
    """Names of the experiments in ``configs/experiments/``."""
    return sorted(path.stem for path in EXPERIMENTS_DIR.glob("*.yaml"))


def load_experiment(name_or_path: str) -> tuple[str, ExperimentSpec]:
    """The experiment's name and spec, from a name in configs/experiments/ or a YAML path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = EXPERIMENTS_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(
                f"unknown experiment {name_or_path!r}; choose one of {available()} "
                f"(files in {EXPERIMENTS_DIR.relative_to(ROOT)}/) or give a YAML path"
            )
    return path.stem, load_yaml_model(path, ExperimentSpec, "experiment file")


def select_runs(name: str, spec: ExperimentSpec, only: list[str] | None) -> list[RunSpec]:
    """The runs named in ``only`` (all without it) and the earlier runs they finetune from."""
    unknown = sorted(set(only or []) - {run.name for run in spec.runs})
    if unknown:
        raise ConfigError(
            f"--only: {name} has no run(s) {unknown}; its runs: {[r.name for r in spec.runs]}"
        )
    chosen = [run for run in spec.runs if not only or run.name in only]
    needed = {run.parent[0] for run in chosen if run.parent}
    return [run for run in spec.runs if run in chosen or run.name in needed]


def _expand(text: str, out: Path) -> str:
    return text.replace("{out}", str(out))


def run_configs(
    name: str,
    spec: ExperimentSpec,
    out: Path,
    tracking_uri: str,
    extra: list[str],
) -> dict[str, RunConfig]:
    """Every run's validated config (bad input raises ConfigError before anything starts)."""
    configs = {}
    for run in spec.runs:
        base = ROOT / (run.config or spec.base)
        overrides = [_expand(text, out) for text in [*spec.overrides, *run.overrides, *extra]]
        overrides += [
            f"checkpoint.storage_url=file://{out}/runs",
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={name}",
        ]
        try:
            config = load_config(base, overrides).with_absolute_paths()
        except ConfigError as exc:
            raise ConfigError(f"run {run.name!r}: {exc}") from None
        configs[run.name] = config
    return configs


def run_name(run: RunSpec, config: RunConfig, parent: str | None) -> str:
    """``NAME-<hash of its config and parent>``: a changed run is a new run, not a resumed one."""
    settings = config.model_dump(mode="json")
    settings["tracking"].pop("uri")
    identity = json.dumps({"config": settings, "parent": parent}, sort_keys=True)
    return f"{run.name}-{hashlib.sha1(identity.encode()).hexdigest()[:8]}"


def write_datasets(spec: ExperimentSpec, out: Path) -> None:
    """Write each dataset whose ``_info.json`` is missing."""
    for key, dataset in spec.datasets.items():
        url = _expand(dataset.url, out)
        if url_exists(f"{url.rstrip('/')}/_info.json"):
            continue
        log.info(f"writing the {key} shards ({dataset.source}) to {url}")
        if dataset.source == "shapes":
            source = shapes(dataset.num_samples or 10000, dataset.resolution, seed=dataset.seed)
        else:
            source = digits(dataset.resolution, dataset.num_samples)
        write_shards(
            source,
            url,
            samples_per_shard=dataset.samples_per_shard,
            val_samples=dataset.val_samples,
            seed=dataset.seed,
            progress=False,
        )


def finished_run(tracking_uri: str, experiment: str, name: str) -> str | None:
    """The id of the FINISHED MLflow run called ``name`` in ``experiment``, if there is one."""
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id],
        f"tags.`mlflow.runName` = '{name}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _summary(metrics: dict) -> str:
    shown = [f"{key} {metrics[key]:.4f}" for key in ("val/top1", "train/loss") if key in metrics]
    return ", ".join(shown)


def _load() -> str:
    """The machine's 1-minute load average: wall times on a shared machine need it."""
    return f"{os.getloadavg()[0]:.1f}"


def run_one(
    run: RunSpec, config: RunConfig, name: str, run_ids: dict[str, str], run_names: dict[str, str]
) -> str:
    """Train one run (or find it finished); returns its MLflow run id."""
    uri = config.tracking.uri
    parent_name = f"{run_names[run.parent[0]]}@{run.parent[1]}" if run.parent else None
    config.tracking.run_name = run_names[run.name] = run_name(run, config, parent_name)
    if existing := finished_run(uri, name, config.tracking.run_name):
        log.info(f"  {run.name}: already finished (MLflow run {existing}); skipped")
        return existing
    plan = plan_run(config)
    init, pretrain_run, pretrain_step = None, None, None
    if run.parent:
        pretrain_run, pretrain_step = run_ids[run.parent[0]], run.parent[1]
        options = config.checkpoint.storage_options
        init = resolve_reference(f"{pretrain_run}@{pretrain_step}", uri, options).weights
    tags = lineage_tags(run.kind, run.task, pretrain_run, pretrain_step) | {
        TAG_EXPERIMENT_RUN: run.name,
        TAG_MODEL_PARAMS: str(count_params(plan.model, plan.num_classes)),
        TAG_LOAD_START: _load(),
    }
    result = launch(config, plan, kind=run.kind, tags=tags, init=init)
    MlflowClient(uri).set_tag(result.run_id, TAG_LOAD_END, _load())
    log.info(f"  {run.name}: done, MLflow run {result.run_id} {_summary(result.metrics)}")
    return result.run_id


def run_experiment(
    name: str,
    spec: ExperimentSpec,
    out: Path,
    tracking_uri: str,
    only: list[str] | None = None,
    extra: list[str] | None = None,
    ray_address: str | None = None,
) -> list[str]:
    """Train the experiment's runs in order; returns the names of the runs that failed."""
    tracking_uri = absolute_sqlite_uri(tracking_uri)
    configs = run_configs(name, spec, out, tracking_uri, extra or [])
    runs = select_runs(name, spec, only)
    out.mkdir(parents=True, exist_ok=True)
    check_reachable(configs[runs[0].name])  # every run shares its checkpoint and tracking store
    write_datasets(spec, out)
    MlflowClient(tracking_uri).set_experiment_tag(
        experiment_id(tracking_uri, name), TAG_FIGURE, spec.figure
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    connect_ray(ray_address)
    started, failed = time.monotonic(), []
    run_ids: dict[str, str] = {}
    run_names: dict[str, str] = {}
    for index, run in enumerate(runs, 1):
        log.info(f"[{index}/{len(runs)}] {name}/{run.name} ({time.monotonic() - started:.0f} s in)")
        if run.parent and run.parent[0] not in run_ids:
            log.info(f"  {run.name}: skipped, its pretraining run {run.parent[0]} failed")
            failed.append(run.name)
            continue
        try:
            run_ids[run.name] = run_one(run, configs[run.name], name, run_ids, run_names)
        except Exception as exc:  # one failed run must not stop the others
            log.info(f"  {run.name}: FAILED: {type(exc).__name__}: {exc}")
            failed.append(run.name)
    minutes = (time.monotonic() - started) / 60
    budget = spec.budget_minutes
    over = f" (over its {budget:g}-minute budget)" if minutes > budget else ""
    log.info(
        f"\nexperiment {name}: {len(runs) - len(failed)}/{len(runs)} runs finished in "
        f"{minutes:.1f} min{over}; MLflow experiment {name!r} at {tracking_uri}\n"
        f"figures: python -m pipeline.compare --experiment {name} --tracking-uri {tracking_uri}"
    )
    return failed
