"""torch.autograd.Function drop-ins over the compiled kernels.

They call the same forward and backward ops as the registered torch.library
ops (one backward formula per backend), for code that wants an explicit
Function. ``backend`` names a compiled backend ('cpp', 'cuda', 'triton') or
None for the fastest one available for the inputs' device.
"""

import torch

from . import _backends, _ops
from ._checks import check_pair, check_tensor, check_window


class LocalCorrelationFunction(torch.autograd.Function):
    """``LocalCorrelationFunction.apply(a, b, kernel_size, dilation, normalize, eps, backend)``:
    a, b (N, C, H, W) -> (N, K*K, H, W), as ``stccl_ops.local_correlation``."""

    @staticmethod
    def forward(ctx, a, b, kernel_size=3, dilation=1, normalize=True, eps=1e-8, backend=None):
        fn = "LocalCorrelationFunction"
        check_tensor(fn, "a", a, (4, 5))
        check_tensor(fn, "b", b, (4, 5))
        check_pair(fn, a, b)
        check_window(fn, kernel_size, dilation, normalize, eps)
        impl = _backends.resolve(fn, backend, a.device, compiled_only=True)
        window = (kernel_size, dilation, normalize, float(eps))
        out = impl.forward_op(a, b, *window)
        _ops.save_local(ctx, a, b, out, window, impl.backward_op, num_inputs=7)
        return out

    backward = staticmethod(_ops.local_backward)


class SelfCorrelationFunction(torch.autograd.Function):
    """``SelfCorrelationFunction.apply(x, kernel_size, dilation, normalize, eps, backend)``:
    the symmetric self-correlation, as ``stccl_ops.spatial_correlation``."""

    @staticmethod
    def forward(ctx, x, kernel_size=3, dilation=1, normalize=True, eps=1e-8, backend=None):
        fn = "SelfCorrelationFunction"
        check_tensor(fn, "x", x, (4, 5))
        check_window(fn, kernel_size, dilation, normalize, eps)
        impl = _backends.resolve(fn, backend, x.device, compiled_only=True)
        window = (kernel_size, dilation, normalize, float(eps))
        out = impl.self_forward_op(x, *window)
        _ops.save_self(ctx, x, out, window, impl.self_backward_op, num_inputs=6)
        return out

    backward = staticmethod(_ops.self_backward)
