"""NFNet building blocks: scaled WS conv, gamma-corrected activations, SE, stochastic depth."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# DM base.py `nonlinearities`: gamma = 1 / std(act(z)), z ~ N(0, 1) (empirical digits, kept as is).
ACTIVATION_GAMMAS: dict[str, float] = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}

NUMERICS = ("official", "timm")
PADDINGS = ("same", "symmetric")

# DM base.py WSConv2D.standardize_weight: eps=1e-4 inside max(fan_in * var, eps).
OFFICIAL_WS_EPS = 1e-4
# timm nfnet.py NfCfg.std_conv_eps=1e-5, added to the variance: sqrt(fan_in * (var + eps)).
TIMM_WS_EPS = 1e-5


def activation_fn(name: str, numerics: str = "official") -> Callable[[torch.Tensor], torch.Tensor]:
    """The raw activation (without its gamma) for ``name`` under the given numerics."""
    if name == "gelu":
        # DM uses jax.nn.gelu, whose default is the tanh approximation; timm uses exact erf.
        approximate = "tanh" if numerics == "official" else "none"
        return lambda x: F.gelu(x, approximate=approximate)
    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "identity": lambda x: x,
        "celu": F.celu,
        "elu": F.elu,
        "leaky_relu": F.leaky_relu,
        "log_sigmoid": F.logsigmoid,
        "relu": F.relu,
        "relu6": F.relu6,
        "selu": F.selu,
        "sigmoid": torch.sigmoid,
        "silu": F.silu,
        "soft_sign": F.softsign,
        "softplus": F.softplus,
        "tanh": torch.tanh,
    }
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATION_GAMMAS)}")
    return table[name]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) of one spatial dimension."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class _OfficialStandardize(torch.autograd.Function):
    """gain * (W - mean) * rsqrt(max(fan_in * var, 1e-4)) per output channel, with a hand-written
    backward: autograd through var_mean made weight standardisation ~2x slower on CPU."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        rows = weight.reshape(weight.shape[0], -1)
        centered = rows - rows.mean(dim=1, keepdim=True)
        fan_in_var = torch.linalg.vector_norm(centered, dim=1).square_()  # = fan_in * var
        inv_std = torch.rsqrt(torch.clamp_min(fan_in_var, OFFICIAL_WS_EPS))
        # Where the clamp is active the scale does not depend on the weight.
        ctx.save_for_backward(centered, inv_std, gain, fan_in_var >= OFFICIAL_WS_EPS)
        return (centered * (gain * inv_std)[:, None]).view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        centered, inv_std, gain, unclamped = ctx.saved_tensors
        grad = grad_out.reshape(centered.shape)
        scale = gain * inv_std
        dot = (grad * centered).sum(dim=1)
        # d/dc of c * gain * (c.c)^-1/2: scale * grad - gain * inv_std^3 * (grad.c) * c; then the
        # mean subtraction projects out the row mean (centered rows already have mean 0).
        coef = torch.where(unclamped, -gain * inv_std.pow(3) * dot, torch.zeros_like(dot))
        grad_weight = centered * coef[:, None]
        grad_weight.sub_((scale * grad.mean(dim=1))[:, None]).addcmul_(grad, scale[:, None])
        return grad_weight.view_as(grad_out), dot * inv_std


class WSConv2d(nn.Module):
    """Conv2d with scaled weight standardisation, a per-channel gain and a bias.

    ``input_scale`` is a constant folded into the standardised weight: it stands for the
    activation gamma (and block beta) that multiply this conv's input in the official code, so
    the activation tensors never need a separate multiply.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        padding: str = "same",
        numerics: str = "official",
        input_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {NUMERICS}, got {numerics!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.groups = kernel_size, stride, groups
        self.padding, self.numerics, self.input_scale = padding, numerics, input_scale
        fan_in = in_channels // groups * kernel_size * kernel_size
        self.fan_in = fan_in
        self.weight = nn.Parameter(
            torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size)
        )
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        # DM base.py WSConv2D: VarianceScaling(1.0, 'fan_in', 'normal'), i.e. N(0, 1/fan_in).
        nn.init.normal_(self.weight, 0.0, 1.0 / math.sqrt(fan_in))

    def standardized_weight(self) -> torch.Tensor:
        """The convolved weight: gain * (W - mean) / sqrt(fan_in * var), times input_scale."""
        gain = self.gain * self.input_scale
        if self.numerics == "official":
            return _OfficialStandardize.apply(self.weight, gain)
        # timm's form: (W - mean) / sqrt(var + eps) * gain / sqrt(fan_in); batch_norm over
        # (1, O, fan_in) computes it in one fused kernel (forward and backward).
        flat = self.weight.reshape(1, self.out_channels, -1)
        scale = gain * self.fan_in**-0.5
        out = F.batch_norm(flat, None, None, scale, None, training=True, eps=TIMM_WS_EPS)
        return out.reshape_as(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolve ``x`` with SAME (TensorFlow) or symmetric padding."""
        k, s = self.kernel_size, self.stride
        pad: int | tuple[int, int] = k // 2
        if self.padding == "same" and (s > 1 or k % 2 == 0):
            top, bottom = same_padding(x.shape[-2], k, s)
            left, right = same_padding(x.shape[-1], k, s)
            if top == bottom and left == right:
                pad = (top, left)
            else:
                # Asymmetric SAME (e.g. 0 before, 1 after on even inputs at stride 2).
                x = F.pad(x, (left, right, top, bottom))
                pad = 0
        return F.conv2d(x, self.standardized_weight(), self.bias, s, pad, 1, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, groups={self.groups}, padding={self.padding}, "
            f"numerics={self.numerics}, input_scale={self.input_scale:.6g}"
        )


@torch.no_grad()
def truncated_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill with N(0, std^2) truncated to [-2 std, 2 std], by redrawing the values outside."""
    # Rejection sampling: exact, and ~20x faster on CPU than nn.init.trunc_normal_'s erfinv.
    tensor.normal_(0.0, std)
    if tensor.device.type == "meta":
        return tensor
    flat = tensor.view(-1)
    index = torch.nonzero(flat.abs() > 2 * std).squeeze(1)
    redrawn = torch.empty(index.numel(), dtype=tensor.dtype, device=tensor.device)
    pending = torch.ones_like(redrawn, dtype=torch.bool)
    while bool(pending.any()):
        redrawn[pending] = torch.randn_like(redrawn[pending]) * std
        pending = redrawn.abs() > 2 * std
    flat[index] = redrawn
    return tensor


class SqueezeExcite(nn.Module):
    """Squeeze-excite gate: mean-pool, Linear, ReLU, Linear, sigmoid (returns the gate only)."""

    def __init__(self, channels: int, se_ratio: float) -> None:
        super().__init__()
        # DM base.py SqueezeExcite: hidden = max(1, int(in_ch * se_ratio)).
        hidden = max(1, int(channels * se_ratio))
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        for fc in (self.fc1, self.fc2):
            # Haiku Linear default: truncated normal (at 2 std), std 1/sqrt(fan_in); bias 0.
            truncated_normal_(fc.weight, 1.0 / math.sqrt(fc.in_features))
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Per-example, per-channel gate in (0, 1), shape (B, C, 1, 1)."""
        pooled = x.mean(dim=(2, 3))
        # DM base.py SqueezeExcite: plain ReLU inside (no gamma).
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))[:, :, None, None]


def stochastic_depth_mask(batch: int, drop_rate: float, like: torch.Tensor) -> torch.Tensor:
    """Per-example keep mask floor(keep + U), shape (B, 1, 1, 1), without 1/keep rescaling."""
    # DM base.py StochDepth: binary = floor(keep_prob + U[0, 1)), scale_by_keep=False.
    uniform = torch.rand(batch, 1, 1, 1, dtype=like.dtype, device=like.device)
    return torch.floor((1.0 - drop_rate) + uniform)
