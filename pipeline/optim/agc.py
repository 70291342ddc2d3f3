"""Adaptive Gradient Clipping (Brock et al. 2021, §4) and the SGD that applies it (DM optim.py).

Every clip here is computed the same way, vectorised over parameters: one per-unit norm per
tensor (no host syncs), the norms of a bucket of tensors concatenated into one flat vector, the
clip factors computed on that vector in a handful of ops, then split back into per-tensor views
that multiply the gradients in place. On accelerators nothing in ``SGD_AGC.step`` reads a value
back to the host, the NaN/Inf skip included (it is decided on the device); on CPU, where a read
costs no device sync, one read per bucket lets the scaling skip tensors in which no unit clipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

# DM optim.py SGD_AGC: eps=1e-3 floors the weight norm so zero-initialised units can still move.
DEFAULT_EPS = 1e-3
# DM optim.py / agc_optax.py: the gradient norm in the clip ratio is floored at 1e-6.
GRAD_NORM_FLOOR = 1e-6
# DM experiment_nfnets.py optimizer kwargs: weight_decay 2e-5, clipping 0.01, momentum 0.9.
DEFAULT_WEIGHT_DECAY = 2e-5
DEFAULT_CLIPPING = 0.01
DEFAULT_MOMENTUM = 0.9
# Gradient bytes per clip bucket on CPU: small enough to stay in a 32 MiB L3 between the norm
# pass and the scaling pass; among the fastest sizes from 0.25 MiB to one bucket for all.
_CPU_BUCKET_BYTES = 4 << 20


def _is_vector(tensor: torch.Tensor) -> bool:
    # DM optim.py unitwise_norm: anything that squeezes to <= 1 dim is normed as a whole.
    return sum(size != 1 for size in tensor.shape) <= 1


def _norm_dtype(tensor: torch.Tensor) -> torch.dtype:
    # bf16/fp16 tensors are normed in fp32; fp32 and fp64 keep their own precision.
    return torch.promote_types(tensor.dtype, torch.float32)


def unitwise_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm per output unit (dim 0) of a weight; the whole-tensor norm of scalars and vectors.

    The result broadcasts against ``tensor``: shape ``(O, 1, ..., 1)`` for a weight, ``()`` for a
    scalar or vector (gains, biases, skip gains).
    """
    dtype = _norm_dtype(tensor)
    if _is_vector(tensor):
        return torch.linalg.vector_norm(tensor, dtype=dtype)
    dims = tuple(range(1, tensor.ndim))
    return torch.linalg.vector_norm(tensor, dim=dims, keepdim=True, dtype=dtype)


def _units(tensor: torch.Tensor) -> int:
    return 1 if _is_vector(tensor) else tensor.shape[0]


def _flat_unit_norms(tensors: list[torch.Tensor], num_vectors: int) -> torch.Tensor:
    """Per-unit norms of every tensor, concatenated into one flat vector (no host sync).

    The first ``num_vectors`` tensors are scalars/vectors (one unit each): when they share an
    fp32/fp64 dtype their norms come from one ``_foreach_norm`` call instead of one call each.
    """
    vectors, weights = tensors[:num_vectors], tensors[num_vectors:]
    norms = []
    dtypes = {vector.dtype for vector in vectors}
    if len(dtypes) == 1 and dtypes <= {torch.float32, torch.float64}:
        norms.append(torch.stack(torch._foreach_norm(vectors)))
    else:
        weights = tensors
    for tensor in weights:
        dtype = _norm_dtype(tensor)
        if _is_vector(tensor):
            norms.append(torch.linalg.vector_norm(tensor, dtype=dtype).reshape(1))
        else:
            # Reducing over dims 1.. (not a reshaped view) works for any memory format.
            dims = tuple(range(1, tensor.ndim))
            norms.append(torch.linalg.vector_norm(tensor, dim=dims, dtype=dtype))
    return torch.cat(norms)


def _buckets(grads: list[torch.Tensor]) -> list[range]:
    """Consecutive index ranges holding about ``_CPU_BUCKET_BYTES`` of gradient each on CPU.

    On CPU a bucket's gradients are still in cache when they are scaled right after their norms
    were taken, which saves one pass over memory; accelerators take everything in one bucket
    (fewest kernel launches).
    """
    if not grads or grads[0].device.type != "cpu":
        return [range(len(grads))]
    buckets, start, size = [], 0, 0
    for index, grad in enumerate(grads):
        size += grad.numel() * grad.element_size()
        if size >= _CPU_BUCKET_BYTES:
            buckets.append(range(start, index + 1))
            start, size = index + 1, 0
    if start < len(grads):
        buckets.append(range(start, len(grads)))
    return buckets


def _clip_bucket(
    params: list[torch.Tensor], grads: list[torch.Tensor], clipping: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clip ``grads`` in place; return (squared raw grad norm, clipped unit count, unit count)."""
    # Scalars and vectors first, so their norms can come from one foreach call.
    order = sorted(range(len(grads)), key=lambda i: not _is_vector(grads[i]))
    params, grads = [params[i] for i in order], [grads[i] for i in order]
    num_vectors = sum(_is_vector(grad) for grad in grads)
    param_norms = _flat_unit_norms(params, num_vectors)
    grad_norms = _flat_unit_norms(grads, num_vectors)
    # DM optim.py: max_norm = clipping * max(||W_i||, eps); G_i *= max_norm / max(||G_i||, 1e-6)
    # only where ||G_i|| > max_norm.
    max_norms = param_norms.clamp_min(eps).mul_(clipping)
    clipped = grad_norms > max_norms
    ratio = max_norms / grad_norms.clamp_min(GRAD_NORM_FLOOR)
    scales = torch.where(clipped, ratio, torch.ones_like(ratio))
    sizes = [_units(grad) for grad in grads]
    targets = range(len(grads))
    if grads[0].device.type == "cpu":
        # On CPU reading the per-tensor clip counts costs no device sync, and skipping tensors
        # without a clipped unit saves a pass over most of the gradient memory.
        counts = torch.segment_reduce(clipped.float(), "sum", lengths=torch.tensor(sizes))
        targets = [i for i, count in enumerate(counts.tolist()) if count]
    per_tensor = torch.split(scales, sizes)
    for i in targets:
        grad = grads[i]
        shape = () if _is_vector(grad) else (-1,) + (1,) * (grad.ndim - 1)
        # A per-tensor in-place multiply broadcasting the unit scales (any memory format): the
        # foreach variant with broadcasting falls back to clone + copy on CPU.
        grad.mul_(per_tensor[i].reshape(shape))
    return grad_norms.square().sum(), clipped.sum(), len(scales)


def _clip_in_place(
    params: list[torch.Tensor], grads: list[torch.Tensor], clipping: float, eps: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clip ``grads`` in place bucket by bucket; return the totals of ``_clip_bucket``."""
    squares, clipped, units = [], [], 0
    for bucket in _buckets(grads):
        bucket_params = [params[i] for i in bucket]
        bucket_grads = [grads[i] for i in bucket]
        square, count, n = _clip_bucket(bucket_params, bucket_grads, clipping, eps)
        squares.append(square)
        clipped.append(count)
        units += n
    return torch.stack(squares).sum(), torch.stack(clipped).sum(), units


def _check_grads(params: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    with_grad = [p for p in params if p.grad is not None]
    for param in with_grad:
        if param.grad.is_sparse:
            raise ValueError(f"AGC needs dense gradients; got a sparse one of shape {param.shape}")
    return with_grad, [p.grad for p in with_grad]


def _stats(sum_squares: torch.Tensor, clipped: torch.Tensor, units: int) -> dict[str, torch.Tensor]:
    return {
        "clip_fraction": clipped.to(sum_squares.dtype) / max(units, 1),
        "grad_norm": sum_squares.sqrt(),
    }


@torch.no_grad()
def adaptive_clip_(
    parameters: Iterable[torch.Tensor] | torch.Tensor, clipping: float, eps: float = DEFAULT_EPS
) -> dict[str, torch.Tensor]:
    """Clip each parameter's ``.grad`` unit-wise in place; return clip statistics as tensors.

    The statistics are ``clip_fraction`` (units clipped / units) and ``grad_norm`` (global L2
    norm of the raw gradients). Parameters without a gradient are skipped.
    """
    if clipping <= 0:
        raise ValueError(f"adaptive_clip_: clipping must be > 0, got {clipping}")
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params, grads = _check_grads(parameters)
    if not params:
        zero = torch.zeros(())
        return _stats(zero, zero, 0)
    return _stats(*_clip_in_place(params, grads, clipping, eps))


class SGD_AGC(torch.optim.Optimizer):  # noqa: N801 (the name the paper and DM optim.py use)
    """SGD with Nesterov momentum and Adaptive Gradient Clipping, in DM optim.py's order.

    Per group (keys ``clipping``, ``weight_decay``, ``lr``, ``momentum``, ``nesterov``, ``eps``):
    clip the raw gradient unit-wise (``clipping=None``: no clip; ``.grad`` is clipped in place),
    add ``weight_decay * W``, update the momentum buffer ``b = momentum * b + g``, step along
    ``g + momentum * b`` (Nesterov) or ``b``. After each step ``last_stats`` holds
    ``clip_fraction`` and ``grad_norm`` as tensors, without a host sync.

    With ``skip_nonfinite`` a step whose raw gradient norm is NaN or Inf (a NaN or Inf anywhere
    in any gradient, or a norm beyond float32's range) changes nothing: parameters and momentum
    stay exactly as they were. The decision is taken on the device, without a host read: the
    update is torch's fused SGD kernel, which reads the ``found_inf`` flag on the device and
    leaves its tensors untouched when it is set (the mechanism torch's GradScaler uses with
    fused optimizers). ``last_step_skipped`` is that flag as a 0-d bool tensor on the device
    (``bool()`` of it is a host read: take it when the value is needed, at log time). Under data
    parallelism the gradients are already all-reduced here, so every rank takes the same
    decision without a collective.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        momentum: float = DEFAULT_MOMENTUM,
        nesterov: bool = True,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        clipping: float | None = DEFAULT_CLIPPING,
        eps: float = DEFAULT_EPS,
        skip_nonfinite: bool = False,
    ) -> None:
        if lr < 0:
            raise ValueError(f"SGD_AGC: lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"SGD_AGC: momentum must be in [0, 1), got {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults | dict(clipping=clipping, eps=eps))
        for index, group in enumerate(self.param_groups):
            clip, decay = group["clipping"], group["weight_decay"]
            if clip is not None and clip <= 0:
                raise ValueError(f"SGD_AGC: param group {index}: clipping must be > 0 or None")
            if decay is not None and decay < 0:
                raise ValueError(f"SGD_AGC: param group {index}: weight_decay must be >= 0")
        self.skip_nonfinite = skip_nonfinite
        self.last_stats: dict[str, torch.Tensor] = {}
        self.last_step_skipped = torch.zeros((), dtype=torch.bool)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Clip, decay, and take one Nesterov momentum step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sum_squares, clipped, units, updates = [], [], 0, []
        for group in self.param_groups:
            params, grads = _check_grads(group["params"])
            if not params:
                continue
            if group["clipping"] is not None:
                squares, count, n = _clip_in_place(params, grads, group["clipping"], group["eps"])
                clipped.append(count)
                units += n
            else:
                squares = torch.stack(torch._foreach_norm(grads)).float().square().sum()
            sum_squares.append(squares)
            updates.append((group, params, grads))
        if not sum_squares:
            self.last_step_skipped = torch.zeros((), dtype=torch.bool)
            return loss
        total = torch.stack(sum_squares).sum()
        count = torch.stack(clipped).sum() if clipped else torch.zeros((), device=total.device)
        self.last_stats = _stats(total, count, units)
        # Every update waits for every clip: the whole gradient's norm decides the skip.
        found_inf = None
        if self.skip_nonfinite:
            self.last_step_skipped = ~torch.isfinite(total)
            found_inf = self.last_step_skipped.to(torch.float32)  # the fused kernel's flag type
        else:
            self.last_step_skipped = torch.zeros((), dtype=torch.bool, device=total.device)
        for group, params, grads in updates:
            self._update(group, params, grads, found_inf)
        return loss

    def _update(
        self,
        group: dict,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        found_inf: torch.Tensor | None,
    ) -> None:
        """Weight decay, momentum and the step, in one fused kernel per dtype; nothing moves
        where ``found_inf`` is 1.

        DM optim.py SGD, as torch's fused SGD computes it with dampening 0: ``g += decay * W``
        (on a copy: the caller's .grad keeps only the clip), ``b = momentum * b + g``, then
        ``W -= lr * (g + momentum * b)`` (Nesterov) or ``W -= lr * b``. The buffers start at zero
        (DM optim.py), so the first step moves by ``g`` as torch's first-step copy would.
        """
        momentum = group["momentum"]
        by_dtype: dict[torch.dtype, tuple[list, list, list]] = {}
        for param, grad in zip(params, grads, strict=True):
            lists = by_dtype.setdefault(param.dtype, ([], [], []))
            lists[0].append(param)
            # The fused kernel walks param, grad and buffer in memory order: same strides needed.
            lists[1].append(grad if grad.stride() == param.stride() else _like(param, grad))
            if momentum:
                lists[2].append(self._buffer(param))
        for tensors, grad_list, buffers in by_dtype.values():
            torch._fused_sgd_(
                tensors,
                grad_list,
                buffers,
                weight_decay=group["weight_decay"] or 0.0,
                momentum=momentum,
                lr=group["lr"],
                dampening=0.0,
                nesterov=bool(group["nesterov"] and momentum),
                maximize=False,
                is_first_step=False,
                found_inf=found_inf,
            )

    def _buffer(self, param: torch.Tensor) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            # DM optim.py: the momentum state starts at zero, so the first step moves by g.
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        elif state["momentum_buffer"].stride() != param.stride():  # e.g. loaded from a file
            state["momentum_buffer"] = _like(param, state["momentum_buffer"])
        return state["momentum_buffer"]


def _like(param: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` copied into a tensor with ``param``'s memory layout."""
    return torch.empty_like(param, memory_format=torch.preserve_format).copy_(values)
