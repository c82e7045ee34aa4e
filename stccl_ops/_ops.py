"""The compiled extension and the torch.library registrations of its ops.

The schemas live in csrc/ops.cpp, the ops' autograd in csrc/autograd.cpp (the
backward is an op of its own, with a kernel per backend). Here each op gets a
fake (meta) kernel for torch.compile and its autocast policy. The backward
functions below call the same backward ops for the autograd.Function drop-ins
and the Triton ops.
"""

import importlib.util
import os

import torch

try:
    from . import _C  # registers torch.ops.stccl_ops.*
    EXTENSION_ERROR = None
except ImportError as error:  # a source checkout that was not built
    _C = None
    EXTENSION_ERROR = error

NAMESPACE = "stccl_ops"
EMULATED_NAMESPACE = "stccl_ops_cuda_emulated"


def _load_cuda_emulated():
    """The CUDA kernels built as host code (stccl_ops._C_cuda_emulated, built
    with STCCL_CUDA_EMULATION=1), registering torch.ops.stccl_ops_cuda_emulated.*;
    $STCCL_CUDA_EMULATED_LIBRARY names another build of it to load instead (a
    sanitizer or memory-counting build, see stccl_ops._cuda_emulation)."""
    path = os.environ.get("STCCL_CUDA_EMULATED_LIBRARY")
    if not path:
        try:
            from . import _C_cuda_emulated
        except ImportError:
            return None
        return _C_cuda_emulated
    spec = importlib.util.spec_from_file_location("_C_cuda_emulated", path)
    if spec is None:
        raise ImportError(f"stccl_ops: STCCL_CUDA_EMULATED_LIBRARY={path!r} is not a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_C_cuda_emulated = _load_cuda_emulated()


def require_extension(backend):
    if _C is None:
        raise ImportError(
            f"stccl_ops: backend '{backend}' needs the compiled extension stccl_ops._C, which "
            f"could not be imported ({EXTENSION_ERROR}). Build it from the source tree with "
            "`pip install --no-build-isolation .` (see README: Install).")


def build_info():
    """How the extension was built: CUDA (and its arch list), OpenMP, CPU SIMD paths.

    Without a built extension: {"extension": False, "error": ...}.
    """
    if _C is None:
        return {"extension": False, "error": str(EXTENSION_ERROR)}
    return {"extension": True, **_C.build_info(), "cuda_emulated": _C_cuda_emulated is not None}


def volume_shape(shape, kernel_size):
    """(..., C, H, W) -> (..., K*K, H, W)."""
    return (*shape[:-3], kernel_size * kernel_size, *shape[-2:])


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "stccl_ops: double backward (the gradient of a correlation's gradient) is not "
        "supported by the compiled backends; use backend='reference' for it")


def local_backward(ctx, grad_out):
    """Backward of a local correlation Function or Python-registered op."""
    a, b, out = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_a, grad_b = ctx.backward_op(grad_out, a, b, out, *ctx.window, need_a, need_b)
    return (grad_a if need_a else None, grad_b if need_b else None) + (None,) * (ctx.num_inputs - 2)


def self_backward(ctx, grad_out):
    """Backward of a self-correlation Function or Python-registered op."""
    x, out = ctx.saved_tensors
    grad_x = ctx.backward_op(grad_out, x, out, *ctx.window)
    return (grad_x,) + (None,) * (ctx.num_inputs - 1)


def save_local(ctx, a, b, out, window, backward_op, num_inputs):
    ctx.window, ctx.backward_op, ctx.num_inputs = window, backward_op, num_inputs
    if any(ctx.needs_input_grad[:2]):
        # Either gradient needs both operands (their norms and each other).
        ctx.save_for_backward(a, b, out)


def save_self(ctx, x, out, window, backward_op, num_inputs):
    ctx.window, ctx.backward_op, ctx.num_inputs = window, backward_op, num_inputs
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(x, out)


def _register(ns):
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

    # Autocast: like F.cosine_similarity, the correlations run in float32 (for
    # direct op callers; the public functions apply the same policy themselves,
    # also on torch versions before register_autocast).
    if hasattr(torch.library, "register_autocast"):
        for name in ("local_correlation", "self_correlation", "temporal_correlation"):
            for device_type in ("cpu", "cuda"):
                torch.library.register_autocast(f"{ns}::{name}", device_type, torch.float32)


if _C is not None:
    _register(NAMESPACE)
if _C_cuda_emulated is not None:
    _register(EMULATED_NAMESPACE)
