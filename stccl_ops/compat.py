"""Drop-in replacements for the correlation layers that optical-flow and video
models already call, computed by this package's kernels:

- ``spatial_correlation_sample`` and ``SpatialCorrelationSampler``: the
  signature and semantics of the spatial-correlation-sampler package;
- ``Correlation``: ``mmcv.ops.Correlation`` (a square patch of
  ``2 * max_displacement + 1`` shifts).

Both compute raw dot products (no normalisation): for every patch shift
(ph, pw) and output pixel (h, w)

    out[n, ph, pw, h, w] = sum over i < kH, j < kW and channels c of
        input1[n, c, y, x] * input2[n, c, y + sy, x + sx],
    y = h * strideH - padH + i * dilationH   (x likewise),
    sy = (ph - (patchH - 1) // 2) * dilation_patchH   (sx likewise),

a term being 0 where either pixel lies outside the input. That is a box sum,
over the kernel, of the single-pixel volume
P[n, s, y, x] = <input1[n, :, y, x], input2[n, :, y + sy, x + sx]>, which is
``local_correlation(input1, input2, K, dilation_patch, normalize=False)``.
What each setting costs:

- single-pixel kernel, square odd patch, one dilation_patch, stride 1,
  padding 0 (FlowNetC, PWC-Net, most correspondence networks): one
  ``local_correlation`` and a view of its output, nothing else;
- a rectangular or even patch, or two different patch dilations: the smallest
  odd square window that holds every shift (at the greatest common divisor of
  the dilations), of which the wanted shifts are a view: K'^2 / (patchH *
  patchW) times the work;
- an output stride with a single-pixel kernel, no padding and patch
  dilations that are multiples of the stride (FlowNetC's stride 2 over shifts
  of 2): the inputs' kept pixels only, as strided views;
- padding: a zero-padded copy of the volume; any other stride: the volume at
  every pixel, then subsampled (stride^2 times the work of the kept pixels);
- a kernel of more than one pixel: a box sum of the volume (a depthwise
  ``conv2d`` of ones, in float32 for the half types).

Unlike the packages they replace, these take float16 and bfloat16 inputs, any
strides, ``torch.compile``, and their gradients are deterministic.
"""

import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int, check_pair, check_tensor
from ._registrations import autocast_float32
from .functional import local_correlation

IntPair = Union[int, Sequence[int]]
# local_correlation's window limit (see the README's semantics).
MAX_WINDOW = 255


def _int_pair(fn: str, name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints, as (h, w), each at least `minimum`."""
    values = tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value, value)
    if len(values) != 2:
        raise ValueError(f"stccl_ops.{fn}: {name} must be an int or a pair of ints, got "
                         f"{value!r}")
    for v in values:
        check_int(fn, name, v, minimum)
    return int(values[0]), int(values[1])


def _output_size(fn: str, axis: str, size: int, kernel: int, dilation: int, padding: int,
                 stride: int) -> int:
    extent = size + 2 * padding - ((kernel - 1) * dilation + 1)
    if size == 0:
        return 0
    if extent < 0:
        raise ValueError(f"stccl_ops.{fn}: the kernel spans {(kernel - 1) * dilation + 1} "
                         f"pixels along {axis} (kernel_size {kernel}, dilation {dilation}), more "
                         f"than the padded input's {size} + 2 * {padding}")
    return extent // stride + 1


def _patch_axis(patch: int, dilation_patch: int) -> Tuple[int, int]:
    """The first shift of a patch axis and the step between shifts."""
    return -((patch - 1) // 2) * dilation_patch, dilation_patch


def _sample(fn: str, input1: torch.Tensor, input2: torch.Tensor, kernel_size: IntPair,
            patch_size: IntPair, stride: IntPair, padding: IntPair, dilation: IntPair,
            dilation_patch: IntPair, backend: Optional[str]) -> torch.Tensor:
    check_tensor(fn, "input1", input1, (4,))
    check_tensor(fn, "input2", input2, (4,))
    input1, input2 = autocast_float32(input1, input2)
    check_pair(fn, input1, input2, "input1", "input2")
    kH, kW = _int_pair(fn, "kernel_size", kernel_size, 1)
    pH, pW = _int_pair(fn, "patch_size", patch_size, 1)
    sH, sW = _int_pair(fn, "stride", stride, 1)
    padH, padW = _int_pair(fn, "padding", padding, 0)
    dH, dW = _int_pair(fn, "dilation", dilation, 1)
    dpH, dpW = _int_pair(fn, "dilation_patch", dilation_patch, 1)
    N, _, H, W = input1.shape
    oH = _output_size(fn, "H", H, kH, dH, padH, sH)
    oW = _output_size(fn, "W", W, kW, dW, padW, sW)
    # An output stride along an axis with a single-pixel kernel, no padding
    # and every shift a multiple of the stride (FlowNetC: shifts of 2, stride
    # 2) reads both inputs on the kept pixels only: strided views, no copy.
    if kH == 1 and padH == 0 and sH > 1 and (pH == 1 or dpH % sH == 0):
        input1, input2 = input1[:, :, ::sH], input2[:, :, ::sH]
        dpH, sH = max(1, dpH // sH), 1
    if kW == 1 and padW == 0 and sW > 1 and (pW == 1 or dpW % sW == 0):
        input1, input2 = input1[..., ::sW], input2[..., ::sW]
        dpW, sW = max(1, dpW // sW), 1
    H, W = input1.shape[-2:]

    # The single-pixel volume over a square window holding every shift: at
    # the gcd of the patch dilations of the axes that have shifts.
    spans = [d for p, d in ((pH, dpH), (pW, dpW)) if p > 1]
    window_dilation = math.gcd(*spans) if spans else 1
    (y_first, y_step), (x_first, x_step) = _patch_axis(pH, dpH), _patch_axis(pW, dpW)
    reach = max(-y_first, y_first + (pH - 1) * y_step, -x_first, x_first + (pW - 1) * x_step)
    radius = reach // window_dilation
    K = 2 * radius + 1
    if K > MAX_WINDOW:
        raise ValueError(f"stccl_ops.{fn}: patch_size {(pH, pW)} with dilation_patch "
                         f"{(dpH, dpW)} needs a {K} x {K} window, more than the {MAX_WINDOW} "
                         f"local_correlation computes")
    volume = local_correlation(input1, input2, K, window_dilation, normalize=False,
                               backend=backend).view(N, K, K, H, W)
    if (K, K) != (pH, pW):
        y0, x0 = radius + y_first // window_dilation, radius + x_first // window_dilation
        ys, xs = max(1, y_step // window_dilation), max(1, x_step // window_dilation)
        volume = volume[:, y0:y0 + (pH - 1) * ys + 1:ys, x0:x0 + (pW - 1) * xs + 1:xs]
    if oH == 0 or oW == 0:
        return volume.new_zeros(N, pH, pW, oH, oW)

    if (kH, kW) == (1, 1):
        if padH or padW:
            volume = F.pad(volume, (padW, padW, padH, padH))
        return volume[..., ::sH, ::sW] if (sH, sW) != (1, 1) else volume
    # A box sum of the volume over the kernel's pixels.
    dtype = volume.dtype
    box_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    planes = volume.reshape(N * pH * pW, 1, H, W).to(box_dtype)
    ones = planes.new_ones(1, 1, kH, kW)
    summed = F.conv2d(planes, ones, stride=(sH, sW), padding=(padH, padW), dilation=(dH, dW))
    return summed.view(N, pH, pW, oH, oW).to(dtype)


def spatial_correlation_sample(input1: torch.Tensor, input2: torch.Tensor,
                               kernel_size: IntPair = 1, patch_size: IntPair = 1,
                               stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1,
                               dilation_patch: IntPair = 1,
                               backend: Optional[str] = None) -> torch.Tensor:
    """spatial-correlation-sampler's ``spatial_correlation_sample``: (N, C, H,
    W) x 2 -> (N, patchH, patchW, oH, oW), oH = (H + 2 * padH - (kH - 1) *
    dilationH - 1) // strideH + 1; every size argument an int or an (h, w)
    pair. ``backend`` as in ``local_correlation``."""
    return _sample("compat.spatial_correlation_sample", input1, input2, kernel_size, patch_size,
                   stride, padding, dilation, dilation_patch, backend)


class SpatialCorrelationSampler(nn.Module):
    """spatial-correlation-sampler's module: forward(input1, input2) is
    ``spatial_correlation_sample`` with the constructor's arguments."""

    def __init__(self, kernel_size: IntPair = 1, patch_size: IntPair = 1, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, dilation_patch: IntPair = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.kernel_size, self.patch_size, self.stride = kernel_size, patch_size, stride
        self.padding, self.dilation, self.dilation_patch = padding, dilation, dilation_patch
        self.backend = backend

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        return _sample("compat.SpatialCorrelationSampler", input1, input2, self.kernel_size,
                       self.patch_size, self.stride, self.padding, self.dilation,
                       self.dilation_patch, self.backend)


class Correlation(nn.Module):
    """``mmcv.ops.Correlation``: forward(input1, input2) -> (N, 2 * md + 1,
    2 * md + 1, oH, oW), md = max_displacement; the sampler's semantics with
    a square patch of 2 * md + 1 shifts."""

    def __init__(self, kernel_size: IntPair = 1, max_displacement: int = 1, stride: IntPair = 1,
                 padding: IntPair = 0, dilation: IntPair = 1, dilation_patch: IntPair = 1,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.kernel_size, self.max_displacement, self.stride = kernel_size, max_displacement, stride
        self.padding, self.dilation, self.dilation_patch = padding, dilation, dilation_patch
        self.backend = backend

    def forward(self, input1: torch.Tensor, input2: torch.Tensor) -> torch.Tensor:
        fn = "compat.Correlation"
        check_int(fn, "max_displacement", self.max_displacement, minimum=0)
        return _sample(fn, input1, input2, self.kernel_size, 2 * self.max_displacement + 1,
                       self.stride, self.padding, self.dilation, self.dilation_patch,
                       self.backend)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, max_displacement={self.max_displacement}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"dilation_patch={self.dilation_patch}")
