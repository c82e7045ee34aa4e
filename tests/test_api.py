"""The public API: the nn.Modules, and every bad input a clear
TypeError/ValueError naming function and argument, raised before any kernel
runs (the C++ ops repeat the essential checks)."""

import math

import pytest
import torch

import stccl_ops
from stccl_ops import reference

from helpers import assert_close, needs_extension

X = torch.randn(1, 2, 4, 4)
CLIP = torch.randn(1, 3, 2, 4, 4)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpp", marks=needs_extension)])
@pytest.mark.parametrize("call,error,pattern", [
    (lambda be: stccl_ops.local_correlation([1.0], X, backend=be), TypeError,
     r"local_correlation: a must be a torch.Tensor, got list"),
    (lambda be: stccl_ops.local_correlation(X, None, backend=be), TypeError,
     r"local_correlation: b must be a torch.Tensor, got NoneType"),
    (lambda be: stccl_ops.local_correlation(X[0], X[0], backend=be), ValueError,
     r"local_correlation: a must be \(N, C, H, W\), got shape \(2, 4, 4\)"),
    (lambda be: stccl_ops.local_correlation(X, torch.randn(1, 2, 4, 5), backend=be), ValueError,
     r"a and b must have the same shape, got \(1, 2, 4, 4\) and \(1, 2, 4, 5\)"),
    (lambda be: stccl_ops.local_correlation(X, X.double(), backend=be), TypeError,
     r"a and b must have the same dtype, got torch.float32 and torch.float64"),
    (lambda be: stccl_ops.local_correlation(X, X.to("meta"), backend=be), ValueError,
     r"a and b must be on the same device, got cpu and meta"),
    (lambda be: stccl_ops.local_correlation(X.long(), X.long(), backend=be), TypeError,
     r"a must have dtype float16, bfloat16, float32 or float64, got torch.int64"),
    (lambda be: stccl_ops.local_correlation(X.to(torch.complex64), X, backend=be), TypeError,
     r"a must have dtype .* got torch.complex64"),
    (lambda be: stccl_ops.local_correlation(X.to_sparse(), X, backend=be), ValueError,
     r"a must be a dense \(strided\) tensor, got layout torch.sparse_coo"),
    (lambda be: stccl_ops.local_correlation(
        torch.nested.nested_tensor([X[0], X[0]]), X, backend=be), ValueError,
     r"a must be a dense tensor, got a nested tensor"),
    (lambda be: stccl_ops.local_correlation(X, X, 4, backend=be), ValueError,
     r"local_correlation: kernel_size must be a positive odd integer, got 4"),
    (lambda be: stccl_ops.local_correlation(X, X, 0, backend=be), ValueError,
     r"kernel_size must be a positive odd integer, got 0"),
    (lambda be: stccl_ops.local_correlation(X, X, -3, backend=be), ValueError,
     r"kernel_size must be a positive odd integer, got -3"),
    (lambda be: stccl_ops.local_correlation(X, X, True, backend=be), TypeError,
     r"kernel_size must be an int, got bool True"),
    (lambda be: stccl_ops.local_correlation(X, X, 3.0, backend=be), TypeError,
     r"kernel_size must be an int, got float 3.0"),
    (lambda be: stccl_ops.local_correlation(X, X, 3, 0, backend=be), ValueError,
     r"local_correlation: dilation must be an integer >= 1, got 0"),
    (lambda be: stccl_ops.local_correlation(X, X, 3, 1, 1, backend=be), TypeError,
     r"normalize must be a bool, got int"),
    (lambda be: stccl_ops.local_correlation(X, X, eps=0.0, backend=be), ValueError,
     r"local_correlation: eps must be a finite number > 0, got 0.0"),
    (lambda be: stccl_ops.local_correlation(X, X, eps=-1e-8, backend=be), ValueError,
     r"eps must be a finite number > 0, got -1e-08"),
    (lambda be: stccl_ops.local_correlation(X, X, eps=math.nan, backend=be), ValueError,
     r"eps must be a finite number > 0, got nan"),
    (lambda be: stccl_ops.local_correlation(X, X, eps="1e-8", backend=be), TypeError,
     r"eps must be a float, got str"),
    (lambda be: stccl_ops.spatial_correlation(torch.randn(2, 3), backend=be), ValueError,
     r"spatial_correlation: x must be \(N, C, H, W\) or \(B, T, C, H, W\), got shape \(2, 3\)"),
    (lambda be: stccl_ops.spatial_correlation(X, 2, backend=be), ValueError,
     r"spatial_correlation: kernel_size must be a positive odd integer, got 2"),
    (lambda be: stccl_ops.temporal_correlation(X, backend=be), ValueError,
     r"temporal_correlation: v must be \(B, T, C, H, W\), got shape \(1, 2, 4, 4\)"),
    (lambda be: stccl_ops.temporal_correlation(CLIP, frame_stride=3, backend=be), ValueError,
     r"temporal_correlation: frame_stride must be in \[1, T-1\] = \[1, 2\], got 3"),
    (lambda be: stccl_ops.temporal_correlation(CLIP, frame_stride=0, backend=be), ValueError,
     r"frame_stride must be an integer >= 1, got 0"),
    (lambda be: stccl_ops.temporal_correlation(CLIP[:, :1], backend=be), ValueError,
     r"v must hold at least 2 frames \(T >= 2\), got T = 1"),
    (lambda be: stccl_ops.spatiotemporal_correlation(CLIP, temporal_kernel_size=2, backend=be),
     ValueError, r"spatiotemporal_correlation: temporal_kernel_size must be a positive odd"),
    (lambda be: stccl_ops.local_correlation(X, X, backend=be + "x"), ValueError,
     r"local_correlation: backend must be one of reference, cpp, cuda, triton, cuda_emulated or 'auto', got"),
])
def test_public_errors(backend, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(backend)


def test_cpp_backend_rejects_other_devices():
    with pytest.raises(ValueError, match="backend 'cpp' cannot be used: it runs on cpu tensors, "
                                         "got meta"):
        stccl_ops.local_correlation(X.to("meta"), X.to("meta"), backend="cpp")


@needs_extension
@pytest.mark.parametrize("call,pattern", [
    (lambda: torch.ops.stccl_ops.local_correlation(X, X, 4, 1, True, 1e-8),
     "kernel_size must be a positive odd integer, got 4"),
    (lambda: torch.ops.stccl_ops.local_correlation(X, X, 3, 0, True, 1e-8),
     "dilation must be >= 1, got 0"),
    (lambda: torch.ops.stccl_ops.local_correlation(X, X, 3, 1, True, 0.0), "eps must be > 0"),
    (lambda: torch.ops.stccl_ops.local_correlation(X, X[:, :1], 3, 1, True, 1e-8),
     "b must have the shape of a"),
    (lambda: torch.ops.stccl_ops.local_correlation(X, X.double(), 3, 1, True, 1e-8),
     "b must have the dtype of a"),
    (lambda: torch.ops.stccl_ops.local_correlation(X[0], X[0], 3, 1, True, 1e-8),
     r"a must be \(N, C, H, W\) or \(B, T, C, H, W\)"),
    (lambda: torch.ops.stccl_ops.self_correlation(X.int(), 3, 1, True, 1e-8),
     "x must be float16, bfloat16, float32 or float64"),
    (lambda: torch.ops.stccl_ops._local_correlation_backward(
        torch.ones(1, 4, 4, 4), X, X, torch.ones(1, 9, 4, 4), 3, 1, True, 1e-8, True, True),
     "grad_out must have shape"),
    (lambda: torch.ops.stccl_ops.temporal_correlation(CLIP, 3, 1, True, 1e-8, 3),
     r"frame_stride must be in \[1, T-1\] = \[1, 2\], got 3"),
    (lambda: torch.ops.stccl_ops.temporal_correlation(X, 3, 1, True, 1e-8, 1),
     r"v must be \(B, T, C, H, W\)"),
    (lambda: torch.ops.stccl_ops._self_correlation_backward(
        torch.ones(1, 9, 4, 4), X, torch.ones(1, 9, 4, 4).double(), 3, 1, True, 1e-8),
     "out must match the inputs' dtype and device"),
])
def test_cpp_op_checks(call, pattern):
    with pytest.raises(RuntimeError, match=pattern):
        call()


def test_modules():
    v = torch.randn(2, 4, 3, 6, 6)
    st = stccl_ops.SpatioTemporalCorrelation(3, temporal_kernel_size=3, frame_stride=2)(v)
    assert_close(st.spatial, reference.spatial_correlation(v, 3))
    assert_close(st.temporal, reference.temporal_correlation(v, 3, frame_stride=2))
    assert_close(stccl_ops.SpatialCorrelation(5, 2)(v), reference.spatial_correlation(v, 5, 2))
    assert_close(stccl_ops.TemporalCorrelation(frame_stride=3)(v),
                 reference.temporal_correlation(v, frame_stride=3))
    a, b = v[:, 0], v[:, 1]
    assert_close(stccl_ops.LocalCorrelation(3, normalize=False)(a, b),
                 reference.local_correlation(a, b, 3, normalize=False))
    assert "frame_stride=2" in repr(stccl_ops.SpatioTemporalCorrelation(frame_stride=2))
