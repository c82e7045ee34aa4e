"""Argument checks of the public entry points: typed errors naming the function,
the argument, what was expected and what was given, before any kernel runs."""

import math
import numbers

import torch

from ._registrations import volume_shape

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SHAPES = {4: "(N, C, H, W)", 5: "(B, T, C, H, W)"}


def check_tensor(fn, name, t, ranks):
    """A dense floating tensor of one of `ranks` dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"stccl_ops.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise ValueError(f"stccl_ops.{fn}: {name} must be a dense tensor, got a nested tensor")
    if t.layout != torch.strided:
        raise ValueError(f"stccl_ops.{fn}: {name} must be a dense (strided) tensor, got layout "
                         f"{t.layout}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"stccl_ops.{fn}: {name} must have dtype float16, bfloat16, float32 or "
                        f"float64, got {t.dtype}")
    if t.dim() not in ranks:
        expected = " or ".join(_SHAPES[r] for r in ranks)
        raise ValueError(f"stccl_ops.{fn}: {name} must be {expected}, got shape {tuple(t.shape)}")


def check_pair(fn, a, b, a_name="a", b_name="b"):
    """b has the shape, dtype and device of a."""
    if a.device != b.device:
        raise ValueError(f"stccl_ops.{fn}: {a_name} and {b_name} must be on the same device, got "
                         f"{a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"stccl_ops.{fn}: {a_name} and {b_name} must have the same dtype, got "
                        f"{a.dtype} and {b.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"stccl_ops.{fn}: {a_name} and {b_name} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_volume(fn, name, volume, operand, kernel_size):
    """A correlation volume of `operand` (grad_out, a saved output): shape
    (..., K*K, H, W), the operand's dtype and device."""
    expected = volume_shape(operand.shape, kernel_size)
    if (tuple(volume.shape) != expected or volume.dtype != operand.dtype
            or volume.device != operand.device):
        raise ValueError(f"stccl_ops.{fn}: {name} must be {expected} in {operand.dtype} on "
                         f"{operand.device}, got {tuple(volume.shape)} in {volume.dtype} on "
                         f"{volume.device}")


def check_int(fn, name, value, minimum=1, odd=False):
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        raise TypeError(f"stccl_ops.{fn}: {name} must be an int, got {type(value).__name__} "
                        f"{value!r}")
    if value < minimum or (odd and value % 2 == 0):
        what = "a positive odd integer" if odd else f"an integer >= {minimum}"
        raise ValueError(f"stccl_ops.{fn}: {name} must be {what}, got {value}")


def check_window(fn, kernel_size, dilation, normalize, eps, prefix=""):
    check_int(fn, prefix + "kernel_size", kernel_size, odd=True)
    check_int(fn, prefix + "dilation", dilation)
    if not isinstance(normalize, bool):
        raise TypeError(f"stccl_ops.{fn}: normalize must be a bool, got "
                        f"{type(normalize).__name__}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"stccl_ops.{fn}: eps must be a float, got {type(eps).__name__}")
    if not (0 < eps < math.inf):  # also false for NaN; works on a traced SymFloat
        raise ValueError(f"stccl_ops.{fn}: eps must be a finite number > 0, got {eps}")


def check_frame_stride(fn, frame_stride, frames):
    check_int(fn, "frame_stride", frame_stride)
    if frames < 2:
        raise ValueError(f"stccl_ops.{fn}: v must hold at least 2 frames (T >= 2), got T = "
                         f"{frames}")
    if frame_stride > frames - 1:
        raise ValueError(f"stccl_ops.{fn}: frame_stride must be in [1, T-1] = [1, {frames - 1}], "
                         f"got {frame_stride}")
