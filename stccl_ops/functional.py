"""The public correlation functions. Each checks its arguments, applies the
autocast policy (stccl_ops._registrations) and hands the work to the chosen
backend."""

from typing import NamedTuple, Optional

import torch

from . import _backends
from ._checks import check_frame_stride, check_pair, check_tensor, check_window
from ._registrations import autocast_float32


def local_correlation(a: torch.Tensor, b: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                      normalize: bool = True, eps: float = 1e-8,
                      backend: Optional[str] = None) -> torch.Tensor:
    """Correlation of every pixel of ``a`` with the K x K neighbourhood of the
    same pixel in ``b``.

    Args:
        a, b: (N, C, H, W), same shape, dtype (float16, bfloat16, float32,
            float64) and device; any strides.
        kernel_size: K, odd >= 1. dilation: >= 1, spacing of the window.
        normalize: cosine correlation (channel vectors divided by
            max(||v||, eps), as F.normalize) if True, raw dot product if False.
        backend: 'reference', 'cpp', 'cuda', 'triton', 'cuda_emulated' or 'auto'; None reads
            $STCCL_BACKEND, else 'auto'.

    Returns:
        (N, K*K, H, W) in the input dtype: channel k = i*K + j is the offset
        ((i - K//2) * dilation, (j - K//2) * dilation); neighbours outside the
        image give 0.
    """
    fn = "local_correlation"
    check_tensor(fn, "a", a, (4,))
    check_tensor(fn, "b", b, (4,))
    check_window(fn, kernel_size, dilation, normalize, eps)
    a, b = autocast_float32(a, b)
    check_pair(fn, a, b)
    impl = _backends.resolve(fn, backend, a.device)
    return impl.local(a, b, kernel_size, dilation, normalize, float(eps))


def spatial_correlation(x: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                        normalize: bool = True, eps: float = 1e-8,
                        backend: Optional[str] = None) -> torch.Tensor:
    """Self-correlation ``local_correlation(x, x)`` of a map or of every frame of a clip.

    x: (N, C, H, W) -> (N, K*K, H, W), or (B, T, C, H, W) -> (B, T, K*K, H, W).
    The compiled backends compute half of the offsets and mirror the rest
    (out[p, d] = out[p + d, -d]).
    """
    fn = "spatial_correlation"
    check_tensor(fn, "x", x, (4, 5))
    check_window(fn, kernel_size, dilation, normalize, eps)
    (x,) = autocast_float32(x)
    impl = _backends.resolve(fn, backend, x.device)
    return impl.self_correlation(x, kernel_size, dilation, normalize, float(eps))


def temporal_correlation(v: torch.Tensor, kernel_size: int = 1, dilation: int = 1,
                         normalize: bool = True, eps: float = 1e-8, frame_stride: int = 1,
                         backend: Optional[str] = None) -> torch.Tensor:
    """Correlation of frame t with the K x K neighbourhood in frame t + frame_stride.

    v: (B, T, C, H, W) -> (B, T - frame_stride, K*K, H, W). The frames are
    read in place (no copy of the clip).
    """
    fn = "temporal_correlation"
    check_tensor(fn, "v", v, (5,))
    check_window(fn, kernel_size, dilation, normalize, eps)
    check_frame_stride(fn, frame_stride, v.shape[1])
    (v,) = autocast_float32(v)
    impl = _backends.resolve(fn, backend, v.device)
    return impl.temporal(v, kernel_size, dilation, normalize, float(eps), frame_stride)


class SpatioTemporal(NamedTuple):
    spatial: torch.Tensor   # (B, T, K*K, H, W)
    temporal: torch.Tensor  # (B, T - frame_stride, Kt*Kt, H, W)


def spatiotemporal_correlation(v: torch.Tensor, kernel_size: int = 3, dilation: int = 1,
                               temporal_kernel_size: int = 1, temporal_dilation: int = 1,
                               frame_stride: int = 1, normalize: bool = True, eps: float = 1e-8,
                               backend: Optional[str] = None) -> SpatioTemporal:
    """Both STCCL volumes of a clip v (B, T, C, H, W): the spatial
    self-correlation of every frame and the temporal correlation of frame t
    with frame t + frame_stride. Returns ``SpatioTemporal(spatial, temporal)``.

    The compiled backends compute both from one read of the clip (the op
    stccl_ops::spatiotemporal_correlation) and, in the backward, the clip's
    gradient of both volumes in one pass.
    """
    fn = "spatiotemporal_correlation"
    check_tensor(fn, "v", v, (5,))
    check_window(fn, kernel_size, dilation, normalize, eps)
    check_window(fn, temporal_kernel_size, temporal_dilation, normalize, eps, prefix="temporal_")
    check_frame_stride(fn, frame_stride, v.shape[1])
    (v,) = autocast_float32(v)
    impl = _backends.resolve(fn, backend, v.device)
    return SpatioTemporal(*impl.spatiotemporal(v, kernel_size, dilation, temporal_kernel_size,
                                               temporal_dilation, frame_stride, normalize,
                                               float(eps)))
