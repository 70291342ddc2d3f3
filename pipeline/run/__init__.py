"""Running things: proving a run can start, launching it on Ray, scheduling and experiments.

- :mod:`pipeline.run.preflight`: the config resolved into a plan, and every URL it names checked;
- :mod:`pipeline.run.references`: ``--from REF`` turned into weights to load and their lineage;
- :mod:`pipeline.run.launch`: the Ray Train launch and the MLflow run it records into;
- :mod:`pipeline.run.ray_cluster`: joining, starting and stopping a Ray cluster, job states;
- :mod:`pipeline.run.schedule`: finetune Ray jobs for each checkpoint milestone;
- :mod:`pipeline.run.experiments`: the paper's experiments as runs of one MLflow experiment;
- :mod:`pipeline.run.demo`: the laptop demo's steps.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: configs/, jobs/, default outputs
