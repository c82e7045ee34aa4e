"""Autograd in Python, in one place: the torch.autograd.Function drop-ins over
the compiled kernels and the autograd of the Triton ops, sharing one backward
formula (the backend's backward op). The C++/CUDA ops carry their own autograd
in C++ (csrc/autograd.cpp), which costs no interpreter time per call.

The Functions call the same forward and backward ops as the registered
torch.library ops (one backward formula per backend), for code that wants an
explicit Function. ``backend`` names a compiled backend ('cpp', 'cuda',
'triton', 'cuda_emulated') or None for the fastest one available for the
inputs' device.
"""

from typing import Any, Callable, Optional

import torch

from . import _backends
from ._checks import check_pair, check_tensor, check_window

DOUBLE_BACKWARD_ERROR = (
    "stccl_ops: double backward (the gradient of a correlation's gradient) is not supported "
    "by the compiled backends; use backend='reference' for it")

Window = tuple[int, int, bool, float]  # kernel_size, dilation, normalize, eps


def _save_local(ctx: Any, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, window: Window,
                backward_op: Callable, num_inputs: int) -> None:
    ctx.window, ctx.backward_op, ctx.num_inputs = window, backward_op, num_inputs
    if any(ctx.needs_input_grad[:2]):
        # Either gradient needs both operands (their norms and each other).
        ctx.save_for_backward(a, b, out)


def _save_self(ctx: Any, x: torch.Tensor, out: torch.Tensor, window: Window,
               backward_op: Callable, num_inputs: int) -> None:
    ctx.window, ctx.backward_op, ctx.num_inputs = window, backward_op, num_inputs
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(x, out)


def _local_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    a, b, out = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_a, grad_b = ctx.backward_op(grad_out, a, b, out, *ctx.window, need_a, need_b)
    return (grad_a if need_a else None, grad_b if need_b else None) + (None,) * (ctx.num_inputs - 2)


def _self_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
    x, out = ctx.saved_tensors
    grad_x = ctx.backward_op(grad_out, x, out, *ctx.window)
    return (grad_x,) + (None,) * (ctx.num_inputs - 1)


def _no_double_backward(ctx: Any, *grads: torch.Tensor):
    raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def register_op_autograd(namespace: str, local: str, local_backward: str, self_: str,
                         self_backward: str) -> None:
    """Autograd of a Python-registered op family in `namespace` (the Triton
    ops): the forward ops differentiate through their backward ops, which
    refuse double backward."""
    ops = getattr(torch.ops, namespace)
    local_backward_op, self_backward_op = getattr(ops, local_backward), getattr(ops, self_backward)

    def setup_local(ctx, inputs, output):
        a, b, *window = inputs
        _save_local(ctx, a, b, output, tuple(window), local_backward_op, len(inputs))

    def setup_self(ctx, inputs, output):
        x, *window = inputs
        _save_self(ctx, x, output, tuple(window), self_backward_op, len(inputs))

    torch.library.register_autograd(f"{namespace}::{local}", _local_backward,
                                    setup_context=setup_local)
    torch.library.register_autograd(f"{namespace}::{self_}", _self_backward,
                                    setup_context=setup_self)
    for name in (local_backward, self_backward):
        torch.library.register_autograd(f"{namespace}::{name}", _no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)


def register_spatiotemporal_autograd(namespace: str, forward: str, backward: str) -> None:
    """Autograd of a Python-registered spatiotemporal op: the clip gradient of
    both volumes from its backward op; a volume without a gradient is left
    out (None), not filled with zeros."""
    backward_op = getattr(getattr(torch.ops, namespace), backward)

    def setup(ctx, inputs, output):
        v, *window = inputs
        ctx.window = tuple(window)
        ctx.save_for_backward(v, *output)

    def backward_fn(ctx, grad_spatial, grad_temporal):
        v, spatial, temporal = ctx.saved_tensors
        grad_v = backward_op(grad_spatial, grad_temporal, v, spatial, temporal, *ctx.window)
        return (grad_v,) + (None,) * len(ctx.window)

    torch.library.register_autograd(f"{namespace}::{forward}", backward_fn, setup_context=setup)
    torch.library.register_autograd(f"{namespace}::{backward}", _no_double_backward,
                                    setup_context=lambda ctx, inputs, output: None)


class LocalCorrelationFunction(torch.autograd.Function):
    """``LocalCorrelationFunction.apply(a, b, kernel_size, dilation, normalize, eps, backend)``:
    a, b (N, C, H, W) -> (N, K*K, H, W), as ``stccl_ops.local_correlation``."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, kernel_size: int = 3,
                dilation: int = 1, normalize: bool = True, eps: float = 1e-8,
                backend: Optional[str] = None) -> torch.Tensor:
        fn = "LocalCorrelationFunction"
        check_tensor(fn, "a", a, (4, 5))
        check_tensor(fn, "b", b, (4, 5))
        check_pair(fn, a, b)
        check_window(fn, kernel_size, dilation, normalize, eps)
        impl = _backends.resolve(fn, backend, a.device, compiled_only=True)
        window = (kernel_size, dilation, normalize, float(eps))
        out = impl.forward_op(a, b, *window)
        _save_local(ctx, a, b, out, window, impl.backward_op, num_inputs=7)
        return out

    backward = staticmethod(_local_backward)


class SelfCorrelationFunction(torch.autograd.Function):
    """``SelfCorrelationFunction.apply(x, kernel_size, dilation, normalize, eps, backend)``:
    the symmetric self-correlation, as ``stccl_ops.spatial_correlation``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                normalize: bool = True, eps: float = 1e-8,
                backend: Optional[str] = None) -> torch.Tensor:
        fn = "SelfCorrelationFunction"
        check_tensor(fn, "x", x, (4, 5))
        check_window(fn, kernel_size, dilation, normalize, eps)
        impl = _backends.resolve(fn, backend, x.device, compiled_only=True)
        window = (kernel_size, dilation, normalize, float(eps))
        out = impl.self_forward_op(x, *window)
        _save_self(ctx, x, out, window, impl.self_backward_op, num_inputs=6)
        return out

    backward = staticmethod(_self_backward)
