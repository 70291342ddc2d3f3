"""The worker builds DeepSpeed's JIT ops with its own environment's ninja, into its own cache."""

from __future__ import annotations

import os
import shutil
import sys

from pipeline.train.trainer import use_this_environments_build_tools


def test_this_environments_bin_goes_first_on_path_once(monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    use_this_environments_build_tools()
    use_this_environments_build_tools()
    own_bin = os.path.dirname(sys.executable)
    assert os.environ["PATH"] == f"{own_bin}:/usr/bin:/bin"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
    # The ninja torch's extension builder will run is the one installed beside DeepSpeed.
    ninja = shutil.which("ninja")
    assert ninja is not None and os.path.dirname(ninja) == own_bin


def test_a_chosen_extension_cache_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    use_this_environments_build_tools()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path)
