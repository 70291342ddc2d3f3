"""``python -m pipeline.experiments {list, show NAME, run NAME}``: the paper's claims, runnable.

An experiment is a YAML file in ``configs/experiments/``: a base run config, the datasets it
needs, overrides common to every run, a list of runs (each a name and its overrides, optionally
finetuned from an earlier run's checkpoint) and a time budget. ``run NAME``:

1. writes the datasets that are missing (``shapes``/``digits`` shards under ``--out``);
2. joins the Ray cluster at ``RAY_ADDRESS``/``--ray-address`` or starts one on 127.0.0.1;
3. trains the runs one at a time (2 cores) through the pretraining launcher
   (:func:`pipeline.launch.launch`), each as a run of MLflow experiment NAME tagged with its name;
4. skips runs that already finished, so a stopped experiment continues where it was.

``--only a,b`` and ``--set key=value`` shrink an experiment (the tests run two runs of a few
steps). Then ``python -m pipeline.compare --experiment NAME`` draws its figures and table.
Exit codes: 0 every run finished, 2 bad input (name, file, config, reference), 1 a run failed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.config import EXIT_BAD_INPUT, ConfigError, RunConfig, Section, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = ROOT / "configs" / "experiments"
TAG_EXPERIMENT_RUN = "pipeline.experiment_run"  # the run's name in the experiment file
TAG_MODEL_PARAMS = "pipeline.model_params"  # trainable parameters of the model, exact
TAG_FIGURE = "pipeline.figure"  # experiment tag: which figure pipeline.compare draws
# The machine's 1-minute load average when the run started and ended: wall times measured on a
# shared machine mean little without it.
TAG_LOAD_START, TAG_LOAD_END = "pipeline.load_at_start", "pipeline.load_at_end"
SCRATCH = "scratch"
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
            match = _REFERENCE.match(run.finetune_from or "")
            if match and match.group(1) not in seen:
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
    if not path.is_file():
        raise ConfigError(f"experiment file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping (claim, base, runs, …)")
    try:
        spec = ExperimentSpec.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(str(p) for p in error['loc'])}': {error['msg']}"
            if error["loc"]
            else error["msg"]
            for error in exc.errors()
        )
        raise ConfigError(f"{path}: {problems}") from None
    return path.stem, spec


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
    from pipeline.data import write_shards
    from pipeline.data.sources import digits, shapes
    from pipeline.data.storage import url_exists

    for key, dataset in spec.datasets.items():
        url = _expand(dataset.url, out)
        if url_exists(f"{url.rstrip('/')}/_info.json"):
            continue
        print(f"writing the {key} shards ({dataset.source}) to {url}", flush=True)
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
    from mlflow import MlflowClient

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


def run_one(
    run: RunSpec, config: RunConfig, name: str, run_ids: dict[str, str], run_names: dict[str, str]
) -> str:
    """Train one run (or find it finished); returns its MLflow run id."""
    from pipeline.launch import launch
    from pipeline.models import count_params
    from pipeline.pretrain import resolve
    from pipeline.tracking import lineage_tags
    from pipeline.train.plan import deepspeed_config

    uri = config.tracking.uri
    parent = _REFERENCE.match(run.finetune_from or "")
    parent_name = f"{run_names[parent.group(1)]}@{parent.group(2)}" if parent else None
    config.tracking.run_name = run_names[run.name] = run_name(run, config, parent_name)
    if existing := finished_run(uri, name, config.tracking.run_name):
        print(f"  {run.name}: already finished (MLflow run {existing}); skipped", flush=True)
        return existing
    plan = resolve(config)
    deepspeed_config(config, plan)
    init, pretrain_run, pretrain_step = None, None, None
    if parent:
        from pipeline.finetune import resolve_reference

        pretrain_run, pretrain_step = run_ids[parent.group(1)], int(parent.group(2))
        init = resolve_reference(f"{pretrain_run}@{pretrain_step}", uri).weights
    tags = lineage_tags(run.kind, run.task, pretrain_run, pretrain_step) | {
        TAG_EXPERIMENT_RUN: run.name,
        TAG_MODEL_PARAMS: str(count_params(plan.model, plan.num_classes)),
        TAG_LOAD_START: f"{os.getloadavg()[0]:.1f}",
    }
    result = launch(config, plan, kind=run.kind, tags=tags, init=init)
    from mlflow import MlflowClient

    MlflowClient(uri).set_tag(result.run_id, TAG_LOAD_END, f"{os.getloadavg()[0]:.1f}")
    print(f"  {run.name}: done, MLflow run {result.run_id} {_summary(result.metrics)}", flush=True)
    return result.run_id


def run_experiment(
    name: str,
    spec: ExperimentSpec,
    out: Path,
    tracking_uri: str,
    only: list[str] | None = None,
    extra: list[str] | None = None,
    ray_address: str | None = None,
) -> int:
    """Train the experiment's runs in order; 0 when all finished, 1 when one failed."""
    from pipeline.launch import connect_ray
    from pipeline.tracking import experiment_id, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(tracking_uri)
    configs = run_configs(name, spec, out, tracking_uri, extra or [])
    chosen = [run for run in spec.runs if not only or run.name in only]
    needed = {m.group(1) for r in chosen if (m := _REFERENCE.match(r.finetune_from or ""))}
    runs = [run for run in spec.runs if run in chosen or run.name in needed]
    out.mkdir(parents=True, exist_ok=True)
    write_datasets(spec, out)
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_experiment_tag(
        experiment_id(tracking_uri, name), TAG_FIGURE, spec.figure
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    connect_ray(ray_address)
    started, failed = time.monotonic(), []
    run_ids: dict[str, str] = {}
    run_names: dict[str, str] = {}
    for index, run in enumerate(runs, 1):
        print(f"[{index}/{len(runs)}] {name}/{run.name} ({time.monotonic() - started:.0f} s in)")
        parent = _REFERENCE.match(run.finetune_from or "")
        if parent and parent.group(1) not in run_ids:
            print(f"  {run.name}: skipped, its pretraining run {parent.group(1)} failed")
            failed.append(run.name)
            continue
        try:
            run_ids[run.name] = run_one(run, configs[run.name], name, run_ids, run_names)
        except Exception as exc:  # one failed run must not stop the others
            print(f"  {run.name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            failed.append(run.name)
    minutes = (time.monotonic() - started) / 60
    budget = spec.budget_minutes
    over = f" (over its {budget:g}-minute budget)" if minutes > budget else ""
    print(
        f"\nexperiment {name}: {len(runs) - len(failed)}/{len(runs)} runs finished in "
        f"{minutes:.1f} min{over}; MLflow experiment {name!r} at {tracking_uri}\n"
        f"figures: python -m pipeline.compare --experiment {name} --tracking-uri {tracking_uri}"
    )
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.experiments``."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.experiments",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the experiments in configs/experiments/")
    show = commands.add_parser("show", help="each run's resolved overrides, nothing started")
    run = commands.add_parser("run", help="train the experiment's runs (finished ones are kept)")
    for sub in (show, run):
        sub.add_argument("name", help="an experiment name (python -m pipeline.experiments list)")
        sub.add_argument("--out", type=Path, default=ROOT / "experiments_out")
        sub.add_argument("--tracking-uri", default=None, help="default: sqlite:///OUT/mlflow.db")
        sub.add_argument("--only", default=None, help="comma-separated run names")
        sub.add_argument(
            "--set", dest="extra", action="append", default=[], help="override for every run"
        )
    run.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a local Ray")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in available():
            print(f"{name:12s} {load_experiment(name)[1].claim}")
        return 0
    try:
        name, spec = load_experiment(args.name)
        out = args.out.resolve()
        tracking_uri = args.tracking_uri or f"sqlite:///{out}/mlflow.db"
        only = args.only.split(",") if args.only else None
        unknown = sorted(set(only or []) - {run.name for run in spec.runs})
        if unknown:
            raise ConfigError(
                f"--only: {name} has no run(s) {unknown}; its runs: {[r.name for r in spec.runs]}"
            )
        configs = run_configs(name, spec, out, tracking_uri, args.extra)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "show":
        for run in spec.runs:
            config = configs[run.name]
            print(f"{run.name}: {run.kind} {config.model.name} batch {config.train.global_batch}")
        return 0
    try:
        return run_experiment(name, spec, out, tracking_uri, only, args.extra, args.ray_address)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
