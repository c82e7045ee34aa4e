"""The Triton backend: kernels in local_correlation.py, registered as
torch.library triton ops, with the autograd of stccl_ops.autograd and the
autocast policy of stccl_ops._registrations.

Usable on CUDA GPUs; under TRITON_INTERPRET=1 also on CPU tensors (the
interpreter runs the kernels with NumPy: slow, for testing). `auto` never
picks it on the CPU.
"""

from typing import Optional

import torch

from .. import _backends, _registrations, autograd
from . import local_correlation as kernels
from .local_correlation import interpreting

OPS = ("triton_local_correlation", "triton_local_correlation_backward",
       "triton_self_correlation", "triton_self_correlation_backward")


class TritonBackend(_backends.Backend):
    name = "triton"

    def unavailable(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu" and interpreting():
            return None
        if device.type != "cuda":
            return f"it runs on cuda tensors (or on the CPU under TRITON_INTERPRET=1), got {device}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is visible"
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "it needs a GPU of compute capability 8.0 or newer"
        return None

    forward_op = property(lambda self: torch.ops.stccl_ops.triton_local_correlation)
    backward_op = property(lambda self: torch.ops.stccl_ops.triton_local_correlation_backward)
    self_forward_op = property(lambda self: torch.ops.stccl_ops.triton_self_correlation)
    self_backward_op = property(
        lambda self: torch.ops.stccl_ops.triton_self_correlation_backward)

    def spatiotemporal(self, v, kernel_size, dilation, temporal_kernel_size, temporal_dilation,
                       frame_stride, normalize, eps):
        return torch.ops.stccl_ops.triton_spatiotemporal_correlation(
            v, kernel_size, dilation, temporal_kernel_size, temporal_dilation, frame_stride,
            normalize, eps)


autograd.register_op_autograd("stccl_ops", *OPS)
autograd.register_spatiotemporal_autograd("stccl_ops", "triton_spatiotemporal_correlation",
                                          "triton_spatiotemporal_correlation_backward")
for _name in ("triton_local_correlation", "triton_self_correlation",
              "triton_spatiotemporal_correlation"):
    _registrations.register_autocast(f"stccl_ops::{_name}", ("cuda",))
_backends.register(TritonBackend())
