"""Did a rerun reproduce? Two MLflow stores, run for run and metric for metric.

Runs are matched by experiment and run name (the pipeline names a run by a hash of its config,
so the same command in the same folders gives the same name; where the folders differ, the
names are matched without their hash, and a finetune by its kind, task, pretraining step and seed,
if that leaves each name once); every metric both runs
logged is compared point by point (step and value, exactly), except the ones that time the
machine rather than the training: throughput, MFU, waiting fractions and seconds. What differs
is listed with its largest difference, so a user sees how far a rerun moved and where; a metric
only one of the runs logged (another version of the pipeline) is listed apart.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from pipeline.analysis.runs import CompareError, Comparison, RunView, open_comparison
from pipeline.tracking import TAG_PRETRAIN_RUN, TAG_PRETRAIN_STEP, TAG_TASK

# Metrics that measure the machine, not the training: they differ from run to run by design.
TIMING_MARKS = ("per_s", "mfu", "tflops", "wait_fraction", "allreduce_fraction", "_seconds")


def is_timing(key: str) -> bool:
    """True for a metric that times the run (images/s, MFU, seconds, waiting shares)."""
    return any(mark in key for mark in TIMING_MARKS)


@dataclass
class Difference:
    """One metric of one run that the two stores hold differently."""

    run: str  # "experiment/run name"
    key: str
    max_abs: float  # the largest difference of a value at the same step (inf: steps differ)
    note: str = ""


@dataclass
class Reproduction:
    """What matched: runs and metric points compared, and every difference found."""

    runs: int = 0
    points: int = 0
    differences: list[Difference] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # runs only one store holds
    one_sided: list[str] = field(default_factory=list)  # "run: key" only one run logged

    @property
    def identical(self) -> bool:
        """Every run in both stores, every compared point equal."""
        return not self.differences and not self.unmatched


HASH_SUFFIX = re.compile(r"-[0-9a-f]{8}$")  # pipeline.run.launch.default_run_name's hash


def _runs_by_name(comparison: Comparison, experiment: str | None) -> dict[str, RunView]:
    if experiment is not None:
        views = comparison.experiment_runs(experiment)
    else:
        views = comparison.search(comparison.all_experiment_ids(), "")
    names = {}
    for view in views:
        owner = comparison.client.get_experiment(view.run.info.experiment_id).name
        names[f"{owner}/{view.run.info.run_name}"] = view
    return names


def _without_hashes(runs: dict[str, RunView]) -> dict[str, RunView] | None:
    """The runs by name without the config hash; None when two would share a name."""
    stripped = {HASH_SUFFIX.sub("", name): view for name, view in runs.items()}
    return stripped if len(stripped) == len(runs) else None


def _by_lineage(runs: dict[str, RunView]) -> dict[str, RunView] | None:
    """A finetune's name hashes its pretraining run's id, which a rerun changes: such runs are
    named by what they are instead (kind, task, pretraining step, seed); None when two would
    share a name."""
    named = {}
    for name, view in runs.items():
        if view.tag(TAG_PRETRAIN_RUN):
            experiment = name.split("/", 1)[0]
            seed = view.run.data.params.get("train.seed", "")
            name = (
                f"{experiment}/{view.kind} {view.tag(TAG_TASK)} from step "
                f"{view.tag(TAG_PRETRAIN_STEP)} seed {seed}"
            )
        named[name] = view
    return named if len(named) == len(runs) else None


def _match(ours: dict, theirs: dict) -> tuple[dict, dict]:
    """By full name, without the hashes, or finetunes by lineage: whichever matches most runs."""
    best = (ours, theirs)
    for rename in (_without_hashes, _by_lineage):
        ours_r, theirs_r = rename(ours), rename(theirs)
        if ours_r is not None and theirs_r is not None:
            if len(set(ours_r) & set(theirs_r)) > len(set(best[0]) & set(best[1])):
                best = (ours_r, theirs_r)
    return best


def _keys(view: RunView) -> set[str]:
    return {key for key in view.run.data.metrics if not is_timing(key)}


def compare_stores(uri: str, other_uri: str, experiment: str | None = None) -> Reproduction:
    """Compare every run of ``uri`` (of ``experiment``, if given) with the run of the same name
    in ``other_uri``."""
    first, second = open_comparison(uri), open_comparison(other_uri)
    ours, theirs = _match(_runs_by_name(first, experiment), _runs_by_name(second, experiment))
    if not ours:
        raise CompareError(f"tracking URI {uri} holds no runs")
    result = Reproduction(unmatched=sorted(set(ours) ^ set(theirs)))
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        result.runs += 1
        keys_a, keys_b = _keys(a), _keys(b)
        result.one_sided += [f"{name}: {key}" for key in sorted(keys_a ^ keys_b)]
        for key in sorted(keys_a & keys_b):
            points_a = {m.step: m.value for m in first.history(a, key)}
            points_b = {m.step: m.value for m in second.history(b, key)}
            if set(points_a) != set(points_b):
                note = f"steps differ: {len(points_a)} against {len(points_b)} points"
                result.differences.append(Difference(name, key, math.inf, note))
                continue
            result.points += len(points_a)
            gaps = [
                abs(points_a[s] - points_b[s])
                for s in points_a
                if points_a[s] != points_b[s]
                and not (math.isnan(points_a[s]) and math.isnan(points_b[s]))
            ]
            if gaps:
                note = f"{len(gaps)} of {len(points_a)} points differ"
                result.differences.append(Difference(name, key, max(gaps), note))
    return result


def describe(result: Reproduction) -> str:
    """The comparison as console lines: the verdict, then each difference."""
    verdict = "identical" if result.identical else "DIFFERENT"
    lines = [
        f"{verdict}: {result.runs} runs matched by name, {result.points} metric points compared "
        f"(timing metrics left out: {', '.join(TIMING_MARKS)})"
    ]
    lines += [f"  only in one store: {name}" for name in result.unmatched]
    lines += [f"  logged by one run only: {item}" for item in result.one_sided]
    lines += [
        f"  {d.run}  {d.key}: max |difference| {d.max_abs:.3g} ({d.note})"
        for d in result.differences
    ]
    return "\n".join(lines)
