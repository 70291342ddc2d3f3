"""The run config: typed sections read from YAML, with dotted command-line overrides.

Every section forbids unknown keys, so a typo fails at start-up with the key and the file named,
not an hour into a run. ``None`` in a recipe field means "the variant's or the paper's default",
resolved where the default lives (the variant table in ``pipeline.models``, the recipe in
``pipeline.optim``), so no default is written twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EXIT_BAD_INPUT = 2  # bad input: a config key, argument, path or URL that cannot be used


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and the file."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    """Which network to build."""

    name: str = Field(
        "nfnet_f0", description="registered model name (python -m pipeline.models list)"
    )
    num_classes: int | None = Field(None, gt=0, description="None: the dataset's class count")
    drop_rate: float | None = Field(None, ge=0, lt=1, description="None: the variant's dropout")
    stochdepth_rate: float | None = Field(None, ge=0, lt=1, description="None: variant default")
    padding: Literal["same", "symmetric"] | None = Field(
        None, description="same: TensorFlow SAME (exact to the paper); symmetric: faster"
    )
    numerics: Literal["official", "timm"] = "official"


class DataSection(Section):
    """Where the shards are and how they are read and augmented."""

    train_url: str = Field(
        "file://data/shapes", min_length=1, description="fsspec URL of the training shards"
    )
    val_url: str | None = Field(None, description="None: the validation split next to train_url")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options")
    train_resolution: int | None = Field(None, gt=0, description="None: the variant's")
    test_resolution: int | None = Field(None, gt=0, description="None: the variant's")
    randaugment_layers: int | None = Field(None, ge=0)
    randaugment_magnitude: int | None = Field(None, ge=0, le=30)
    crop_min_area: float = Field(
        0.08, gt=0, le=1, description="DM dataset.py: Inception crop area (0.08, 1)"
    )
    eval_padding: int = Field(
        32, ge=0, description="DM dataset.py resize_crop_32: resize to test+32, centre-crop test"
    )
    mixup_alpha: float = Field(0.2, ge=0, description="DM experiment_nfnets.py: Beta(0.2, 0.2)")
    cutmix: bool = Field(True, description="DM: CutMix on the other half of each batch")
    shuffle_buffer: int = Field(1000, ge=0)
    loader_workers: int = Field(2, ge=0)
    streams: int | None = Field(
        None,
        gt=0,
        description="canonical training streams, fixed for the run's life (resume on any worker "
        "count keeps the data); a multiple of global/micro batch; None: global/micro batch",
    )
    train_samples: int | None = Field(None, gt=0, description="epoch size; None: from _info.json")
    augment_before_mix: bool = Field(
        False,
        description="DM experiment_nfnets.py default False: mix pairs of images first, then "
        "RandAugment the mixed image (each output decodes two); true: augment, then mix",
    )
    prefetch_shards: int = Field(
        1, ge=0, description="shards each stream fetches ahead while it decodes the current one"
    )
    allow_pipe: bool = Field(False, description="allow pipe: URLs (runs a shell command)")


class OptimSection(Section):
    """SGD with AGC and the paper's schedule."""

    lr: float | None = Field(None, gt=0, description="peak lr; None: lr_per_256 * batch / 256")
    lr_per_256: float = Field(0.1, gt=0, description="DM experiment_nfnets.py: 0.1 * B / 256")
    momentum: float = Field(0.9, ge=0, lt=1, description="DM: Nesterov momentum 0.9")
    nesterov: bool = True
    weight_decay: float = Field(2e-5, ge=0, description="DM experiment_nfnets.py: 2e-5")
    clipping: float | None = Field(None, gt=0, description="AGC lambda; None: by global batch")
    use_agc: bool = Field(True, description="false: plain Nesterov SGD (for ablations)")
    agc_eps: float = Field(1e-3, gt=0, description="DM optim.py: eps 1e-3")
    warmup_epochs: float = Field(5.0, ge=0, description="DM experiment.py: 5 warm-up epochs")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="DM experiment_nfnets.py: 0.1")
    ema_decay: float = Field(0.99999, gt=0, lt=1, description="DM experiment_nfnets.py")


class TrainSection(Section):
    """Batch, length and numerics of the run."""

    global_batch: int = Field(4096, gt=0, description="DM experiment_nfnets.py: 4096")
    micro_batch: int = Field(32, gt=0, description="per worker per forward/backward")
    epochs: float = Field(360, gt=0, description="DM experiment_nfnets.py: 360 epochs")
    steps: int | None = Field(None, gt=0, description="None: epochs * train_samples / batch")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU")
    zero_stage: Literal[0, 1, 2] = 0
    channels_last: bool | None = Field(
        None, description="NHWC activations; None: on (nfnet_micro trains ~8 % faster on CPU)"
    )
    seed: int = 0
    stop_after: int | None = Field(
        None, gt=0, description="leave after this step as if preempted; run again to resume"
    )
    log_every: int = Field(10, gt=0)
    time_allreduce: bool = Field(
        False, description="time the gradient all-reduce (metric train/allreduce_fraction)"
    )
    eval_every: int = Field(1000, gt=0)
    eval_precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="DM experiment_nfnets.py: evaluation in fp32 (bf16 only in training)"
    )
    compile: bool | None = Field(
        None, description="torch.compile the model; None: on for GPU, off for CPU"
    )
    eval_batches: int | None = Field(None, gt=0, description="None: the whole validation split")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip",
        description="a step whose gradient (or loss) is NaN/Inf: skip its update and count it "
        "(train/nonfinite_steps), or stop the run",
    )
    max_nonfinite_in_a_row: int = Field(
        10, gt=0, description="under nonfinite=skip, stop after this many skipped steps in a row"
    )


class CheckpointSection(Section):
    """Where and how often checkpoints are written."""

    storage_url: str = Field(
        "file://runs", min_length=1, description="Ray Train storage: file:// or s3://"
    )
    storage_options: dict[str, Any] = Field(default_factory=dict)
    every_steps: int = Field(1000, gt=0)
    keep: int = Field(3, gt=0, description="checkpoints kept by Ray Train")
    async_upload: bool = Field(
        True,
        description="upload in the background while training goes on (a checkpoint counts "
        "once its upload completed); false: the step waits for the upload",
    )
    upload_nice: int = Field(
        10, ge=0, le=19, description="nice level of the process that uploads each checkpoint"
    )
    preemption_check_every: int = Field(
        10,
        ge=0,
        description="steps between checks for a preemption notice (a node of the run drained); "
        "on one, checkpoint at that step and wait for the restart; 0: never check",
    )


class TrackingSection(Section):
    """MLflow."""

    uri: str = Field("sqlite:///mlflow.db", min_length=1, description="MLflow tracking URI")
    experiment: str = "nfnet-pretrain"
    run_name: str | None = None
    registered_model: str | None = Field(None, description="None: no model registration")


class ScalingSection(Section):
    """Ray cluster and workers."""

    ray_address: str | None = Field(None, description="None: RAY_ADDRESS or a local cluster")
    num_workers: int | tuple[int, int] = Field(
        1, description="[min, max]: an elastic run (Ray Train restarts it on the workers it has)"
    )
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="an elastic run checks this often whether it can grow (Ray's 60)"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(0, ge=-1, description="-1: retry forever")
    peak_tflops: float | None = Field(
        None, gt=0, description="the device's peak for train/mfu; None: table by name or probe"
    )

    @model_validator(mode="after")
    def _workers_positive(self) -> ScalingSection:
        low, high = self.worker_range
        if low < 1 or high < low:
            raise ValueError(
                f"scaling.num_workers: {self.num_workers} is not a worker count (at least 1) or "
                "a range [min, max] with 1 <= min <= max"
            )
        if low < high and self.max_failures == 0:
            raise ValueError(
                f"scaling.max_failures: 0 ends an elastic run (scaling.num_workers: "
                f"{list(self.worker_range)}) at its first lost worker instead of shrinking it; "
                "set it to the restarts allowed, or -1 for no limit"
            )
        return self

    @property
    def worker_range(self) -> tuple[int, int]:
        """(min, max) workers; the same number twice for a fixed-size run."""
        n = self.num_workers
        return (n, n) if isinstance(n, int) else n

    @property
    def max_workers(self) -> int:
        """The most workers the run starts with: what the plan is made for."""
        return self.worker_range[1]


class RunConfig(Section):
    """A whole run: one section per component."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)

    @model_validator(mode="after")
    def _batch_divides(self) -> RunConfig:
        low, high = self.scaling.worker_range
        for workers in range(low, high + 1):  # an elastic run may run on any count in its range
            per_step = self.train.micro_batch * workers
            if self.train.global_batch % per_step:
                raise ValueError(
                    f"train.global_batch={self.train.global_batch} is not divisible by "
                    f"train.micro_batch × scaling.num_workers = {self.train.micro_batch} × "
                    f"{workers} = {per_step}; choose a micro-batch or worker count "
                    "that divides it"
                    + (
                        f" (an elastic run may run on any count in {low}..{high})"
                        if low < high
                        else ""
                    )
                )
        return self

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per worker per optimizer step: global = micro × accumulation × workers
        (on the most workers an elastic run has)."""
        return self.train.global_batch // (self.train.micro_batch * self.scaling.max_workers)

    def with_absolute_paths(self) -> RunConfig:
        """A copy whose local paths and file:// URLs are absolute.

        Ray Train workers and Ray jobs run in directories of their own, so a relative
        ``file://data`` must be resolved where the command was typed.
        """
        copy = self.model_copy(deep=True)
        copy.data.train_url = absolute_url(copy.data.train_url)
        if copy.data.val_url:
            copy.data.val_url = absolute_url(copy.data.val_url)
        copy.checkpoint.storage_url = absolute_url(copy.checkpoint.storage_url)
        copy.tracking.uri = absolute_sqlite_uri(copy.tracking.uri)
        return copy

    def flat(self) -> dict[str, Any]:
        """The config as ``{"section.key": value}``, the form MLflow params take."""
        return flatten(self.model_dump(mode="json"), max_depth=2)


def absolute_url(url: str) -> str:
    """``file://rel/path`` or ``rel/path`` -> ``file:///abs/path``; other URLs unchanged."""
    if url.startswith("file://"):
        path = url.removeprefix("file://")
    elif "://" not in url and ":" not in url.split("/")[0]:
        path = url
    else:
        return url
    return f"file://{Path(path).resolve()}"


def absolute_sqlite_uri(uri: str) -> str:
    """``sqlite:///rel.db`` -> ``sqlite:////abs/rel.db``, so every process finds the same file."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri.removeprefix("sqlite:///")
        if path and not path.startswith(":memory:"):
            return "sqlite:///" + str(Path(path).resolve())
    return uri


def flatten(tree: Mapping[str, Any], max_depth: int | None = None) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``, nesting kept below ``max_depth`` levels of keys.

    An empty mapping stays a value; with ``max_depth=2`` a section's dict-valued key (such as
    ``data.storage_options``) stays one value.
    """
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str, depth: int) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            deeper = max_depth is None or depth < max_depth
            if isinstance(value, Mapping) and value and deeper:
                walk(value, f"{name}.", depth + 1)
            else:
                flat[name] = value

    walk(tree, "", 1)
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.4"`` -> (["optim", "lr"], 0.4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key.split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted ``key=value`` in a nested dict (a copy of the sections is made as needed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return tree


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        return f"unknown key '{key}'"
    if not key:  # a check across sections names its keys itself
        return message
    return f"'{key}': {message} (got {error.get('input')!r})"


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The top-level mapping of a YAML file; a missing file or bad YAML raises ConfigError."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        tree = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return tree


def validate(model: type[M], tree: dict[str, Any], source: str) -> M:
    """``model`` validated from ``tree``; every problem, with its key, in one ConfigError."""
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_yaml_model(path: str | Path, model: type[M], what: str = "config file") -> M:
    """Read a YAML file and validate it as ``model`` (run configs, experiments, task specs)."""
    return validate(model, read_yaml_mapping(path, what), str(path))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (``None``: all defaults), apply overrides, validate every key."""
    source = str(path) if path is not None else "<defaults>"
    tree = read_yaml_mapping(path) if path is not None else {}
    try:
        tree = apply_overrides(tree, overrides or [])
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return validate(RunConfig, tree, source)


def to_yaml(config: RunConfig) -> str:
    """The fully resolved config as YAML (logged as an MLflow artifact)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
