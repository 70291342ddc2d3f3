"""Weights in and out: timm ``dm_nfnet_fN`` state dicts, DeepMind Haiku trees, safetensors."""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.models.nfnet import NFNet

_TIMM_BLOCK_CONVS = {"conv1": "conv0", "conv2": "conv1", "conv2b": "conv1b", "conv3": "conv2"}
_TIMM_STEM_CONVS = {f"conv{i + 1}": f"conv{i}" for i in range(4)}


def _block_index(model: NFNet, stage: int, index: int) -> int:
    depths = model.variant.depths
    if stage >= len(depths) or index >= depths[stage]:
        raise ValueError(f"stage {stage} block {index} does not exist in {model.variant.name}")
    return sum(depths[:stage]) + index


def _timm_key(model: NFNet, key: str) -> str:
    """Our parameter name for one timm ``dm_nfnet`` state-dict key."""
    parts = key.split(".")
    if parts[0] == "stem" and parts[1] in _TIMM_STEM_CONVS:
        return f"stem.{_TIMM_STEM_CONVS[parts[1]]}.{parts[2]}"
    if parts[0] in ("final_conv", "head"):
        return key
    match = re.fullmatch(r"stages\.(\d+)\.(\d+)\.(.+)", key)
    if match is None:
        raise ValueError(f"timm key {key!r} has no counterpart in {model.variant.name}")
    block = f"blocks.{_block_index(model, int(match[1]), int(match[2]))}"
    rest = match[3]
    if rest == "skipinit_gain":
        return f"{block}.skip_gain"
    name, _, param = rest.rpartition(".")
    if name in _TIMM_BLOCK_CONVS:
        return f"{block}.{_TIMM_BLOCK_CONVS[name]}.{param}"
    if name == "downsample.conv":
        return f"{block}.conv_shortcut.{param}"
    if name in ("attn_last.fc1", "attn_last.fc2"):
        return f"{block}.se.{name.split('.')[1]}.{param}"
    raise ValueError(f"timm key {key!r} has no counterpart in {model.variant.name}")


def _assign(model: NFNet, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` (our names, any layout that reshapes to ours) into the model, strictly."""
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match {model.variant.name}: missing {missing[:5]} "
            f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
        )
    for name, value in tensors.items():
        target = params[name]
        if value.numel() != target.numel():
            raise ValueError(
                f"{source}: {name} has shape {tuple(value.shape)}, expected {tuple(target.shape)}"
            )
    with torch.no_grad():
        for name, value in tensors.items():
            target = params[name]
            target.copy_(value.reshape(target.shape).to(target.dtype))


def load_timm_weights(model: NFNet, state_dict: Mapping[str, torch.Tensor]) -> NFNet:
    """Load a timm ``dm_nfnet_fN`` state dict into ``model`` (in place; returns the model)."""
    # timm stores gains as (O, 1, 1, 1) and SE weights as 1x1 convs: reshaping covers both.
    converted = {_timm_key(model, key): value for key, value in state_dict.items()}
    _assign(model, converted, "timm state dict")
    return model


def _haiku_module(model: NFNet, name: str) -> str:
    """Our module prefix for a Haiku module path such as ``NFNet/~/nf_block_3/~/conv1b``."""
    parts = name.split("/~/")
    if parts[0] != "NFNet":
        raise ValueError(f"Haiku module {name!r} is not under 'NFNet'")
    head, rest = parts[1], parts[2:]
    stem = re.fullmatch(r"stem_conv(\d)", head)
    if stem and not rest:
        return f"stem.conv{stem[1]}"
    if head in ("final_conv", "linear") and not rest:
        return "final_conv" if head == "final_conv" else "head.fc"
    block = re.fullmatch(r"nf_block(?:_(\d+))?", head)
    if block is None:
        raise ValueError(f"Haiku module {name!r} has no counterpart in {model.variant.name}")
    # Haiku names the first instance 'nf_block', then 'nf_block_1', 'nf_block_2', ...
    prefix = f"blocks.{int(block[1] or 0)}"
    if not rest:
        return prefix
    if rest == ["squeeze_excite", "linear"]:
        return f"{prefix}.se.fc1"
    if rest == ["squeeze_excite", "linear_1"]:
        return f"{prefix}.se.fc2"
    if len(rest) == 1:
        return f"{prefix}.{rest[0]}"
    raise ValueError(f"Haiku module {name!r} has no counterpart in {model.variant.name}")


def _haiku_tensor(param: str, value: np.ndarray) -> tuple[str, torch.Tensor]:
    # Writable float32 (torch cannot wrap read-only arrays); a no-op for arrays read from a file.
    tensor = torch.from_numpy(np.require(value, dtype=np.float32, requirements=["W"]))
    if param == "w" and tensor.ndim == 4:
        return "weight", tensor.permute(3, 2, 0, 1)  # HWIO -> OIHW
    if param == "w" and tensor.ndim == 2:
        return "weight", tensor.t()  # (in, out) -> (out, in)
    return {"b": "bias"}.get(param, param), tensor


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numpy arrays only (no arbitrary code from the file)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")
        return super().find_class(module, name)


def read_haiku_file(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """Read DeepMind's ``FN_haiku.npz`` (a pickled {module: {param: array}}) or a real npz."""
    data = Path(path).read_bytes()
    if zipfile.is_zipfile(io.BytesIO(data)):
        tree: dict[str, dict[str, np.ndarray]] = {}
        with np.load(io.BytesIO(data)) as archive:
            for key in archive.files:
                module, _, param = key.rpartition("/")
                tree.setdefault(module, {})[param] = archive[key]
        return tree
    try:
        return _ArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise ValueError(f"{path}: not a Haiku parameter file ({error})") from error


def load_haiku_weights(model: NFNet, tree_or_path: Mapping[str, Any] | str | os.PathLike) -> NFNet:
    """Load DeepMind's Haiku parameters (a path or {module: {param: array}}) into ``model``."""
    tree = tree_or_path if isinstance(tree_or_path, Mapping) else read_haiku_file(tree_or_path)
    converted: dict[str, torch.Tensor] = {}
    for module, params in tree.items():
        prefix = _haiku_module(model, module)
        for param, value in params.items():
            name, tensor = _haiku_tensor(param, value)
            converted[f"{prefix}.{name}"] = tensor
    _assign(model, converted, "Haiku parameters")
    return model


def save_safetensors(model: torch.nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the model's state dict to ``path`` in safetensors format, atomically."""
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safetensors(model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a safetensors file written by ``save_safetensors`` into ``model`` (strict)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no safetensors file at {path}")
    model.load_state_dict(load_file(str(path)), strict=True)
    return model
