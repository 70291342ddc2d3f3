"""The Ray cluster a run uses: joining or starting one, its token, its job states.

A driver joins the cluster at ``RAY_ADDRESS`` (as under ``ray job submit``) or starts a local one
bound to 127.0.0.1. A local cluster is stopped by signalling its own processes, never by
``ray stop`` (which stops every Ray on the machine).

Every cluster we start runs Ray's token authentication, and every client we open (drivers, job
submissions) carries the token, found where Ray looks for it: ``RAY_AUTH_TOKEN``, else the file
``RAY_AUTH_TOKEN_PATH`` names, else ``~/.ray/auth_token``. A token is generated into that file
when there is none. ``RAY_AUTH_MODE=disabled``, the user's explicit choice, turns it off, with one
warning.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError

log = logging.getLogger(__name__)

AUTH_MODE = "RAY_AUTH_MODE"
AUTH_TOKEN = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = "~/.ray/auth_token"  # Ray's default token file
TOKEN_HINT = (
    f"set {AUTH_TOKEN} to the cluster's token, or put it in {DEFAULT_TOKEN_FILE} (or in the file "
    f"{AUTH_TOKEN_PATH} names); see docs/cluster.md, 'Token authentication'"
)
# Set by Ray's job manager for a driver it starts: the job's runtime environment already reaches
# the workers (ray/_private/runtime_env/constants.py).
_SUBMITTED_JOB = "RAY_JOB_CONFIG_JSON_ENV_VAR"


class RayAuthError(ConfigError):
    """A Ray cluster refuses this process's token, or its lack of one; the message says the fix."""


# States of a Ray job (ray.job_submission.JobStatus) by outcome.
RAY_JOB_SUCCEEDED = frozenset({"SUCCEEDED"})
RAY_JOB_FAILED = frozenset({"FAILED", "STOPPED"})
RAY_JOB_ENDED = RAY_JOB_SUCCEEDED | RAY_JOB_FAILED


def job_state(status: Any) -> str:
    """``"SUCCEEDED"`` from a JobStatus or its text (``"JobStatus.SUCCEEDED"``)."""
    return str(status).split(".")[-1]


def auth_disabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the user switched Ray's token authentication off (``RAY_AUTH_MODE=disabled``)."""
    env = os.environ if env is None else env
    return env.get(AUTH_MODE, "").strip().lower() == "disabled"


@functools.cache
def _warn_disabled() -> None:
    log.warning(
        f"warning: {AUTH_MODE}=disabled: this Ray cluster takes jobs and runs code from anyone "
        f"who can reach its ports; unset {AUTH_MODE} to use token authentication"
    )


def token_file(env: Mapping[str, str] | None = None) -> Path:
    """The file Ray reads the token from: ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    env = os.environ if env is None else env
    return Path(env.get(AUTH_TOKEN_PATH) or DEFAULT_TOKEN_FILE).expanduser()


def read_token(env: Mapping[str, str] | None = None) -> str | None:
    """The token this process holds, looked up as Ray does; None when it holds none."""
    env = os.environ if env is None else env
    token = env.get(AUTH_TOKEN, "").strip()
    if token:
        return token
    try:
        return token_file(env).read_text().strip() or None
    except OSError:  # no token file (yet)
        return None


def ensure_token(env: Mapping[str, str] | None = None) -> str:
    """The token, generated first when there is none: 32 random bytes in hex, as Ray's
    ``ray get-auth-token --generate``, written whole into ``token_file`` readable by its owner only.
    """
    token = read_token(env)
    if token:
        return token
    path = token_file(env)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    os.replace(partial, path)
    log.info(f"generated a Ray authentication token in {path}")
    return token


def ray_auth_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``RAY_AUTH_MODE`` for a cluster we start and the processes that talk to it: ``token`` (a
    token generated where Ray looks when there is none yet), or ``disabled`` when the user says
    so, with one warning."""
    if auth_disabled(env):
        _warn_disabled()
        return {AUTH_MODE: "disabled"}
    ensure_token(env)
    return {AUTH_MODE: "token"}


def auth_headers(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The ``Authorization`` header carrying this process's token; empty without one."""
    token = None if auth_disabled(env) else read_token(env)
    return {"Authorization": f"Bearer {token}"} if token else {}


def use_token_auth() -> bool:
    """Make this process's Ray clients send the token (``RAY_AUTH_MODE=token``) when it holds
    one and the user did not disable authentication; whether they now do."""
    if auth_disabled():
        _warn_disabled()
        return False
    if read_token() is None:
        return False
    os.environ[AUTH_MODE] = "token"
    from ray._raylet import (
        AuthenticationMode,
        AuthenticationTokenLoader,
        Config,
        get_authentication_mode,
    )

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        # Ray reads RAY_AUTH_MODE into its config once, when it is imported: read it again, as
        # ray.init does when it turns authentication on for a new local cluster.
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    return True


def check_token(address: str) -> None:
    """Raise RayAuthError if the cluster whose GCS is at ``address`` (``host:port``) refuses this
    process's token, or asks for one it does not have; ConfigError if what answers there is not a
    GCS. Answers in a second, where ``ray.init`` would retry for half a minute and then only say
    that it could not connect."""
    if "://" in address or address in ("auto", "local"):
        return  # Ray Client (ray://) and local clusters: ray.init's own checks
    use_token_auth()
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    try:
        GcsClient(address=address)  # its first call (the cluster id) is authenticated
    except AuthenticationError:
        raise RayAuthError(_refusal(f"the Ray cluster at {address}")) from None
    except Exception as exc:  # RpcError: what answers there is not Ray's GCS (after 40 s)
        raise ConfigError(f"cannot reach Ray's GCS at {address}: {exc}") from None


def _refusal(what: str) -> str:
    if auth_disabled():
        return f"{what} asks for a token but {AUTH_MODE}=disabled: unset it, then {TOKEN_HINT}"
    if read_token() is None:
        return f"{what} asks for a token and this process has none: {TOKEN_HINT}"
    source = AUTH_TOKEN if os.environ.get(AUTH_TOKEN, "").strip() else str(token_file())
    return f"{what} refused the token from {source}: {TOKEN_HINT}"


def job_client(address: str) -> Any:
    """Ray's ``JobSubmissionClient`` for the job server at ``address`` (``http://host:port``),
    sending this process's token (RayAuthError when the server refuses it). The header is given
    explicitly: Ray's client adds one only when its cached ``RAY_AUTH_MODE`` is ``token``."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError:
        raise RayAuthError(_refusal(f"Ray's job server at {address}")) from None


def local_ray_env(**extra: str) -> dict[str, str]:
    """The environment of a local Ray cluster and the jobs it runs, plus ``extra``.

    This interpreter's ``bin`` comes first on ``PATH``, so ``python`` in a job's entrypoint is the
    project's; DeepSpeed runs on the CPU; no usage statistics; token authentication on (the
    cluster, the ``ray`` CLI and every driver find the same token), unless the user set
    ``RAY_AUTH_MODE=disabled``.
    """
    env = dict(os.environ)
    env.update(
        PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
        DS_ACCELERATOR="cpu",
        RAY_USAGE_STATS_ENABLED="0",
    )
    env.update(extra)
    env.update(ray_auth_env(env))
    return env


def _driver_runtime_env() -> dict[str, Any] | None:
    # The workers of a cluster joined from outside do not share the driver's environment: the
    # MLflow credentials rank 0 logs with travel in the job's runtime environment (readable, like
    # everything on the cluster, only with the cluster's token). A driver started by `ray job
    # submit` shares its environment's sources with the workers already.
    if _SUBMITTED_JOB in os.environ:
        return None
    # deferred: pipeline.tracking imports MLflow (a second), which the Ray fixtures do not need
    from pipeline.tracking.uri import CREDENTIAL_VARIABLES

    env_vars = {name: os.environ[name] for name in CREDENTIAL_VARIABLES if os.environ.get(name)}
    return {"env_vars": env_vars} if env_vars else None


# Set in the driver's environment, from which Ray Train hands them on to its controller and
# workers (ENV_VARS_TO_PROPAGATE in ray/train/v2/_internal/constants.py). A print() on a worker
# stays a plain print: Ray Train's patch would write it to stdout and, through the root logger,
# to the console a second time (DeepSpeed prints as it starts).
RAY_TRAIN_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address``/``RAY_ADDRESS`` with this process's token, or start a local
    one on 127.0.0.1 with token authentication.

    A local cluster serves this driver alone, so it starts no workers ahead (Ray Train's actors
    carry their own environment and cannot use them: one idle process per CPU, ~0.7 CPU-seconds
    each) and exports no metrics (no Prometheus reads them). Its dashboard stays: Ray Train's
    placement-group cleaner asks the dashboard's state API whether the controller lives.
    """
    import ray

    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        use_token_auth()
        ray.init(address=address, log_to_driver=True, runtime_env=_driver_runtime_env())
    else:
        os.environ.update(ray_auth_env())
        use_token_auth()
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _system_config={
                "enable_worker_prestart": False,
                "prestart_worker_first_driver": False,
                "enable_metrics_collection": False,
            },
        )


def ray_head_answers(dashboard_url: str, timeout: float = 2.0) -> bool:
    """Whether a Ray job server answers at ``dashboard_url`` (``http://host:port``)."""
    try:
        urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answers (401 with token authentication)
    except OSError:
        return False
    return True


def stop_ray_processes(
    marks: Sequence[str], sig: int = signal.SIGTERM, grace: float | None = None
) -> int:
    """Signal the processes of one local Ray cluster and all their descendants; with ``grace``,
    kill those still alive that many seconds later.

    A process belongs to the cluster when its command line holds a mark (its ``--temp-dir``, its
    GCS address). Ray's agents retitle themselves ("ray::DashboardAgent") and hold no mark, so
    descendants are signalled too: an agent whose raylet is gone keeps writing into the cluster's
    folder. A GCS can hang in its SIGTERM shutdown, flushing events to an agent that is already
    gone: the grace period ends that. Returns how many processes were signalled.
    """
    import psutil

    me = os.getpid()
    targets: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if process.pid == me or not any(mark in cmdline for mark in marks):
            continue
        targets[process.pid] = process
        try:
            targets.update({child.pid: child for child in process.children(recursive=True)})
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    targets.pop(me, None)
    signalled = 0
    for process in targets.values():
        try:
            process.send_signal(sig)
            signalled += 1
        except psutil.Error:  # gone meanwhile
            pass
    if grace is not None:
        _, alive = psutil.wait_procs(list(targets.values()), timeout=grace)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:  # gone meanwhile
                pass
    return signalled
