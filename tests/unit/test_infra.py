"""The cluster files in infra/: Ray accepts the launcher YAML, every file runs the one image built
from infra/Dockerfile, the pins match pyproject.toml, commands name real modules and valid
configs, and no secret value is written anywhere."""

import importlib.util
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml

from pipeline.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "ray-cluster.yaml"
RAYCLUSTER = INFRA / "kuberay" / "raycluster.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
AUTH_INI = INFRA / "mlflow" / "basic_auth.ini"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"
PAPER_CONFIG = ROOT / "configs" / "pretrain" / "nfnet_f0.yaml"

# Environment names whose values are credentials or carry them (a tracking URI may hold a password).
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|_USER$|USERNAME|TRACKING_URI|STORE_URI")
# Compose interpolation: ${VAR}, ${VAR:-default}, ${VAR:?message} (and the forms without colon).
REFERENCE = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    """``{"torch": "2.14.1", ...}`` from the exact pins of pyproject.toml (extras dropped)."""
    pins = {}
    project = _pyproject()["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["dev"]:
        name, version = requirement.split("==")
        pins[name.split("[")[0].lower()] = version
    return pins


def _image() -> str:
    """The image name and tag, declared once: the ``export IMAGE=...`` line of infra/README.md."""
    found = re.findall(r"^export IMAGE=(\S+)$", (INFRA / "README.md").read_text(), re.M)
    assert len(found) == 1, "infra/README.md must declare the image exactly once"
    return found[0]


def _walk(node: Any, key: str):
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(node, dict):
        for name, value in node.items():
            if name == key:
                yield value
            yield from _walk(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, key)


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _prepared_launcher() -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(yaml.safe_load(LAUNCHER.read_text()))


def _containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [container for group in _walk(manifest, "containers") for container in group]


# --- the image ---------------------------------------------------------------------------------


def test_image_is_declared_once_and_tagged_with_the_project_version():
    name, _, tag = _image().rpartition(":")
    assert name.endswith("/nfnet-pipeline")
    assert tag == _pyproject()["project"]["version"] == "0.1.0"
    assert re.findall(r"export IMAGE=(\w\S*)", CLUSTER_DOC.read_text()) == [_image()]


def test_dockerfile_pins_equal_pyproject_pins():
    text = DOCKERFILE.read_text()
    pinned = dict(re.findall(r"\b([A-Za-z][\w.-]*)==(\d[\w.]*)", text))
    assert set(pinned) == {"torch", "torchvision"}
    pins = _pins()
    for package, version in pinned.items():
        assert version == pins[package], (
            f"{package}: Dockerfile {version}, pyproject {pins[package]}"
        )
    # The rest is installed from pyproject.toml itself, so it cannot drift.
    assert "tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']" in text


def test_dockerfile_builds_on_cuda_with_python_311_as_a_non_root_user():
    lines = DOCKERFILE.read_text().splitlines()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert len(bases) == 1
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", bases[0])
    assert any("python3.11 -m venv" in line for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    (uid,) = re.findall(r"useradd .*--uid (\d+)", DOCKERFILE.read_text())
    pods = [user for path in (RAYCLUSTER, RAYJOB) for user in _walk(_load_all(path), "runAsUser")]
    assert len(pods) == 5 and set(pods) == {int(uid)}  # the pods run as the image's user
    # DeepSpeed must find CUDA on the GPU nodes: the CPU accelerator of the tests stays out.
    assert not [line for line in lines if "DS_ACCELERATOR=" in line]


def test_dockerfile_copies_the_code_configs_and_jobs_and_its_ignore_file_lets_them_through():
    copied = [
        line.split()[1:-1]
        for line in DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
    ]
    sources = {source.rstrip("/") for group in copied for source in group}
    assert sources == {"pyproject.toml", "README.md", "pipeline", "configs", "jobs"}
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") :].count("*") == 1
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert allowed == sources
    for source in sources:
        assert (ROOT / source).exists()


# --- the Ray cluster launcher ------------------------------------------------------------------


def test_launcher_passes_rays_own_cluster_config_validation():
    from ray.autoscaler._private.util import validate_config

    validate_config(_prepared_launcher())


def test_the_validation_rejects_a_misspelt_launcher_key():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(LAUNCHER.read_text())
    config["available_node_types"]["gpu_worker"]["min_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="'min_worker' was unexpected"):
        validate_config(prepare_config(config))


def test_launcher_runs_our_image_and_downloads_nothing_else_at_run_time():
    config = _prepared_launcher()
    assert config["docker"]["image"] == _image()
    # Ray's AWS defaults pip-install Ray from the internet unless these are given (empty).
    for key in ("initialization_commands", "setup_commands"):
        assert config[key] == []
    assert config["head_setup_commands"] == config["worker_setup_commands"] == []
    started = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert not re.search(r"pip |curl |wget |https?://", started)
    assert "--dashboard-host=127.0.0.1" in started


def test_launcher_starts_every_node_with_token_authentication_and_the_laptops_credentials():
    config = _prepared_launcher()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [command for command in config[key] if "ray start" in command]
        assert start.startswith("export RAY_AUTH_MODE=token;"), key
        assert "RAY_AUTH_TOKEN=" not in start  # the token travels as a file, never in a command
    # Ray reads ~/.ray/auth_token; MLflow's client reads ~/.mlflow/credentials.
    assert config["file_mounts"] == {
        "~/.ray/auth_token": "~/.ray/auth_token",
        "~/.mlflow/credentials": "~/.mlflow/credentials",
    }


def test_launcher_workers_are_a_fixed_pool_of_the_f0_configs_32_gpus():
    config = _prepared_launcher()
    plan = load_config(PAPER_CONFIG)
    workers = config["available_node_types"]["gpu_worker"]
    head = config["available_node_types"][config["head_node_type"]]
    assert workers["min_workers"] == workers["max_workers"] == config["max_workers"] == 4
    assert workers["resources"]["GPU"] == 8
    assert config["docker"]["worker_run_options"] == ["--gpus all"]
    assert "--gpus all" not in config["docker"]["run_options"]
    assert workers["max_workers"] * workers["resources"]["GPU"] == plan.scaling.num_workers == 32
    assert workers["resources"]["CPU"] >= 8 * plan.scaling.cpus_per_worker
    assert head["max_workers"] == 0 and "GPU" not in head["resources"]


# --- KubeRay -----------------------------------------------------------------------------------


def test_kuberay_manifests_are_ray_io_v1_raycluster_and_rayjob():
    kinds = [
        (doc["apiVersion"], doc["kind"]) for path in (RAYCLUSTER, RAYJOB) for doc in _load_all(path)
    ]
    assert kinds == [("ray.io/v1", "RayCluster"), ("ray.io/v1", "RayJob")]


def test_rayjob_runs_the_same_cluster_spec_as_the_raycluster():
    (cluster,) = _load_all(RAYCLUSTER)
    (job,) = _load_all(RAYJOB)
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert cluster["spec"]["rayVersion"] == _pins()["ray"]


def test_every_kuberay_container_runs_our_image():
    images = [image for path in (RAYCLUSTER, RAYJOB) for image in _walk(_load_all(path), "image")]
    assert len(images) == 5  # head + workers in each file, and the job's submitter
    assert set(images) == {_image()}


def test_kuberay_gpu_workers_provide_the_f0_configs_32_gpus():
    plan = load_config(PAPER_CONFIG)
    (cluster,) = _load_all(RAYCLUSTER)
    (group,) = cluster["spec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    assert requests == limits  # Guaranteed QoS: a training pod is never the one evicted
    assert limits["nvidia.com/gpu"] == 8
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    assert group["replicas"] * limits["nvidia.com/gpu"] == plan.scaling.num_workers == 32
    assert int(limits["cpu"]) >= 8 * plan.scaling.cpus_per_worker


def test_kuberay_credentials_come_only_from_the_secret_the_example_env_file_lists():
    example = (INFRA / "kuberay" / "credentials.env.example").read_text()
    entries = dict(re.findall(r"^(?:# )?([A-Z_]+)=(.*)$", example, re.M))
    required = set(re.findall(r"^([A-Z_]+)=", example, re.M))  # the uncommented lines
    assert set(entries.values()) == {""}  # the example holds names, never values
    seen, optional = set(), set()
    for path in (RAYCLUSTER, RAYJOB):
        for container in _containers(_load_all(path)[0]):
            for variable in container.get("env", []):
                assert "value" not in variable, f"{path.name}: {variable['name']} is inline"
                reference = variable["valueFrom"]["secretKeyRef"]
                assert reference["name"] == "nfnet-credentials"
                assert reference["key"] == variable["name"]
                seen.add(variable["name"])
                if reference.get("optional"):
                    optional.add(variable["name"])
    assert seen == set(entries) and len(seen) == 7
    tracking = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert seen - optional == required == tracking


def test_kuberay_clusters_run_token_authentication_with_the_token_from_its_secret():
    specs = [_load_all(RAYCLUSTER)[0]["spec"], _load_all(RAYJOB)[0]["spec"]["rayClusterSpec"]]
    for spec in specs:
        assert spec["authOptions"] == {"mode": "token", "secretName": "nfnet-ray-token"}
    # KubeRay sets RAY_AUTH_MODE and RAY_AUTH_TOKEN itself: no manifest names them.
    for path in (RAYCLUSTER, RAYJOB):
        assert "RAY_AUTH" not in "".join(
            line for line in path.read_text().splitlines() if not line.startswith("#")
        )
    creating = "kubectl create secret generic nfnet-ray-token"
    for path in (RAYCLUSTER, RAYJOB, INFRA / "README.md", CLUSTER_DOC):
        assert creating in path.read_text(), path.name


def _entrypoint_parts(entrypoint: str) -> tuple[str, str, list[str]]:
    """(module, config path, overrides) of ``python -m MODULE --config PATH key=value ...``."""
    words = shlex.split(entrypoint)
    assert words[:2] == ["python", "-m"] and words[3] == "--config"
    return words[2], words[4], words[5:]


def test_rayjob_entrypoint_names_an_importable_module_and_a_valid_config():
    (job,) = _load_all(RAYJOB)
    module, config_path, overrides = _entrypoint_parts(job["spec"]["entrypoint"])
    assert importlib.util.find_spec(module) is not None
    assert module == "pipeline.pretrain"
    # The job's working directory is the image's /app, which holds the repository's configs/.
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == {"working_dir": "/app"}
    assert (ROOT / config_path).is_file()
    # The submitter's shell expands $MLFLOW_TRACKING_URI: its container must get it.
    (submitter,) = job["spec"]["submitterPodTemplate"]["spec"]["containers"]
    provided = {variable["name"] for variable in submitter["env"]}
    expanded = []
    for override in overrides:
        names = re.findall(r"\$(\w+)", override)
        assert set(names) <= provided
        expanded.append(re.sub(r"\$(\w+)", "http://mlflow.example:5000", override))
    config = load_config(ROOT / config_path, expanded)
    assert config.tracking.uri == "http://mlflow.example:5000"
    assert config.data.train_url.startswith("s3://")
    assert config.checkpoint.storage_url.startswith("s3://")


COMMAND_FILES = [
    LAUNCHER,
    RAYCLUSTER,
    RAYJOB,
    DOCKERFILE,
    COMPOSE,
    INFRA / "README.md",
    CLUSTER_DOC,
]


@pytest.mark.parametrize("path", COMMAND_FILES, ids=lambda path: path.name)
def test_every_module_and_config_a_command_names_exists(path):
    text = path.read_text()
    for module in re.findall(r"python -m (pipeline[\w.]*)", text):
        assert importlib.util.find_spec(module) is not None, f"{path.name}: {module}"
    for config_path in re.findall(r"--config (\S+\.yaml)", text):
        assert isinstance(load_config(ROOT / config_path), RunConfig), f"{path.name}: {config_path}"


def test_the_commands_name_the_paper_config_in_every_cluster_file():
    for path in (LAUNCHER, RAYCLUSTER, RAYJOB, CLUSTER_DOC):
        assert "configs/pretrain/nfnet_f0.yaml" in path.read_text(), path.name


# --- the MLflow tracking server ----------------------------------------------------------------


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _with_defaults(text: str) -> str:
    """Compose's interpolation with an empty environment: ``${VAR:-default}`` -> default."""
    return REFERENCE.sub(lambda match: match.group(3) if match.group(2) == "-" else "", text)


def test_compose_runs_mlflow_postgres_minio_and_creates_the_bucket():
    services = _compose()["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "mlflow"}
    bucket_step = services["create-bucket"]
    assert "mc mb --ignore-existing" in " ".join(bucket_step["command"])
    assert bucket_step["depends_on"]["minio"]["condition"] == "service_healthy"
    depends = services["mlflow"]["depends_on"]
    assert depends["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["mlflow"]["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")


def test_compose_binds_every_published_port_to_loopback_by_default():
    published = []
    for name, service in _compose()["services"].items():
        for mapping in service.get("ports", []):
            host, host_port, container_port = _with_defaults(mapping).split(":")
            assert host == "127.0.0.1", f"{name}: {mapping}"
            published.append(int(host_port))
    assert sorted(published) == [5000, 9000, 9001]  # Postgres is reachable only inside


def test_compose_mlflow_version_equals_pyproject_pin():
    mlflow = _compose()["services"]["mlflow"]
    version = _pins()["mlflow"]
    assert mlflow["build"]["args"]["MLFLOW_VERSION"] == version
    assert mlflow["image"].endswith(f":{version}")
    dockerfile = (INFRA / "mlflow" / mlflow["build"]["dockerfile"]).read_text()
    assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile  # the basic-auth app's Flask-WTF


def test_compose_mlflow_runs_the_basic_auth_app_with_settings_that_hold_no_secret():
    import configparser

    mlflow = _compose()["services"]["mlflow"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    assert command[command.index("--app-name") + 1] == "basic-auth"
    environment = mlflow["environment"]
    assert environment["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    # The admin and the form-signing key come from .env and are required (${VAR:?message}).
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
        (reference,) = REFERENCE.findall(environment[key])
        assert reference[:2] == (key, "?")
    settings = configparser.ConfigParser()
    settings.read(AUTH_INI)
    assert set(settings["mlflow"]) == {
        "default_permission", "database_uri", "authorization_function",
        "grant_default_workspace_access",
    }  # fmt: skip
    # The user store lives on the compose file's own volume, not in the container.
    volume, _, mount = next(v for v in mlflow["volumes"] if v.startswith("mlflow-auth:")).partition(
        ":"
    )
    assert settings["mlflow"]["database_uri"] == f"sqlite:///{mount}/basic_auth.db"
    assert volume in _compose()["volumes"]


def test_compose_holds_no_secret_values_only_references_to_the_env_file():
    example = (INFRA / "mlflow" / ".env.example").read_text().splitlines()
    declared = dict(line.split("=", 1) for line in example if line and not line.startswith("#"))
    referenced, checked = set(), 0
    for name, service in _compose()["services"].items():
        for key, value in service.get("environment", {}).items():
            referenced |= {match.group(1) for match in REFERENCE.finditer(value)}
            if not SECRET_NAME.search(key):
                continue
            checked += 1
            literal = REFERENCE.sub("", value)
            if key.endswith("_URI"):  # user and password inside the URL: references only
                (userinfo,) = re.findall(r"://([^@/]*)@", literal)
                assert userinfo == ":", f"{name}.{key}"
            else:
                assert literal == "", f"{name}.{key} holds a literal value"
    assert checked == 12
    assert referenced <= set(declared)
    for key, value in declared.items():
        if re.search(r"PASSWORD|SECRET|ROOT_USER", key):
            assert value == "", f".env.example must not hold a value for {key}"
    ignored = (INFRA / ".gitignore").read_text().split()
    assert "mlflow/.env" in ignored and "kuberay/credentials.env" in ignored


# --- docs/cluster.md ---------------------------------------------------------------------------


def test_cluster_doc_table_names_real_config_keys():
    rows = re.findall(r"^\| `([a-z_]+)\.([a-z_]+)` \|", CLUSTER_DOC.read_text(), re.M)
    assert len(rows) >= 10
    for section, field in rows:
        assert field in RunConfig.model_fields[section].annotation.model_fields, (section, field)


def test_cluster_doc_worked_example_matches_the_paper_config():
    from pipeline.train.plan import make_plan

    config = load_config(PAPER_CONFIG)
    # ImageNet-1k: 1000 classes, 1,281,167 training and 50,000 validation images.
    plan = make_plan(config, 1000, 1_281_167, 50_000)
    assert (plan.num_workers, plan.micro_batch, plan.accumulation_steps) == (32, 32, 4)
    assert plan.global_batch == 32 * 32 * 4 == 4096
    assert plan.peak_lr == pytest.approx(0.1 * 4096 / 256) == 1.6
    assert plan.clipping == 0.01
    text = CLUSTER_DOC.read_text()
    assert f"{plan.total_steps} steps in all" in text
    assert f"warm-up {plan.warmup_steps} steps" in text
