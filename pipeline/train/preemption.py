"""What happens at each step boundary besides the step: checkpoints, and preemption notices.

Ray Train 2.60 watches the nodes of a run (``PreemptionWatcher``, polling Ray's drain state every
``RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S``, 5 s by default): when one is being drained — a spot
reclaim, ``ray drain-node``, the autoscaler's ``DrainNode`` — every worker is told, with the
drain's deadline, and ``ray.train.get_preemption_info()`` returns it, the same on every rank
(rank 0's, broadcast). Its controller then waits for the deadline (120 s when the drain has
none) and restarts the run from the latest registered checkpoint, on the nodes left.

Every ``checkpoint.preemption_check_every`` steps all ranks ask, at the same step, so that one
rank's notice makes all of them checkpoint at the same step boundary; between checks no
collective is made. On a notice the run checkpoints at once, waits for the upload, and holds
there until the restart: steps trained past the checkpoint would only be trained again.
``train/steps_lost`` counts the steps trained twice over the run's restarts: at each start,
the last step the run logged to MLflow minus the step it resumed from, added up.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pipeline.config import RunConfig
from pipeline.train import checkpoint as ckpt
from pipeline.train.nonfinite import NonfiniteStepError

log = logging.getLogger(__name__)

STEPS_LOST = "train/steps_lost"
# After the deadline, a held run waits this long for Ray Train's restart before it trains on
# (the drain was cancelled, or the controller does not act on it).
HOLD_MARGIN_S = 60.0


@dataclass(frozen=True)
class Boundary:
    """What to do after a step: checkpoint, wait for the upload, stop, or hold for a restart."""

    save: bool = False
    wait: bool = False  # the step waits for this checkpoint's upload
    stop: bool = False  # train.stop_after reached
    notice: Any = None  # Ray's PreemptionInfo: hold after the checkpoint


def deadline_of(notice: Any, now: float) -> float:
    """The drain's deadline (epoch seconds); Ray Train's own fallback when it has none."""
    if getattr(notice, "deadline_ms", None):
        return notice.deadline_ms / 1000
    from ray.train.v2._internal.constants import DEFAULT_PREEMPTION_DEADLINE_S

    return now + DEFAULT_PREEMPTION_DEADLINE_S


def steps_lost(logged: dict[str, int], resumed_from: int) -> int:
    """Steps trained before a restart that the run trains again: the last logged step of any
    metric minus the step it resumed from (0 for a run that logged nothing yet)."""
    return max(0, max(logged.values(), default=0) - resumed_from)


def record_steps_lost(uri: str, run_id: str, resumed_from: int) -> int | None:
    """Add this start's lost steps to the run's ``train/steps_lost``; return the new total, or
    None for a run that logged nothing before (a first start)."""
    from mlflow.entities import Metric

    # deferred: mlflow takes seconds to import, and only rank 0 logs
    from pipeline.tracking import last_logged_steps
    from pipeline.tracking.client import call_mlflow, client  # deferred: mlflow, as above

    logged = last_logged_steps(uri, run_id)
    if not logged:
        return None
    previous = client(uri).get_run(run_id).data.metrics.get(STEPS_LOST, 0.0)
    total = int(previous) + steps_lost(logged, resumed_from)
    # Straight to MLflow, not through the run's logger: a second restart from the same
    # checkpoint logs at the same step again, which the logger would drop as already sent.
    metric = Metric(STEPS_LOST, float(total), int(time.time() * 1000), resumed_from)
    call_mlflow(lambda: client(uri).log_batch(run_id, metrics=[metric]), "log steps_lost", 3, 0.5)
    return total


@dataclass(frozen=True)
class Notice:
    """A drain notice that another rank received: its deadline (epoch ms; None: none given)."""

    deadline_ms: int | None
    preempted_node_ids: tuple[str, ...] = ()


def local_notice() -> Any:
    """The PreemptionInfo Ray Train handed this worker, or None.

    Not ``ray.train.get_preemption_info()``: Ray relaxes that collective during a preemption, and
    with the drained node holding rank 1 the ranks were seen to part ways (no rank checkpointed
    and the run lost the steps since its last checkpoint). Each rank reads its own notice here,
    and ``agreed_notice`` makes them agree at the same step.
    """
    from ray.train.v2._internal.execution.context import get_train_context  # deferred: Ray

    try:
        return get_train_context().preemption_context.preemption_info
    except RuntimeError:  # not a Ray Train worker (the benchmarks' runs without Ray): no drains
        return None


def agreed_notice(local: Any) -> Any:
    """A notice on every rank if any rank has one (a max all-reduce over the training's process
    group, at the same step on every rank), else None; one process: its own."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    deadline = float(getattr(local, "deadline_ms", None) or 0)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    flags = torch.tensor([float(local is not None), deadline], dtype=torch.float64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if not flags[0]:
        return None
    return local or Notice(int(flags[1]) or None)


def barrier() -> None:
    """Wait for every rank of the run (nothing to wait for on one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StepBoundary:
    """Decides, after each step, whether to checkpoint, stop or hold (see the module doc)."""

    def __init__(
        self,
        config: RunConfig,
        total_steps: int,
        first_step: int,
        run_id: str | None,
        logger=None,
        milestones: bool = True,
    ) -> None:
        self.config, self.total_steps, self.logger = config, total_steps, logger
        self.uploads = ckpt.Uploads(config, run_id, logger, milestones)
        self.noticed = False
        if logger is not None and run_id is not None:
            total = record_steps_lost(config.tracking.uri, run_id, first_step)
            if total is not None:
                log.info(f"resumed at step {first_step}; {STEPS_LOST} over the run: {total}")

    @contextlib.contextmanager
    def settling(self) -> Iterator[None]:
        """Around the training loop: when it fails, the checkpoint still on its way to storage
        gets there first (it stays the restart point), then the failure goes on."""
        try:
            yield
        except NonfiniteStepError:
            # Every rank raises this one at the same step (the all-reduce spreads the flag): the
            # others wait for rank 0's upload, or Ray Train would stop rank 0 mid-upload as soon
            # as the first rank failed.
            with contextlib.suppress(Exception):
                self.uploads.wait()
                barrier()
            raise
        except BaseException:
            with contextlib.suppress(Exception):  # its own failure is Ray Train's to report
                self.uploads.wait()
            raise

    def after(self, step: int) -> Boundary:
        """The boundary after ``step`` (every rank calls it at every step)."""
        every, stop_after = self.config.checkpoint.every_steps, self.config.train.stop_after
        last = step == self.total_steps
        notice = None if last else self.notice(step)  # the last step finishes the run anyway
        stop = step == stop_after
        save = stop or notice is not None or last or step % every == 0
        return Boundary(
            save=save, wait=stop or last or notice is not None, stop=stop, notice=notice
        )

    def notice(self, step: int) -> Any:
        """Ray's PreemptionInfo when asked at ``step`` and a node of the run is being drained
        (once: the run holds after acting on it); None otherwise."""
        every = self.config.checkpoint.preemption_check_every
        if self.noticed or not every or step % every:
            return None
        notice = agreed_notice(local_notice())
        self.noticed = notice is not None
        return notice

    def hold(self, boundary: Boundary, step: int) -> None:
        """After the notice's checkpoint: wait for Ray Train to restart the run (it stops this
        worker), at most until the deadline plus HOLD_MARGIN_S; then train on."""
        if boundary.notice is None:
            return
        now = time.time()
        deadline = deadline_of(boundary.notice, now)
        if self.logger is not None:
            self.logger.flush()  # every step up to here is in MLflow: steps_lost stays exact
            nodes = getattr(boundary.notice, "preempted_node_ids", [])
            log.info(
                f"step {step}: node(s) {nodes} being drained, deadline in {deadline - now:.0f} s;"
                " checkpoint stored, waiting for Ray Train to restart the run"
            )
        time.sleep(max(0.0, deadline + HOLD_MARGIN_S - now))
        log.warning(f"step {step}: no restart by the drain's deadline; training goes on")
