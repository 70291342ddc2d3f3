"""Two Ray nodes on one machine: the head and a second ``ray start --address`` node, both on
127.0.0.1, one training worker forced onto each by a custom resource; shards and checkpoints on
moto's S3 server, metrics to an MLflow server over HTTP."""

from __future__ import annotations

import pytest
from ray.util.state import list_actors
from safetensors.torch import load_file

from pipeline.data.sources import shapes
from pipeline.data.writer import write_shards
from tests.helpers.runs import (
    checked,
    max_relative_difference,
    only_run,
    run_pretrain,
    small_run_config,
)

pytestmark = pytest.mark.integration


def train_worker_nodes(dashboard_url: str) -> dict[str, str]:
    """actor id -> node id of every Ray Train worker the cluster has seen (Ray's state API)."""
    actors = list_actors(
        address=dashboard_url, filters=[("class_name", "=", "RayTrainWorker")], limit=1000
    )
    return {actor.actor_id: actor.node_id for actor in actors}


def test_two_nodes_one_worker_each_equal_one_node(
    ray_cluster, mlflow_server, s3_endpoint, tmp_path
):
    options = s3_endpoint.storage_options
    shards = s3_endpoint.url("multinode", "shapes")
    write_shards(shapes(320, 32, seed=3), shards, samples_per_shard=100, val_samples=64,
                 storage_options=options, progress=False)  # fmt: skip
    weights = {}
    try:
        for name, resources in (("one-node", {}), ("two-nodes", {"node_slot": 1})):
            if resources:
                ray_cluster.add_node(num_cpus=2, resources='{"node_slot": 1}')
                before = train_worker_nodes(ray_cluster.dashboard_url)
            config = small_run_config(
                tmp_path,
                name,
                mlflow_server,
                data={"train_url": shards, "storage_options": options},
                checkpoint={
                    "storage_url": s3_endpoint.url("multinode", name),
                    "storage_options": options,
                },
                train={"steps": 6, "eval_every": 3},
                scaling={"resources_per_worker": resources, "cpus_per_worker": 1},
            )
            checked(run_pretrain(ray_cluster, config, env=s3_endpoint.env))
            client, run = only_run(mlflow_server, f"{tmp_path.name}-{name}")
            assert run.info.status == "FINISHED"
            assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6
            import s3fs

            fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
            latest = sorted(fs.glob(f"{s3_endpoint.bucket}/multinode/{name}/*/step_*"))[-1]
            fs.get(f"{latest}/model.safetensors", str(tmp_path / f"{name}.safetensors"))
            weights[name] = load_file(tmp_path / f"{name}.safetensors")
        after = train_worker_nodes(ray_cluster.dashboard_url)
    finally:
        ray_cluster.remove_node(
            "node_slot", graceful=True
        )  # its log monitor would print every later run twice
    new_workers = {actor: node for actor, node in after.items() if actor not in before}
    assert len(new_workers) == 2
    assert len(set(new_workers.values())) == 2  # one worker on each node
    assert max_relative_difference(weights["two-nodes"], weights["one-node"]) <= 1e-5
