"""The demo's headline: the final checkpoint's finetune against scratch, over seeds, from MLflow."""

from __future__ import annotations

import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric

from pipeline import tracking
from pipeline.run.demo import EXPERIMENT, headline_top1, summary, tracking_uri


def _finished(uri: str, kind: str, top1: float, seed: int, step: int | None = None) -> None:
    tags = tracking.lineage_tags(kind, "digits", "p" * 32 if step else None, step)
    params = {"train": {"seed": seed}}
    run_id = tracking.create_run(
        uri, EXPERIMENT, f"{kind}-{step}-{seed}", params, "{}\n", tags=tags
    )
    metric = Metric("val/top1", top1, int(time.time() * 1000), 150)
    MlflowClient(uri).log_batch(run_id, metrics=[metric])
    tracking.end_run(uri, run_id)


def test_the_headline_is_the_final_checkpoint_against_scratch_over_seeds(tmp_path: Path) -> None:
    uri = tracking_uri(tmp_path)
    _finished(uri, "finetune", 0.9, 0, step=500)  # the best checkpoint is not the headline
    for seed, top1 in enumerate((0.60, 0.62, 0.64)):
        _finished(uri, "finetune", top1, seed, step=2000)
    for seed, top1 in enumerate((0.50, 0.52, 0.55)):
        _finished(uri, "scratch", top1, seed)

    top1 = headline_top1(uri, EXPERIMENT)
    assert sorted(top1["finetune"]) == [0.60, 0.62, 0.64]
    assert (top1["step 500"], top1["final step"]) == ([0.9], [2000.0])
    text = summary(tmp_path, "p" * 32, 8.25)
    assert "demo finished in 8.2 min" in text
    assert "final checkpoint (step 2000) 0.620 (0.600-0.640, 3 seeds)" in text
    assert "scratch 0.523 (0.500-0.550, 3 seeds); margin +0.097, outside the spread" in text
    assert "earlier checkpoints (one seed): step 500 0.900" in text


def test_overlapping_seeds_are_called_within_the_spread(tmp_path: Path) -> None:
    uri = tracking_uri(tmp_path)
    for seed, (ours, theirs) in enumerate(((0.60, 0.58), (0.55, 0.61))):
        _finished(uri, "finetune", ours, seed, step=2000)
        _finished(uri, "scratch", theirs, seed)
    text = summary(tmp_path, "p" * 32, 1.0)
    assert "margin -0.020, within the spread" in text
