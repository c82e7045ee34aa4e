"""stccl_ops.compat against a plain PyTorch statement of the semantics of
spatial-correlation-sampler and mmcv's Correlation (and against those
packages where they are importable: neither is a dependency)."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from stccl_ops import compat

from helpers import DTYPES, assert_close, leaf


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def sampler_semantics(in1, in2, kernel_size=1, patch_size=1, stride=1, padding=0, dilation=1,
                      dilation_patch=1):
    """The sampler's definition, term by term: for every patch shift and
    kernel pixel, input1 at the kernel pixel times input2 at that pixel plus
    the shift, 0 where either lies outside the input; in float64."""
    (kH, kW), (pH, pW), (sH, sW) = pair(kernel_size), pair(patch_size), pair(stride)
    (padH, padW), (dH, dW), (dpH, dpW) = pair(padding), pair(dilation), pair(dilation_patch)
    in1, in2 = in1.double(), in2.double()
    N, C, H, W = in1.shape
    oH = (H + 2 * padH - (kH - 1) * dH - 1) // sH + 1
    oW = (W + 2 * padW - (kW - 1) * dW - 1) // sW + 1
    out = in1.new_zeros(N, pH, pW, oH, oW)
    # Zero margins wide enough for every kernel pixel and shift.
    m = padH + padW + (kH + kW) * (dH + dW) + (pH + pW) * (dpH + dpW)
    p1, p2 = F.pad(in1, (m,) * 4), F.pad(in2, (m,) * 4)
    for ph in range(pH):
        sy = (ph - (pH - 1) // 2) * dpH
        for pw in range(pW):
            sx = (pw - (pW - 1) // 2) * dpW
            for i in range(kH):
                for j in range(kW):
                    y = m - padH + i * dH  # the kernel pixel of output (0, 0)
                    x = m - padW + j * dW
                    rows, cols = slice(y, y + (oH - 1) * sH + 1, sH), slice(x, x + (oW - 1) * sW + 1, sW)
                    rows2 = slice(y + sy, y + sy + (oH - 1) * sH + 1, sH)
                    cols2 = slice(x + sx, x + sx + (oW - 1) * sW + 1, sW)
                    out[:, ph, pw] += (p1[:, :, rows, cols] * p2[:, :, rows2, cols2]).sum(1)
    return out


def random_config(rng):
    """All six parameters, each an int or an (h, w) pair, on a map the kernel fits."""
    def maybe_pair(lo, hi):
        return (rng.randint(lo, hi), rng.randint(lo, hi)) if rng.random() < 0.5 else rng.randint(lo, hi)

    while True:
        cfg = dict(kernel_size=maybe_pair(1, 3), patch_size=maybe_pair(1, 6),
                   stride=maybe_pair(1, 3), padding=maybe_pair(0, 2), dilation=maybe_pair(1, 2),
                   dilation_patch=maybe_pair(1, 3))
        H, W = rng.randint(2, 11), rng.randint(2, 11)
        (kH, kW), (dH, dW), (padH, padW) = (pair(cfg[k]) for k in ("kernel_size", "dilation", "padding"))
        if H + 2 * padH >= (kH - 1) * dH + 1 and W + 2 * padW >= (kW - 1) * dW + 1:
            return cfg, (rng.randint(1, 3), rng.randint(1, 6), H, W)


def check_against_semantics(cfg, shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    out = compat.spatial_correlation_sample(leaf(a), leaf(b), **cfg)
    expected = sampler_semantics(a, b, **cfg)
    assert out.dtype == dtype
    assert_close(out, expected.to(dtype))
    a1, b1, a2, b2 = leaf(a), leaf(b), leaf(a.double()), leaf(b.double())
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(compat.spatial_correlation_sample(a1, b1, **cfg), (a1, b1),
                              grad_out.to(dtype))
    want = torch.autograd.grad(sampler_semantics(a2, b2, **cfg), (a2, b2), grad_out)
    for actual, reference in zip(got, want):
        assert_close(actual, reference.to(dtype), "grad")


@pytest.mark.parametrize("seed", range(24))
def test_random_configurations_float64_and_float32(seed):
    rng = random.Random(seed)
    cfg, shape = random_config(rng)
    for dtype in (torch.float64, torch.float32):
        check_against_semantics(cfg, shape, dtype, seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cfg", [
    dict(patch_size=5, dilation_patch=2),                        # the common setting
    dict(patch_size=(5, 3), dilation_patch=(2, 3), stride=(2, 3)),  # the kept pixels only
    dict(patch_size=(4, 3), dilation_patch=(2, 3)),              # even, rectangular, two dilations
    dict(kernel_size=(3, 2), patch_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=1, patch_size=3, stride=(2, 3), padding=(2, 1)),
])
def test_dtypes(cfg, dtype):
    check_against_semantics(cfg, (2, 7, 9, 8), dtype, seed=hash(str(cfg)) % 1000)


def test_any_strides_read_in_place():
    cfg = dict(kernel_size=2, patch_size=(3, 5), stride=2, padding=1, dilation_patch=2)
    a, b = torch.randn(2, 6, 10, 12), torch.randn(2, 6, 10, 12)
    expected = compat.spatial_correlation_sample(a, b, **cfg)
    last = compat.spatial_correlation_sample(a.to(memory_format=torch.channels_last),
                                             b.to(memory_format=torch.channels_last), **cfg)
    wide_a, wide_b = torch.randn(2, 12, 10, 24), torch.randn(2, 12, 10, 24)
    wide_a[:, ::2, :, ::2], wide_b[:, ::2, :, ::2] = a, b
    sliced = compat.spatial_correlation_sample(wide_a[:, ::2, :, ::2], wide_b[:, ::2, :, ::2], **cfg)
    torch.testing.assert_close(last, expected)
    torch.testing.assert_close(sliced, expected)


def test_gradcheck_float64():
    for cfg in (dict(patch_size=3, dilation_patch=2),
                dict(kernel_size=(2, 3), patch_size=(2, 3), stride=2, padding=1, dilation=(1, 2))):
        a = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
        b = torch.randn(1, 3, 6, 5, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, y: compat.spatial_correlation_sample(x, y, **cfg), (a, b))


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_common_setting_is_the_kernel_and_a_view():
    """Single-pixel kernel, square odd patch, stride 1, padding 0: no copy of
    the inputs, nothing but the correlation op and a view of its output."""
    a, b = torch.randn(2, 16, 12, 10), torch.randn(2, 16, 12, 10)
    with OpLog() as log:
        out = compat.spatial_correlation_sample(a, b, patch_size=7, dilation_patch=2, backend="cpp")
    assert log.ops == ["stccl_ops.local_correlation", "aten.view"], log.ops
    assert out.shape == (2, 7, 7, 12, 10)
    torch.testing.assert_close(out, sampler_semantics(a, b, patch_size=7, dilation_patch=2).float())


def test_output_stride_over_shifts_of_its_multiple_reads_kept_pixels_only():
    a, b = torch.randn(2, 16, 12, 11), torch.randn(2, 16, 12, 11)
    cfg = dict(patch_size=5, dilation_patch=2, stride=2)
    with OpLog() as log:
        out = compat.spatial_correlation_sample(a, b, backend="cpp", **cfg)
    assert log.ops == ["aten.slice"] * 4 + ["stccl_ops.local_correlation", "aten.view"], log.ops
    assert out.shape == (2, 5, 5, 6, 6)
    torch.testing.assert_close(out, sampler_semantics(a, b, **cfg).float())


def test_modules():
    a, b = torch.randn(2, 4, 8, 9), torch.randn(2, 4, 8, 9)
    cfg = dict(kernel_size=3, stride=2, padding=1, dilation=1, dilation_patch=2)
    sampler = compat.SpatialCorrelationSampler(patch_size=5, **cfg)
    mmcv_like = compat.Correlation(max_displacement=2, **cfg)
    expected = compat.spatial_correlation_sample(a, b, patch_size=5, **cfg)
    torch.testing.assert_close(sampler(a, b), expected)
    torch.testing.assert_close(mmcv_like(a, b), expected)
    assert "max_displacement=2" in repr(mmcv_like)
    assert compat.Correlation(max_displacement=0)(a, b).shape == (2, 1, 1, 8, 9)


def test_empty_and_tiny_inputs():
    assert compat.spatial_correlation_sample(torch.randn(0, 3, 5, 5), torch.randn(0, 3, 5, 5),
                                             patch_size=3).shape == (0, 3, 3, 5, 5)
    assert compat.spatial_correlation_sample(torch.randn(2, 3, 0, 5), torch.randn(2, 3, 0, 5),
                                             kernel_size=3, patch_size=3).shape == (2, 3, 3, 0, 3)
    no_channels = compat.spatial_correlation_sample(torch.randn(2, 0, 4, 4),
                                                    torch.randn(2, 0, 4, 4), patch_size=3)
    assert no_channels.shape == (2, 3, 3, 4, 4) and not no_channels.any()
    a, b = torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1)
    cfg = dict(patch_size=(5, 4), kernel_size=3, padding=1)
    torch.testing.assert_close(compat.spatial_correlation_sample(a, b, **cfg),
                               sampler_semantics(a, b, **cfg).float())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(patch_size=2.0), TypeError, "patch_size must be an int"),
    (dict(patch_size=(3, 3, 3)), ValueError, "patch_size must be an int or a pair"),
    (dict(padding=-1), ValueError, "padding must be an integer >= 0"),
    (dict(stride=0), ValueError, "stride must be an integer >= 1"),
    (dict(kernel_size=9), ValueError, "the kernel spans 9 pixels along H"),
    (dict(patch_size=300), ValueError, "patch_size \\(300, 300\\) .* needs a 301 x 301 window"),
])
def test_bad_arguments(kwargs, error, match):
    a = torch.randn(1, 2, 4, 4)
    with pytest.raises(error, match="stccl_ops.compat.spatial_correlation_sample: " + match):
        compat.spatial_correlation_sample(a, a, **kwargs)


def test_bad_tensors_and_displacement():
    a = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="input1 and input2 must have the same shape"):
        compat.spatial_correlation_sample(a, torch.randn(1, 2, 4, 5))
    with pytest.raises(TypeError, match="input1 and input2 must have the same dtype"):
        compat.spatial_correlation_sample(a, a.double())
    with pytest.raises(ValueError, match="input2 must be \\(N, C, H, W\\)"):
        compat.spatial_correlation_sample(a, a[0])
    with pytest.raises(ValueError, match="compat.Correlation: max_displacement must be an integer >= 0"):
        compat.Correlation(max_displacement=-1)(a, a)


def test_torch_compile_fullgraph():
    a, b = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    fn = torch.compile(lambda x, y: compat.spatial_correlation_sample(
        x, y, kernel_size=2, patch_size=5, stride=2, padding=1, dilation_patch=2), fullgraph=True)
    expected = compat.spatial_correlation_sample(a, b, kernel_size=2, patch_size=5, stride=2,
                                                 padding=1, dilation_patch=2)
    torch.testing.assert_close(fn(a, b), expected)


@pytest.mark.parametrize("seed", range(12))
def test_equals_spatial_correlation_sampler(seed):
    """Random configurations of all six parameters against the package itself
    (float32, forward and both gradients); skipped where it is not installed."""
    sampler = pytest.importorskip("spatial_correlation_sampler")
    rng = random.Random(1000 + seed)
    cfg, shape = random_config(rng)
    a, b = leaf(torch.randn(shape)), leaf(torch.randn(shape))
    a2, b2 = leaf(a), leaf(b)
    ours = compat.spatial_correlation_sample(a, b, **cfg)
    theirs = sampler.spatial_correlation_sample(a2, b2, **cfg)
    assert_close(ours, theirs)
    grad_out = torch.randn_like(theirs)
    for mine, other in zip(torch.autograd.grad(ours, (a, b), grad_out),
                           torch.autograd.grad(theirs, (a2, b2), grad_out)):
        assert_close(mine, other, "grad")


def test_equals_mmcv_correlation():
    mmcv_ops = pytest.importorskip("mmcv.ops")
    a, b = torch.randn(2, 8, 9, 10), torch.randn(2, 8, 9, 10)
    cfg = dict(kernel_size=1, max_displacement=3, stride=1, padding=0, dilation=1,
               dilation_patch=2)
    torch.testing.assert_close(compat.Correlation(**cfg)(a, b), mmcv_ops.Correlation(**cfg)(a, b))
