"""``python -m pipeline.pretrain --config PATH [--dry-run] [section.key=value ...]``.

What ``ray job submit -- python -m pipeline.pretrain ...`` runs: resolve the config into a plan,
check every URL it names, then train on the Ray cluster (see :mod:`pipeline.launch`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from urllib.parse import urlsplit

from pipeline.config import EXIT_BAD_INPUT, ConfigError, RunConfig, load_config_or_exit, to_yaml
from pipeline.data.storage import StorageError, atomic_write_bytes, remove_url
from pipeline.train.batches import describe_dataset
from pipeline.train.plan import Plan, deepspeed_config, make_plan


def parse_args(argv: list[str] | None, prog: str, description: str) -> argparse.Namespace:
    """The command line shared by the training entry points."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", required=True, help="YAML run config (see configs/)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, check, exit")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=0.4")
    return parser.parse_args(argv)


ENDPOINT_TIMEOUT_S = 5.0  # one TCP connect: a dead endpoint fails in seconds, not minutes


def check_endpoint(key: str, address: str | None) -> None:
    """Raise ConfigError naming ``key`` unless ``address`` (URL or host:port) accepts a connection.

    Storage and Ray clients retry a refused connection for a minute or more (s3fs and botocore
    each retry, Ray waits for its GCS), which is right mid-run and wrong for a typo at start-up.
    """
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    default_port = {"http": 80, "https": 443, "ray": 10001}.get(parts.scheme)
    try:
        host, port = parts.hostname, parts.port or default_port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"{key}: {address!r} is not a URL or host:port with a port")
    try:
        socket.create_connection((host, port), timeout=ENDPOINT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConfigError(f"{key}: {address} does not accept connections ({exc})") from None


def check_storage_endpoint(section: str, storage_options: dict) -> None:
    """A custom object-store endpoint in ``storage_options`` answers."""
    client_kwargs = storage_options.get("client_kwargs") or {}
    if isinstance(client_kwargs, dict):
        key = f"{section}.storage_options.client_kwargs.endpoint_url"
        check_endpoint(key, client_kwargs.get("endpoint_url"))
    check_endpoint(f"{section}.storage_options.endpoint_url", storage_options.get("endpoint_url"))


def resolve(config: RunConfig) -> Plan:
    """Read the dataset's shape and resolve the plan; bad input raises ConfigError/StorageError."""
    data = config.data
    if data.train_url.startswith("pipe:") and not data.allow_pipe:
        raise ConfigError(
            f"data.train_url: {data.train_url!r} is a pipe: URL, which runs a shell command; "
            "set data.allow_pipe=true only if you trust the config"
        )
    check_storage_endpoint("data", data.storage_options)
    try:
        shape = describe_dataset(data.train_url, data.storage_options, allow_pipe=data.allow_pipe)
    except (ValueError, StorageError) as exc:
        raise ConfigError(f"data.train_url: {exc}") from exc
    return make_plan(config, shape.num_classes, shape.train_samples, shape.val_samples)


def check_reachable(config: RunConfig) -> None:
    """The checkpoint storage and the MLflow URI answer (the data URL was read by ``resolve``)."""
    from pipeline.tracking import TrackingError, check_tracking_uri

    storage, options = config.checkpoint.storage_url, config.checkpoint.storage_options
    check_storage_endpoint("checkpoint", options)
    probe = f"{storage.rstrip('/')}/.write-probe"
    try:
        atomic_write_bytes(probe, b"ok", options)
        remove_url(probe, options)
    except StorageError as exc:
        raise ConfigError(f"checkpoint.storage_url: {exc}") from exc
    try:
        check_tracking_uri(config.tracking.uri)
    except TrackingError as exc:
        raise ConfigError(f"tracking.uri: {exc}") from exc


def check_cluster(config: RunConfig) -> None:
    """The Ray cluster answers and, when GPUs are asked for, has one per worker."""
    scaling = config.scaling
    address = scaling.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        check_endpoint("scaling.ray_address", address)

        try:
            # A connection of its own, closed again: one that stayed open for the launch
            # printed every worker log line twice on the driver.
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            gpus = ray.cluster_resources().get("GPU", 0)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, …
            raise ConfigError(
                f"scaling.ray_address: cannot reach Ray at {address}: {exc}"
            ) from None
        finally:
            ray.shutdown()
        where = f"the Ray cluster at {address}"
    else:
        import torch

        gpus, where = torch.cuda.device_count(), "this machine (no Ray address given)"
    if scaling.use_gpu and gpus < scaling.num_workers:
        raise ConfigError(
            f"scaling.use_gpu: {scaling.num_workers} workers need {scaling.num_workers} GPUs but "
            f"{where} has {int(gpus)}; set scaling.use_gpu=false or point scaling.ray_address "
            "at a GPU cluster"
        )


def print_plan(config: RunConfig, plan: Plan) -> None:
    """The dry run's report: resolved config, DeepSpeed config, scaling plan."""
    print("# resolved config\n" + to_yaml(config))
    print("# DeepSpeed config\n" + json.dumps(deepspeed_config(config, plan), indent=2))
    print(
        "# scaling plan\n"
        f"global batch {plan.global_batch} = micro-batch {plan.micro_batch} × accumulation "
        f"{plan.accumulation_steps} × workers {plan.num_workers}\n"
        f"peak lr {plan.peak_lr:g}  AGC λ {plan.clipping}  warm-up {plan.warmup_steps} steps\n"
        f"{plan.train_samples} training samples: {plan.steps_per_epoch} steps/epoch, "
        f"{plan.total_steps} steps in all\n"
        f"model {plan.model}: {plan.train_resolution} px train, {plan.test_resolution} px test, "
        f"dropout {plan.drop_rate}, stochastic depth {plan.stochdepth_rate}, "
        f"RandAugment {plan.randaugment_layers}×{plan.randaugment_magnitude}, "
        f"padding {plan.padding}, precision {plan.precision}"
    )


def prepare(args: argparse.Namespace) -> tuple[RunConfig, Plan]:
    """Config, plan and checks; any bad input exits 2 with the key or URL named."""
    config = load_config_or_exit(args.config, args.overrides).with_absolute_paths()
    try:
        plan = resolve(config)
        deepspeed_config(config, plan)
        if args.dry_run:
            print_plan(config, plan)
        check_reachable(config)
        check_cluster(config)
    except (ConfigError, StorageError) as exc:
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    return config, plan


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipeline.pretrain``."""
    args = parse_args(argv, "python -m pipeline.pretrain", __doc__)
    config, plan = prepare(args)
    if args.dry_run:
        print("dry run: every check passed; nothing was started")
        return 0
    from pipeline.launch import launch

    result = launch(config, plan, kind="pretrain")
    print(f"pretraining finished: MLflow run {result.run_id}, checkpoint {result.checkpoint_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
