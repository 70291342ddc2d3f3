# Set-up and the two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo lint format bench gpu-check clean

setup: $(STAMP)

# torch/torchvision first, from the pinned versions (pip finds them on this machine's disk);
# then the project with its dev extra. Re-running is a no-op unless pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Two pytest processes side by side, each with its own Ray head and servers (the integration
# tests mostly wait: Ray start-up, drain deadlines, backoffs). One runs the cluster-fault tests,
# the other the unit tests and the integration tests that time nothing; its output follows.
BESIDE := test_auth.py test_bad_input.py test_data_s3.py test_data_sources_s3.py test_elastic.py \
	test_experiments.py test_multinode.py test_schedule.py test_tracking_server.py
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests/unit $(addprefix tests/integration/,$(BESIDE)) \
		> .tests-beside.log 2>&1 & beside=$$!; \
	$(PY) -m pytest -q -p no:cacheprovider tests/integration \
		$(addprefix --ignore=tests/integration/,$(BESIDE)); faults=$$?; \
	wait $$beside; beside_rc=$$?; echo "--- tests/unit and the rest of tests/integration ---"; \
	cat .tests-beside.log; exit $$(( faults || beside_rc ))

demo: setup
	$(PY) -m pipeline.demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m pipeline.bench

# The one call on a GPU machine (it has not run on one yet): `pipeline.bench gpu`'s table (the
# pipeline's Trainer step vs timm's dm_nfnet_f0, eager/compiled, NCHW/NHWC, bf16: images/s, MFU,
# peak memory), then 200 steps of nfnet_f0 through Ray Train on 1 GPU with MLflow, on synthetic
# 192 px data; its progress lines show MFU, its metrics land in gpu_check/mlflow.db.
GPU_CHECK := gpu_check
gpu-check: setup
	mkdir -p $(GPU_CHECK)
	$(PY) -m pipeline.bench gpu --json $(GPU_CHECK)/bench_gpu.json
	$(PY) -m pipeline.pretrain --config configs/pretrain/nfnet_f0.yaml \
		'data.train_url=synthetic://?samples=1024&classes=1000&resolution=192' \
		data.train_resolution=192 data.test_resolution=192 \
		train.global_batch=128 train.micro_batch=128 train.steps=200 \
		train.log_every=20 train.eval_every=200 train.eval_batches=2 \
		checkpoint.storage_url=file://$(GPU_CHECK)/runs checkpoint.every_steps=200 \
		tracking.uri=sqlite:///$(GPU_CHECK)/mlflow.db tracking.experiment=gpu-check \
		tracking.registered_model=null scaling.num_workers=1 scaling.max_failures=0

clean:
	rm -rf $(VENV) build *.egg-info
