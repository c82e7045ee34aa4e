"""The Triton backend: kernels in local_correlation.py, registered as
torch.library triton ops with the shared autograd formula of stccl_ops._ops.

Usable on CUDA GPUs; under TRITON_INTERPRET=1 also on CPU tensors (the
interpreter runs the kernels with NumPy: slow, for testing). `auto` never
picks it on the CPU.
"""

import os

import torch

from .. import _backends, _ops
from . import local_correlation as kernels

OPS = ("triton_local_correlation", "triton_local_correlation_backward",
       "triton_self_correlation", "triton_self_correlation_backward")


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(_backends.Backend):
    name = "triton"

    def unavailable(self, device):
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


def _register_autograd():
    ops = torch.ops.stccl_ops

    def setup_local(ctx, inputs, output):
        a, b, *window = inputs
        _ops.save_local(ctx, a, b, output, tuple(window), ops.triton_local_correlation_backward,
                        len(inputs))

    def setup_self(ctx, inputs, output):
        x, *window = inputs
        _ops.save_self(ctx, x, output, tuple(window), ops.triton_self_correlation_backward,
                       len(inputs))

    torch.library.register_autograd("stccl_ops::triton_local_correlation", _ops.local_backward,
                                    setup_context=setup_local)
    torch.library.register_autograd("stccl_ops::triton_self_correlation", _ops.self_backward,
                                    setup_context=setup_self)
    for name in ("triton_local_correlation_backward", "triton_self_correlation_backward"):
        torch.library.register_autograd(f"stccl_ops::{name}", _ops._no_double_backward,
                                        setup_context=lambda ctx, inputs, output: None)
    for name in ("triton_local_correlation", "triton_self_correlation"):
        torch.library.register_autocast(f"stccl_ops::{name}", "cuda", torch.float32)


_register_autograd()
_backends.register(TritonBackend())
