"""MFU: FLOPs per training image, the device peaks, the CPU probe, and what a run logs."""

from __future__ import annotations

import time

import pytest
import torch
from mlflow import MlflowClient

from pipeline.bench.gpu import local_trainer, single_process_group
from pipeline.config import load_config
from pipeline.models import count_flops, create_model
from pipeline.train import mfu
from pipeline.train.metrics import progress_line, start_utilisation
from pipeline.train.mfu import Peak, Utilisation, gpu_peak


@pytest.mark.parametrize(
    ("name", "bf16", "fp32_as_tf32"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5, 494.5),  # what torch calls the SXM part
        ("NVIDIA H100 PCIe", 756.5, 378.0),
        ("NVIDIA H100 NVL", 835.5, 417.5),
        ("NVIDIA H200", 989.5, 494.5),
        ("NVIDIA H200 NVL", 835.5, 417.5),
        ("NVIDIA A100-SXM4-80GB", 312.0, 156.0),
        ("NVIDIA A100 80GB PCIe", 312.0, 156.0),
        ("NVIDIA L4", 121.0, 60.0),
        ("NVIDIA L40", 181.05, 90.5),
        ("NVIDIA L40S", 362.05, 183.0),
        ("NVIDIA A10", 125.0, 62.5),
        ("NVIDIA GeForce RTX 4090", 165.2, 82.6),
        ("NVIDIA GeForce RTX 3090", 71.0, 35.6),
    ],
)
def test_each_gpu_name_finds_its_own_datasheet_row(name, bf16, fp32_as_tf32):
    assert gpu_peak(name, "bf16").tflops == bf16
    assert gpu_peak(name, "fp32").tflops == fp32_as_tf32
    assert (
        "datasheet" in gpu_peak(name, "bf16").source
        or "whitepaper" in gpu_peak(name, "bf16").source
    )


def test_fp32_without_tf32_uses_the_cuda_core_peak_and_volta_has_no_bf16():
    assert gpu_peak("NVIDIA H100 80GB HBM3", "fp32", tf32=False).tflops == 67.0
    assert gpu_peak("Tesla V100-SXM2-16GB", "fp32").tflops == 15.7  # no tf32 on Volta
    assert gpu_peak("Tesla V100-PCIE-32GB", "fp32").tflops == 14.0
    volta = gpu_peak("Tesla V100-SXM2-16GB", "bf16")
    assert volta.tflops is None and "scaling.peak_tflops" in volta.source


def test_an_unknown_gpu_has_no_peak_and_says_which_key_sets_it():
    for name in ("NVIDIA A10G", "NVIDIA B200", "AMD Instinct MI300X"):
        peak = gpu_peak(name, "bf16")
        assert peak.tflops is None and name in peak.source and "scaling.peak_tflops" in peak.source


def test_the_override_wins_and_the_cpu_probe_measures_a_matmul_in_well_under_a_second():
    assert mfu.device_peak(torch.device("cpu"), "fp32", override=12.5) == Peak(
        12.5, "scaling.peak_tflops"
    )
    started = time.process_time()  # CPU time: the probe's own cost, whatever else runs
    peak = mfu.device_peak(torch.device("cpu"), "fp32")
    assert time.process_time() - started < 1.0
    # A CPU core does between a few GFLOP/s and a few hundred; any figure outside is no sgemm.
    assert 1e-3 < peak.tflops < 10.0
    assert "measured" in peak.source and "float32 matmul" in peak.source


def test_training_flops_are_six_times_the_forward_multiply_adds():
    with torch.device("meta"):  # FLOPs need the shapes only
        model = create_model("nfnet_f0")
    # 2 FLOPs per multiply-add, times 3 for the forward and its two backward products.
    assert mfu.train_flops_per_image(model, 192) == 6 * count_flops("nfnet_f0", 192)
    # DM README: F0 is 12.38 G(multiply-adds) at its 256 px test resolution.
    assert count_flops(model, 256) == pytest.approx(12.38e9, rel=1e-3)


def test_utilisation_turns_images_per_s_into_tflops_and_mfu():
    meter = Utilisation(flops_per_image=4e9, peak=Peak(100.0, "test"))
    metrics = meter.metrics(images_per_s_per_worker=5000.0)
    assert metrics["train/tflops_per_worker"] == pytest.approx(20.0)
    assert metrics["train/mfu"] == pytest.approx(0.2)
    unknown = Utilisation(4e9, Peak(None, "no peak")).metrics(5000.0)
    assert set(unknown) == {"train/tflops_per_worker"}


def test_the_progress_line_shows_tflops_and_mfu():
    metrics = {
        "train/loss": 2.5,
        "train/top1": 0.25,
        "train/images_per_s": 2000.0,
        "train/tflops_per_worker": 123.4,
        "train/mfu": 0.1247,
    }
    line = progress_line(10, 100, metrics, eta=65.0)
    assert "2000.0 img/s  123 TFLOP/s per worker  MFU 12.5 %  ETA 1m05s" in line
    del metrics["train/mfu"], metrics["train/tflops_per_worker"]
    assert "img/s  ETA" in progress_line(10, 100, metrics, eta=65.0)


def test_a_run_logs_mfu_with_its_metrics_and_its_peak_as_params_once(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = load_config(
        None,
        [
            "model.name=nfnet_nano",
            "data.train_url=synthetic://?samples=32&classes=10&resolution=32",
            "train.global_batch=8",
            "train.micro_batch=8",
            "train.steps=3",
            f"tracking.uri={uri}",
            "scaling.peak_tflops=0.5",
        ],
    )
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("mfu")).info.run_id
    with caplog.at_level("INFO", logger="pipeline.train"):
        with single_process_group(torch.device("cpu")):
            trainer = local_trainer(config, run_id)
            steps = trainer.batches.steps(0)
            started = time.perf_counter()
            for _ in range(3):
                trainer.run_step(steps)
            metrics = trainer.log(started)
            trainer.logger.close()
    flops = 6 * count_flops(trainer.model, 32)
    tflops = metrics["train/images_per_s_per_worker"] * flops / 1e12
    assert metrics["train/tflops_per_worker"] == pytest.approx(tflops)
    assert metrics["train/mfu"] == pytest.approx(tflops / 0.5)
    assert "peak 0.5 TFLOP/s per worker: scaling.peak_tflops" in caplog.text
    assert f"MFU {100 * metrics['train/mfu']:.1f} %" in caplog.text  # the progress line
    run = client.get_run(run_id)
    assert run.data.metrics["train/mfu"] == pytest.approx(metrics["train/mfu"])
    assert run.data.metrics["train/tflops_per_worker"] == pytest.approx(tflops)
    assert run.data.params["mfu.peak_tflops"] == "0.5"
    assert run.data.params["mfu.peak_source"] == "scaling.peak_tflops"
    gflops = float(run.data.params["mfu.train_gflops_per_image"])
    assert gflops == pytest.approx(flops / 1e9, rel=1e-3)
    # A resumed run finds its peak again: the first start's params stay, and nothing fails.
    resumed = config.model_copy(deep=True)
    resumed.scaling.peak_tflops = 0.7
    start_utilisation(resumed, trainer.plan, trainer.model, trainer.device, 0, run_id)
    assert client.get_run(run_id).data.params["mfu.peak_tflops"] == "0.5"
    # Only rank 0 reports.
    assert start_utilisation(config, trainer.plan, trainer.model, trainer.device, 1, run_id) is None
