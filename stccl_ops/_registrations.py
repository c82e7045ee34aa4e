"""What torch.library needs beyond the kernels, for every op of the package in
one place: fake (meta) kernels for torch.compile, and the autocast policy.

Autocast policy: like F.cosine_similarity, a correlation runs in float32 when
autocast is on for the inputs' device (inputs of mixed half/float dtypes are
fine then); outside autocast the inputs' own dtype is kept. The public
functions apply it themselves (``autocast_float32``); the ops get it
registered for direct callers of torch.ops.
"""

import torch

from . import _extension

AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")


def autocast_float32(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in float32 when autocast is on for their device, else as given."""
    device_type = tensors[0].device.type
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return tuple(t.float() for t in tensors)
    return tensors


def register_autocast(qualname: str, device_types: tuple[str, ...] = AUTOCAST_DEVICE_TYPES):
    """The autocast policy for the forward op `qualname`."""
    for device_type in device_types:
        torch.library.register_autocast(qualname, device_type, torch.float32)


def volume_shape(shape: torch.Size, kernel_size: int) -> tuple[int, ...]:
    """(..., C, H, W) -> (..., K*K, H, W)."""
    return (*shape[:-3], kernel_size * kernel_size, *shape[-2:])


def spatiotemporal_fake(v: torch.Tensor, kernel_size: int, temporal_kernel_size: int,
                        frame_stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (spatial, temporal) volumes of a clip (B, T, C, H, W), empty."""
    B, T, C, H, W = v.shape
    return (v.new_empty(B, T, kernel_size * kernel_size, H, W),
            v.new_empty(B, T - frame_stride, temporal_kernel_size * temporal_kernel_size, H, W))


def _register_extension_ops(ns: str) -> None:
    """Fake kernels and autocast of the C++/CUDA ops (csrc/ops.h) in namespace `ns`."""

    @torch.library.register_fake(f"{ns}::local_correlation")
    def _(a, b, kernel_size, dilation, normalize, eps):
        return a.new_empty(volume_shape(a.shape, kernel_size))

    @torch.library.register_fake(f"{ns}::self_correlation")
    def _(x, kernel_size, dilation, normalize, eps):
        return x.new_empty(volume_shape(x.shape, kernel_size))

    @torch.library.register_fake(f"{ns}::_local_correlation_backward")
    def _(grad_out, a, b, out, kernel_size, dilation, normalize, eps, need_grad_a, need_grad_b):
        return (a.new_empty(a.shape) if need_grad_a else None,
                b.new_empty(b.shape) if need_grad_b else None)

    @torch.library.register_fake(f"{ns}::_self_correlation_backward")
    def _(grad_out, x, out, kernel_size, dilation, normalize, eps):
        return x.new_empty(x.shape)

    @torch.library.register_fake(f"{ns}::temporal_correlation")
    def _(v, kernel_size, dilation, normalize, eps, frame_stride):
        B, T, C, H, W = v.shape
        return v.new_empty(B, T - frame_stride, kernel_size * kernel_size, H, W)

    @torch.library.register_fake(f"{ns}::_temporal_correlation_backward")
    def _(grad_out, v, out, kernel_size, dilation, normalize, eps, frame_stride):
        return v.new_empty(v.shape)

    @torch.library.register_fake(f"{ns}::spatiotemporal_correlation")
    def _(v, kernel_size, dilation, temporal_kernel_size, temporal_dilation, frame_stride,
          normalize, eps):
        return spatiotemporal_fake(v, kernel_size, temporal_kernel_size, frame_stride)

    @torch.library.register_fake(f"{ns}::_spatiotemporal_correlation_backward")
    def _(grad_spatial, grad_temporal, v, spatial, temporal, kernel_size, dilation,
          temporal_kernel_size, temporal_dilation, frame_stride, normalize, eps):
        return v.new_empty(v.shape)

    for name in ("local_correlation", "self_correlation", "temporal_correlation",
                 "spatiotemporal_correlation"):
        register_autocast(f"{ns}::{name}")


if _extension._C is not None:
    _register_extension_ops(_extension.NAMESPACE)
if _extension._C_cuda_emulated is not None:
    _register_extension_ops(_extension.EMULATED_NAMESPACE)
