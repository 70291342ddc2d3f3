"""The upload benchmark's smoke mode: a small checkpoint to moto's S3 server, sync and async."""

from __future__ import annotations

import pytest

from pipeline.bench import upload


def test_smoke_uploads_two_whole_checkpoints_while_measuring_steps(capsys):
    pytest.importorskip("moto.server")
    figures = upload.main(["--smoke"])
    assert figures["stored_whole"] == 2  # the async and the sync checkpoint, every file
    assert figures["checkpoint_bytes"] > 1e6  # nfnet_nano's weights, momentum and EMA
    assert figures["async_steps"] >= 1 and figures["async_upload_s"] > 0
    assert figures["ordinary_step_ms"] > 0 and figures["stage_s"] > 0
    assert figures["store_cpu_s"] > 0  # moto's server (at nice 19) received the upload
    assert figures["upload_process_cpu_s"] > 0  # the copy ran in the child process
    # The sync checkpointing step holds a whole upload and a step.
    assert figures["sync_step_s"] > figures["ordinary_step_ms"] / 1e3
    assert "step during async upload" in capsys.readouterr().out
