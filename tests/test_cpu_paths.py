"""CPU-specific checks: every SIMD build, 64-bit offsets, threads, the build report."""

import pytest
import torch

import stccl_ops
from stccl_ops import _extension, reference

from helpers import (CPU_PATHS, DTYPES, assert_close, check_infinite_and_nan, grads, leaf,
                     needs_extension, with_threads)

pytestmark = needs_extension


@pytest.fixture
def cpu_path(request):
    """The CPU SIMD build to run ("generic" unless parametrized indirectly)."""
    _extension._C._set_cpu_isa(getattr(request, "param", "generic"))
    yield
    _extension._C._set_cpu_isa("auto")


def test_build_info_reports_the_build():
    info = stccl_ops.build_info()
    assert info["extension"] is True
    assert info["torch_version"] == torch.__version__
    assert "generic" in info["cpu_simd_paths"]
    runnable = info["cpu_simd_paths_runnable"]
    assert set(runnable) <= set(info["cpu_simd_paths"]) and "generic" in runnable
    assert info["cpu_simd_path"] == runnable[0]  # the best one this processor runs
    assert isinstance(info["openmp"], bool) and isinstance(info["cuda"], bool)


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K,dilation", [(3, 1), (5, 2), (11, 1)])
def test_every_simd_build_matches_reference(request, cpu_path, dtype, K, dilation):
    assert stccl_ops.build_info()["cpu_simd_path"] == request.node.callspec.params["cpu_path"]
    a = leaf(torch.randn(2, 5, 7, 10, dtype=torch.float64).to(dtype))
    b = leaf(torch.randn(2, 5, 7, 10, dtype=torch.float64).to(dtype))
    g = torch.randn(2, K * K, 7, 10, dtype=torch.float64).to(dtype)
    out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, K, dilation, backend="cpp"),
                     (a, b), g)
    ref, want = grads(lambda x, y: reference.local_correlation(x, y, K, dilation), (a, b), g)
    assert_close(out, ref)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")
    self_out, (gx,) = grads(lambda x: stccl_ops.spatial_correlation(x, K, dilation, backend="cpp"),
                            (a,), g)
    self_ref, (rx,) = grads(lambda x: reference.spatial_correlation(x, K, dilation), (a,), g)
    assert_close(self_out, self_ref)
    assert_close(gx, rx, "grad")


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [256, 100])
def test_half_types_are_staged_exactly(cpu_path, dtype, width):
    """The staging converts half types in registers with integer operations:
    every bit pattern (subnormals, zeros of both signs, infinities, NaNs) must
    come out as the value it is. Raw mode, K = 1, against ones: each output
    is its input (a zero's sign aside: the sum that starts at +0 drops it)."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    rows = patterns.numel() // width
    x = patterns[: rows * width].view(dtype).reshape(1, 1, rows, width)
    out = stccl_ops.local_correlation(x, torch.ones_like(x), 1, normalize=False, backend="cpp")
    assert torch.equal(out.isnan(), x.isnan())
    numbers = ~x.isnan()
    assert torch.equal(out[numbers], x[numbers])


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channels", [1, 16])  # the pixel gather; the chunked one
def test_half_gradients_are_rounded_exactly(cpu_path, dtype, channels):
    """The backward rounds its float gradients to the half type as c10 does
    (to nearest even; overflow to infinity, subnormals, NaN), on runs that
    start anywhere in a 16-byte line. Raw mode, K = 1: grad_a = grad_out * b,
    and the float product of a half value and 1.5 is exact, so the rounding
    alone decides each bit, over every bit pattern of b whose product is a
    finite float (a zero's sign aside: the sum that starts at +0 drops it)."""
    patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    width = 100
    rows = -(-patterns.numel() // (channels * width))
    b = patterns.repeat(2)[: channels * rows * width].view(dtype).reshape(1, channels, rows, width)
    a = torch.ones_like(b, requires_grad=True)
    out = stccl_ops.local_correlation(a, b, 1, normalize=False, backend="cpp")
    g = torch.full_like(out, 1.5)
    (grad_a,) = torch.autograd.grad(out, (a,), g)
    product = g.float() * b.float() + 0.0
    want = product.to(dtype)
    assert grad_a[b.isnan()].isnan().all()
    numbers = product.isfinite()
    assert torch.equal(grad_a.view(torch.int16)[numbers], want.view(torch.int16)[numbers])


def test_wide_vectors_rule_on_both_sides_of_its_threshold():
    """With AVX-512, a call runs the 64-byte build unless its rows take at
    least a quarter more of those vectors' lanes than of 32-byte ones (W of
    17-24 floats: 32 lanes against 24), past the widths the flat layout
    takes; no width of double is past that line (W = 20: 24 against 20)."""
    pick = _extension._C._cpu_isa_for_call
    if "avx512" not in CPU_PATHS:
        assert pick(56, 4) == pick(64, 4) == CPU_PATHS[0]
        return
    assert [pick(W, 4) for W in (16, 17, 20, 24, 25, 33, 40, 56, 64, 72)] == [
        "avx512", "avx2", "avx2", "avx2", "avx512", "avx512", "avx512", "avx512", "avx512", "avx512"]
    assert [pick(W, 8) for W in (17, 20, 28, 44)] == ["avx512"] * 4
    assert pick(7, 4) == "avx512"  # flat
    _extension._C._set_cpu_isa("avx512")
    try:  # a forced build runs every call
        assert pick(56, 4) == "avx512"
    finally:
        _extension._C._set_cpu_isa("auto")


def test_unknown_cpu_path_is_an_error():
    with pytest.raises(RuntimeError, match="unknown CPU path"):
        _extension._C._set_cpu_isa("sse9")


def test_a_build_this_processor_cannot_run_is_refused():
    info = stccl_ops.build_info()
    missing = [isa for isa in info["cpu_simd_paths"] if isa not in info["cpu_simd_paths_runnable"]]
    if not missing:
        pytest.skip("this processor runs every compiled CPU build")
    with pytest.raises(RuntimeError, match="cannot run"):
        _extension._C._set_cpu_isa(missing[0])
    assert stccl_ops.build_info()["cpu_simd_path"] == info["cpu_simd_path"]


def test_offsets_beyond_32_bits():
    """Elements more than 2^31 apart: a (2, C, H, W) float16 view whose second
    image starts 2^31 + 64 elements into its storage (4 GiB, mostly untouched)."""
    storage = torch.empty(2**31 + 64 + 4 * 5 * 6, dtype=torch.float16)
    step = 2**31 + 64
    a = storage.as_strided((2, 4, 5, 6), (step, 30, 6, 1))
    values = torch.randn(2, 4, 5, 6, dtype=torch.float16)
    a.copy_(values)
    b = torch.randn(2, 4, 5, 6, dtype=torch.float16)
    assert_close(stccl_ops.local_correlation(a, b, 3, backend="cpp"),
                 reference.local_correlation(values, b, 3))
    assert_close(stccl_ops.spatial_correlation(a, 3, backend="cpp"),
                 reference.spatial_correlation(values, 3))
    grad_a, = torch.ops.stccl_ops._local_correlation_backward(
        torch.ones(2, 9, 5, 6, dtype=torch.float16), a, b,
        torch.ops.stccl_ops.local_correlation(a, b, 3, 1, True, 1e-8), 3, 1, True, 1e-8, True,
        False)[:1]
    ref_a = leaf(values)
    reference.local_correlation(ref_a, b, 3).sum().backward()
    assert_close(grad_a, ref_a.grad, "grad")
    del storage


@pytest.mark.parametrize("width", [70, 600], ids=["one-tile", "x-tiles"])
def test_many_channels_and_wide_rows(width):
    """Several channel chunks and several vectors per row, odd remainders;
    rows of 600 values are swept by the forward in tiles (256, 256, 88)."""
    a = leaf(torch.randn(1, 300, 5, width, dtype=torch.float64))
    b = leaf(torch.randn(1, 300, 5, width, dtype=torch.float64))
    g = torch.randn(1, 9, 5, width, dtype=torch.float64)
    out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, 3, 3, backend="cpp"), (a, b),
                     g)
    ref, want = grads(lambda x, y: reference.local_correlation(x, y, 3, 3), (a, b), g)
    assert_close(out, ref)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")
    assert_close(stccl_ops.spatial_correlation(a, 5, 2, backend="cpp"),
                 reference.spatial_correlation(a, 5, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [3, 14, 17])
def test_rows_staged_in_whole_vectors_ignore_what_follows(dtype, width):
    """Short contiguous rows are staged in whole SIMD vectors that read past
    the row end: the columns sliced away (NaN here) must not leak in, and the
    last row of the storage (nothing readable after it) takes the exact path."""
    base = torch.randn(2, 6, 5, width + 5, dtype=dtype)
    base[..., width:] = float("nan")
    a = leaf(base[..., :width])
    b = leaf(torch.randn(2, 6, 5, width, dtype=dtype))  # its last row ends its storage
    g = torch.randn(2, 25, 5, width, dtype=dtype)
    values = leaf(a.detach().clone())
    for fn, ref_fn in [
        (lambda x, y: stccl_ops.local_correlation(x, y, 5, backend="cpp"),
         lambda x, y: reference.local_correlation(x, y, 5)),
        (lambda x, y: stccl_ops.local_correlation(y, x, 5, normalize=False, backend="cpp"),
         lambda x, y: reference.local_correlation(y, x, 5, normalize=False)),
    ]:
        out, got = grads(fn, (a, b), g)
        ref, want = grads(ref_fn, (values, b), g)
        assert_close(out, ref)
        for actual, expected in zip(got, want):
            assert_close(actual, expected, "grad")
    assert_close(stccl_ops.spatial_correlation(a, 3, backend="cpp"),
                 reference.spatial_correlation(values, 3))


@pytest.mark.parametrize("frame_stride", [1, 2])
@pytest.mark.parametrize("channels", [3, 700], ids=["whole-band-staging", "chunked-staging"])
@pytest.mark.parametrize("K,dilation,normalize", [(3, 1, True), (5, 2, False)])
def test_temporal_passes_reuse_staged_frames_correctly(frame_stride, channels, K, dilation,
                                                       normalize):
    """Both temporal passes run frame after frame within each band of a clip
    and reuse frames staged by the previous task: several clips and bands
    (H = 37 rows are several bands), and channels past the whole-band staging
    limit (then the forward correlates the two frame views instead)."""
    frames = 5 if channels == 3 else 3
    v = leaf(torch.randn(2, frames, channels, 37, 9, dtype=torch.float64).float())
    g = torch.randn(2, frames - frame_stride, K * K, 37, 9)
    window = dict(kernel_size=K, dilation=dilation, normalize=normalize,
                  frame_stride=frame_stride)
    out, (got,) = grads(lambda x: stccl_ops.temporal_correlation(x, backend="cpp", **window),
                        (v,), g)
    ref, (want,) = grads(lambda x: reference.temporal_correlation(x, **window), (v,), g)
    assert_close(out, ref)
    assert_close(got, want, "grad")


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
def test_temporal_passes_on_strided_clips(cpu_path):
    """Every other frame of a clip, channels last within each frame: the
    temporal passes read frames in place, on every SIMD build."""
    base = torch.randn(2, 9, 11, 13, 5, dtype=torch.float64)
    v = leaf(base[:, ::2].permute(0, 1, 4, 2, 3))
    assert not v.is_contiguous()
    g = torch.randn(2, 4, 9, 11, 13, dtype=torch.float64)
    out, (got,) = grads(lambda x: stccl_ops.temporal_correlation(x, 3, backend="cpp"), (v,), g)
    ref, (want,) = grads(lambda x: reference.temporal_correlation(x, 3), (v,), g)
    assert_close(out, ref)
    assert_close(got, want, "grad")


OPS_AND_REFERENCES = {
    "local": (lambda a, b, **kw: stccl_ops.local_correlation(a, b, 3, **kw),
              lambda a, b: reference.local_correlation(a, b, 3)),
    "self": (lambda x, **kw: stccl_ops.spatial_correlation(x, 3, **kw),
             lambda x: reference.spatial_correlation(x, 3)),
    "temporal": (lambda v, **kw: stccl_ops.temporal_correlation(v, 3, **kw),
                 lambda v: reference.temporal_correlation(v, 3)),
}


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["local", "self", "temporal"])
@pytest.mark.parametrize("shape", [(3, 6, 7, 7), (2, 3, 4, 1100)],
                         ids=["one-run", "run-per-offset"])
def test_results_streamed_as_one_run_or_one_per_offset(cpu_path, dtype, op, shape):
    """A band that is a whole image writes its results as one run when they fit
    SINGLE_RUN_BYTES (7 x 7), else one run per offset and channel (4 x 1100,
    K = 3: 9 * 4 * 1100 floats is more): both sides against the reference."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    inputs = {"local": (x, x.roll(1, 1)), "self": (x,),
              "temporal": (torch.stack([x, x.flip(0), x.roll(1, 1)], 1),)}[op]
    ours, theirs = OPS_AND_REFERENCES[op]
    expected_shape = ours(*inputs, backend="reference").shape
    grad_out = torch.randn(expected_shape, generator=g, dtype=torch.float64).to(dtype)
    out, got = grads(lambda *t: ours(*t, backend="cpp"), tuple(map(leaf, inputs)), grad_out)
    ref, want = grads(theirs, tuple(map(leaf, inputs)), grad_out)
    assert_close(out, ref)
    for mine, expected in zip(got, want):
        assert_close(mine, expected, "grad")


def test_large_results_on_huge_pages_match_the_reference():
    """Results of 32 MiB and more take the madvise(MADV_HUGEPAGE) path, their
    huge pages faulted in by all threads before the kernels write them."""
    a = leaf(torch.randn(1, 3, 272, 272, dtype=torch.float64).float())
    b = leaf(torch.randn(1, 3, 272, 272, dtype=torch.float64).float())
    grad_out = torch.randn(1, 121, 272, 272)  # 34 MiB
    out, got = grads(lambda p, q: stccl_ops.local_correlation(p, q, 11, backend="cpp"), (a, b),
                     grad_out)
    ref, want = grads(lambda p, q: reference.local_correlation(p, q, 11), (leaf(a), leaf(b)),
                      grad_out)
    assert_close(out, ref)
    for mine, theirs in zip(got, want):
        assert_close(mine, theirs, "grad")


@pytest.mark.parametrize("shape, kernel_size, dilation", [
    ((1, 130, 256, 256), 5, 2),  # 32.5 MiB gradients: huge pages
    ((64, 256, 7, 7), 5, 1),     # 3 MiB gradients, 0.3 MiB output; flat layout
    ((2, 37, 40, 33), 3, 1),     # 0.4 MiB gradients; the output (0.09 MiB) is not kept
])
def test_freed_results_are_reused_and_written_whole(shape, kernel_size, dilation):
    """A freed result of 128 KiB or more is kept for the next result of its
    size, with the values it held: poisoned with NaN here, every element of the
    next output and gradients must come from the kernels."""
    def inputs():
        a = leaf(torch.randn(shape, dtype=torch.float64).float())
        b = leaf(torch.randn(shape, dtype=torch.float64).float())
        return a, b

    def run(a, b):
        out = stccl_ops.local_correlation(a, b, kernel_size, dilation=dilation, backend="cpp")
        return (out, *torch.autograd.grad(out, (a, b), torch.ones_like(out)))

    first = run(*inputs())
    pointers = sorted(t.data_ptr() for t in first[1:])
    for result in first:
        result.detach().fill_(float("nan"))
    del first, result
    a, b = inputs()
    out, grad_a, grad_b = run(a, b)
    assert sorted((grad_a.data_ptr(), grad_b.data_ptr())) == pointers
    ref, want = grads(
        lambda p, q: reference.local_correlation(p, q, kernel_size, dilation=dilation),
        (leaf(a), leaf(b)), torch.ones_like(out))
    assert_close(out, ref)
    for mine, theirs in zip((grad_a, grad_b), want):
        assert_close(mine, theirs, "grad")


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("channels, kernel_size", [(4, 7), (24, 5), (24, 3)],
                         ids=["pixel-gather", "rows", "window-3x3"])
@pytest.mark.parametrize("width", [64, 66], ids=["whole-vectors", "partial-vector"])
@pytest.mark.parametrize("op", ["local", "temporal"])
def test_results_streamed_straight_or_through_a_buffer(cpu_path, dtype, channels, kernel_size,
                                                       width, op):
    """Where a band's rows are whole vectors (width 64), the forward streams
    each offset's rows straight into the output and the backward's last step
    its gradients (pixel gather, windows over 3 x 3, and with 64-byte vectors
    the gather of windows up to 3 x 3 too, the clip's gradient as the
    pair's); else (66) they go through a buffer. Into freed results poisoned
    with NaN (every result here is kept: 128 KiB or more), against the
    reference."""
    KK = kernel_size ** 2
    if op == "local":
        shapes, out_shape = [(2, channels, 72, width)] * 2, (2, KK, 72, width)
        mine = lambda p, q: stccl_ops.local_correlation(p, q, kernel_size, backend="cpp")
        theirs = lambda p, q: reference.local_correlation(p, q, kernel_size)
    else:
        shapes, out_shape = [(1, 3, channels, 72, width)], (1, 2, KK, 72, width)
        mine = lambda v: stccl_ops.temporal_correlation(v, kernel_size, backend="cpp")
        theirs = lambda v: reference.temporal_correlation(v, kernel_size)

    def run():
        g = torch.Generator().manual_seed(11)
        inputs = [leaf(torch.randn(shape, generator=g, dtype=torch.float64).to(dtype))
                  for shape in shapes]
        grad_out = torch.randn(out_shape, generator=g, dtype=torch.float64).to(dtype)
        out, got = grads(mine, inputs, grad_out)
        return inputs, grad_out, (out, *got)

    *_, first = run()
    pointers = sorted(t.data_ptr() for t in first)
    for result in first:
        result.detach().fill_(float("nan"))
    del first, result
    inputs, grad_out, (out, *got) = run()
    assert sorted(t.data_ptr() for t in (out, *got)) == pointers
    ref, want = grads(theirs, [leaf(t) for t in inputs], grad_out)
    assert_close(out, ref)
    for mine_grad, their_grad in zip(got, want):
        assert_close(mine_grad, their_grad, "grad")


@pytest.fixture
def cpu_layout(request):
    """The CPU kernels' band layout to force ("auto" unless parametrized)."""
    _extension._C._set_cpu_layout(getattr(request, "param", "auto"))
    yield request.param if hasattr(request, "param") else "auto"
    _extension._C._set_cpu_layout("auto")


def test_layout_rule_on_both_sides_of_its_thresholds():
    """Flat for rows of at most 16 values on images of at most 512 pixels
    (a forward's: 256); windows of at most 3 x 3 with at least 16 channels
    and an image per thread also on images of up to 3600 pixels (a forward)
    or of up to 7200 bytes a channel (a backward), not in a clip's fused
    passes; rows past any of them."""
    is_flat = _extension._C._cpu_layout_is_flat

    def flat(pass_, H, W, N=8, C=64, K=5, threads=2, element_bytes=4):
        return is_flat(pass_, N, C, H, W, K, element_bytes, threads)

    for fwd in ("forward", "clip_forward"):  # K = 5: the narrow-row rule alone
        assert flat(fwd, 7, 7) and flat(fwd, 16, 16) and not flat(fwd, 17, 16)  # 256 pixels
        assert flat(fwd, 1, 16) and not flat(fwd, 1, 17)  # rows of 16 values
        assert not flat(fwd, 8, 1024)
    for bwd in ("backward", "clip_backward"):
        assert flat(bwd, 7, 7) and flat(bwd, 32, 16) and not flat(bwd, 33, 16)  # 512 pixels
        assert not flat(bwd, 1, 17) and not flat(bwd, 8, 1024)
    # the forward's small windows
    assert flat("forward", 60, 60, K=3) and not flat("forward", 61, 60, K=3)  # 3600 pixels
    assert flat("forward", 2, 1800, K=3) and flat("forward", 56, 56, K=1)
    assert not flat("forward", 56, 56, K=5) and not flat("forward", 17, 16, K=5)
    assert flat("forward", 56, 56, K=3, C=16) and not flat("forward", 56, 56, K=3, C=15)
    assert flat("forward", 56, 56, K=3, N=4, threads=4) and not flat("forward", 56, 56, K=3, N=3,
                                                                      threads=4)
    # the backward's: 3600 pixels of a half type, 1800 of float32, 900 of float64
    for element_bytes, (H, W) in ((2, (60, 60)), (4, (40, 45)), (8, (30, 30))):
        assert flat("backward", H, W, K=3, element_bytes=element_bytes)
        assert not flat("backward", H, W + 1, K=3, element_bytes=element_bytes)
        assert flat("backward", 1, H * W, K=1, element_bytes=element_bytes)
        assert not flat("backward", H, W, K=5, element_bytes=element_bytes)
    assert flat("backward", 40, 40, K=3, C=16) and not flat("backward", 40, 40, K=3, C=15)
    assert flat("backward", 40, 40, K=3, N=4, threads=4) and not flat("backward", 40, 40, K=3,
                                                                        N=3, threads=4)
    for clip in ("clip_forward", "clip_backward"):
        assert not flat(clip, 56, 56, K=3, element_bytes=2) and not flat(clip, 20, 20, K=3)
    with pytest.raises(RuntimeError, match="unknown CPU layout"):
        _extension._C._set_cpu_layout("diagonal")
    with pytest.raises(RuntimeError, match="unknown pass"):
        is_flat("sideways", 1, 1, 1, 1, 1, 4, 1)


def test_row_groups_rule_on_both_sides_of_its_threshold():
    """The flat forward of a 3 x 3 window with dilation 1 takes row groups
    where at most an eighth of the lanes of each row's vectors is lost (16
    lanes: W of 14 to 16, 28 to 32, 42 to 48, ...; float64's 8: 7 to 8, 14 to
    16, ...)."""
    pays = _extension._C._cpu_row_groups_pay
    for W in (14, 16, 28, 31, 32, 42, 48, 56, 60, 64):
        assert pays(W, 3, 1, 16), W
    for W in (1, 7, 8, 12, 13, 17, 20, 24, 27, 40, 41, 55):
        assert not pays(W, 3, 1, 16), W
    assert pays(7, 3, 1, 8) and pays(14, 3, 1, 8) and not pays(6, 3, 1, 8) and not pays(9, 3, 1, 8)
    assert not pays(56, 5, 1, 16) and not pays(56, 1, 1, 16) and not pays(56, 3, 2, 16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size,K,dilation", [((3, 37, 29, 31), 3, 1), ((2, 20, 13, 40), 3, 2),
                                             ((2, 17, 56, 56), 1, 1), ((2, 19, 12, 21), 5, 1),
                                             ((2, 16, 13, 12), 3, 1), ((3, 18, 2, 20), 3, 1),
                                             ((2, 16, 7, 7), 3, 1)])
def test_forward_is_bitwise_the_same_in_both_layouts(dtype, size, K, dilation):
    """The forward's layout rule reads the thread count (flat has one task per
    image); the results stay independent of it because each output is summed
    in the same order either way: in rows, flat, and flat in row groups
    (groups of three rows and the last one or two; forced where the rule
    would not take them)."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(size, generator=g).to(dtype)
    b = torch.randn(size, generator=g).to(dtype)
    # a's last image read in place to its storage's end, and with more after
    # it (the row groups read past a row's end: the last image of a fresh
    # tensor takes the flat blocks instead)
    a_inside = torch.randn((size[0] + 1, *size[1:]), generator=g).to(dtype)[:size[0]]
    a_inside.copy_(a)
    results = {}
    try:
        for layout in ("rows", "flat", "groups"):
            _extension._C._set_cpu_layout(layout)
            results[layout] = (stccl_ops.local_correlation(a, b, K, dilation, backend="cpp"),
                               stccl_ops.local_correlation(a_inside, b, K, dilation,
                                                           backend="cpp"),
                               stccl_ops.spatial_correlation(a, K, dilation, backend="cpp"))
    finally:
        _extension._C._set_cpu_layout("auto")
    for layout in ("flat", "groups"):
        for rows, other in zip(results["rows"], results[layout]):
            assert torch.equal(rows, other)
    assert torch.equal(results["rows"][0], results["rows"][1])
    # auto on 2 images: flat on one thread and rows on three where K <= 3
    # (narrow images: flat on any)
    N, C, H, W = a[:2].shape
    is_flat = _extension._C._cpu_layout_is_flat
    bytes_ = a.element_size()
    assert (is_flat("forward", N, C, H, W, K, bytes_, 1) != is_flat("forward", N, C, H, W, K,
                                                                     bytes_, 3)
            or K > 3 or (W <= 16 and H * W <= 256))
    for threads in (1, 3):
        with with_threads(threads):
            out = stccl_ops.local_correlation(a[:2], b[:2], K, dilation, backend="cpp")
        assert torch.equal(out, results["rows"][0][:2])


@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("cpu_layout", ["rows", "flat"], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("K", [3, 5, 7])
def test_forward_reads_a_in_place_as_it_stages_it(cpu_path, cpu_layout, dtype, normalize, K):
    """The forward reads a contiguous a where it lies (its whole vectors past
    each row's end too; in the flat layout the register blocks take its
    squares, and the native builds read half types there too, widened in
    registers) and stages a channels_last one; the results are the same bits,
    and the images' last rows (nothing readable after the storage's last one)
    take the staged path. K = 7 takes one window row per block with AVX2, 3
    and 5 several."""
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 33, 11, 13, generator=g).to(dtype)
    b = torch.randn(3, 33, 11, 13, generator=g).to(dtype)
    a_last = a.contiguous(memory_format=torch.channels_last)
    in_place = stccl_ops.local_correlation(a, b, K, normalize=normalize, backend="cpp")
    staged = stccl_ops.local_correlation(a_last, b, K, normalize=normalize, backend="cpp")
    assert torch.equal(in_place, staged)
    assert_close(in_place, reference.local_correlation(a, b, K, normalize=normalize))


@pytest.mark.parametrize("cpu_layout", ["flat"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("size,K,dilation", [((3, 33, 14, 14), 3, 1), ((2, 20, 13, 17), 3, 2),
                                             ((2, 18, 12, 12), 5, 1), ((2, 16, 9, 9), 1, 1),
                                             ((2, 16, 3, 4), 3, 1)])
def test_raw_flat_backward_reads_inside_in_place_as_it_stages(cpu_layout, dtype, size, K,
                                                              dilation):
    """The raw flat backward reads contiguous operands where they lie for the
    vectors whose window is inside the image and stages only the edges; a
    channels_last pair is staged whole. Same bits, and as the reference
    (images too small for any inside vector: staged whole either way)."""
    g = torch.Generator().manual_seed(8)
    a, b = (torch.randn(size, generator=g).to(dtype) for _ in range(2))
    grad_out = torch.randn(size[0], K * K, *size[2:], generator=g).to(dtype)

    def gradients(p, q):
        return grads(lambda x, y: stccl_ops.local_correlation(x, y, K, dilation, False,
                                                              backend="cpp"),
                     (leaf(p), leaf(q)), grad_out)[1]

    in_place = gradients(a, b)
    last = torch.channels_last
    staged = gradients(a.contiguous(memory_format=last), b.contiguous(memory_format=last))
    want = grads(lambda x, y: reference.local_correlation(x, y, K, dilation, False),
                 (leaf(a), leaf(b)), grad_out)[1]
    for mine, other, expected in zip(in_place, staged, want):
        assert torch.equal(mine, other)
        assert_close(mine, expected, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("size,K,dilation", [((2, 17, 29, 31), 3, 1), ((2, 20, 13, 40), 3, 2),
                                             ((2, 16, 24, 24), 1, 1)])
def test_backward_is_bitwise_the_same_in_both_layouts(dtype, normalize, size, K, dilation):
    """As the forward: the backward's rule for small windows reads the thread
    count, and each gradient sums its window's terms in the same order in
    either layout (both operands' and a self-correlation's)."""
    g = torch.Generator().manual_seed(6)
    a = torch.randn(size, generator=g).to(dtype)
    b = torch.randn(size, generator=g).to(dtype)
    grad_out = torch.randn(size[0], K * K, *size[2:], generator=g).to(dtype)

    def gradients():
        local = grads(lambda p, q: stccl_ops.local_correlation(p, q, K, dilation, normalize,
                                                                backend="cpp"),
                      (leaf(a), leaf(b)), grad_out)[1]
        self_ = grads(lambda x: stccl_ops.spatial_correlation(x, K, dilation, normalize,
                                                               backend="cpp"),
                      (leaf(a),), grad_out)[1]
        return local + self_

    results = {}
    try:
        for layout in ("rows", "flat"):
            _extension._C._set_cpu_layout(layout)
            results[layout] = gradients()
    finally:
        _extension._C._set_cpu_layout("auto")
    for rows, flat in zip(results["rows"], results["flat"]):
        assert torch.equal(rows, flat)
    N, C, H, W = size
    is_flat = _extension._C._cpu_layout_is_flat
    flat_on = [is_flat("backward", N, C, H, W, K, a.element_size(), t) for t in (1, 3)]
    assert flat_on == [True, False]  # auto: flat on one thread, rows on three
    for threads in (1, 3):
        with with_threads(threads):
            for mine, rows in zip(gradients(), results["rows"]):
                assert torch.equal(mine, rows)


def test_pixel_gather_rule_on_both_sides_of_its_thresholds():
    """The backward's pixel gather for up to 8 channels, 16 from K = 5 and 32
    from K = 7; forcing it ("pixels") reaches 64 channels, chunks past that."""
    pays = _extension._C._cpu_pixel_gather_pays
    assert pays(1, 1) and pays(8, 3) and not pays(9, 3)
    assert pays(16, 5) and not pays(17, 5) and pays(32, 7) and not pays(33, 7)
    assert pays(32, 21) and not pays(64, 21)
    a, b = torch.randn(1, 65, 6, 7, dtype=torch.float64), torch.randn(1, 65, 6, 7, dtype=torch.float64)
    g = torch.randn(1, 9, 6, 7, dtype=torch.float64)
    _extension._C._set_cpu_layout("pixels")
    try:  # 65 channels: the chunked gather, forced or not
        out, got = grads(lambda p, q: stccl_ops.local_correlation(p, q, 3, backend="cpp"),
                         (leaf(a), leaf(b)), g)
    finally:
        _extension._C._set_cpu_layout("auto")
    ref, want = grads(lambda p, q: reference.local_correlation(p, q, 3), (leaf(a), leaf(b)), g)
    for mine, expected in zip(got, want):
        assert_close(mine, expected, "grad")


LAYOUT_SHAPES = {
    "7x7": ((2, 37, 7, 7), 3, 1),
    "window-past-map": ((2, 5, 3, 2), 7, 2),  # every neighbour row wraps or falls off
    "1x1": ((3, 9, 1, 1), 3, 1),
    "one-row": ((2, 6, 1, 13), 5, 1),
    "one-column": ((2, 6, 11, 1), 3, 2),
    "16x16-K9": ((1, 20, 16, 16), 9, 1),
    "dilated-K5": ((2, 10, 13, 19), 5, 2),  # the row pairs (rr, rr + 2), one row unpaired
    "dilation-3": ((1, 7, 11, 23), 5, 3),
    "tall-narrow": ((1, 6, 40, 5), 5, 1),
    "two-blocks": ((2, 12, 9, 21), 7, 1),  # the pixel gather's channels in blocks of 6
}


@pytest.mark.parametrize("cpu_layout", ["rows", "flat", "pixels"], indirect=True)
@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["local", "self", "temporal"])
@pytest.mark.parametrize("shape", list(LAYOUT_SHAPES), ids=list(LAYOUT_SHAPES))
def test_both_layouts_match_the_reference(cpu_layout, cpu_path, dtype, op, shape):
    """Each layout forced on every shape class it can meet (the rule picks one
    per call; forcing covers the other): forward and gradients of every op."""
    size, K, dilation = LAYOUT_SHAPES[shape]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randn(*size, generator=g, dtype=torch.float64).to(dtype)
    call, ref_call = {
        "local": (lambda a, b, **kw: stccl_ops.local_correlation(a, b, K, dilation, **kw),
                  lambda a, b: reference.local_correlation(a, b, K, dilation)),
        "self": (lambda a, **kw: stccl_ops.spatial_correlation(a, K, dilation, **kw),
                 lambda a: reference.spatial_correlation(a, K, dilation)),
        "temporal": (lambda v, **kw: stccl_ops.temporal_correlation(v, K, dilation, **kw),
                     lambda v: reference.temporal_correlation(v, K, dilation)),
    }[op]
    inputs = {"local": (x, y), "self": (x,), "temporal": (torch.stack([x, y, x.flip(0)], 1),)}[op]
    grad_out = torch.randn(ref_call(*inputs).shape, generator=g,
                           dtype=torch.float64).to(dtype)
    out, got = grads(lambda *t: call(*t, backend="cpp"), tuple(map(leaf, inputs)), grad_out)
    ref, want = grads(ref_call, tuple(map(leaf, inputs)), grad_out)
    assert_close(out, ref)
    for mine, expected in zip(got, want):
        assert_close(mine, expected, "grad")


@pytest.mark.parametrize("cpu_layout", ["rows", "flat", "pixels"], indirect=True)
@pytest.mark.parametrize("view", ["channels_last", "column-slice", "expanded"])
def test_both_layouts_on_views(cpu_layout, view):
    """channels_last images are read flat in place; a column slice (rows not
    adjacent) falls back to rows; an expanded map (all strides 0 but C's)."""
    base = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    a = {"channels_last": base.contiguous(memory_format=torch.channels_last),
         "column-slice": base[..., 1:8],
         "expanded": base[:1, :, :1, :1].expand(2, 6, 7, 9)}[view]
    b = torch.randn(a.shape, dtype=torch.float64)
    g = torch.randn(2, 9, *a.shape[-2:], dtype=torch.float64)
    out, got = grads(lambda p, q: stccl_ops.local_correlation(p, q, 3, backend="cpp"),
                     (leaf(a), leaf(b)), g)
    ref, want = grads(lambda p, q: reference.local_correlation(p, q, 3),
                      (leaf(a.contiguous()), leaf(b)), g)
    assert_close(out, ref)
    for mine, expected in zip(got, want):
        assert_close(mine, expected, "grad")


@pytest.mark.parametrize("cpu_layout", ["pixels"], indirect=True)  # whatever the rule picks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("width", [256, 512])  # rows of 1-4 KiB: the longer rows alias
def test_pixel_gather_weights_in_place_or_copied_alike(cpu_layout, dtype, width):
    """The pixel gather reads grad_a's weights where grad_out lies unless its
    planes lie a multiple of 64 KiB apart with rows of 2 KiB or more (then it
    copies them): a contiguous grad_out of 64 KiB a plane and the same
    values in planes one row taller agree bit for bit, and with the reference."""
    rows = 64 * 1024 // (width * dtype.itemsize)
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(1, 3, rows, width, generator=g, dtype=dtype) for _ in range(2))
    out = torch.ops.stccl_ops.local_correlation(a, b, 3, 1, True, 1e-8)
    grad_out = torch.randn(out.shape, generator=g, dtype=dtype)
    taller = torch.zeros(1, 9, rows + 1, width, dtype=dtype)
    taller[:, :, :rows] = grad_out
    results = [torch.ops.stccl_ops._local_correlation_backward(go, a, b, out, 3, 1, True, 1e-8,
                                                               True, True)
               for go in (grad_out, taller[:, :, :rows])]
    for x, y in zip(*results):
        assert torch.equal(x, y)
    _, want = grads(lambda p, q: reference.local_correlation(p, q, 3), (leaf(a), leaf(b)),
                    grad_out)
    for mine, expected in zip(results[0], want):
        assert_close(mine, expected, "grad")


@pytest.mark.parametrize("cpu_layout", ["rows", "flat"], indirect=True)
@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_backward_of_strided_volumes_as_of_contiguous(cpu_layout, cpu_path, dtype, normalize):
    """grad_out and out as channels_last or x-strided views give the bits of
    their contiguous copies (the weights read contiguous rows in place,
    converted in registers, and convert strided ones a row at a time first),
    a and b's and a self-correlation's."""
    g = torch.Generator().manual_seed(9)
    N, C, H, W, K = 3, 20, 7, 9, 3
    a = torch.randn(N, C, H, W, generator=g).to(dtype)
    b = torch.randn(N, C, H, W, generator=g).to(dtype)
    grad_out = torch.randn(N, K * K, H, W, generator=g).to(dtype)
    backward = torch.ops.stccl_ops._local_correlation_backward
    out = torch.ops.stccl_ops.local_correlation(a, b, K, 1, normalize, 1e-8)
    self_out = torch.ops.stccl_ops.self_correlation(a, K, 1, normalize, 1e-8)

    def views(t):  # channels_last; x stride 2 (every other column of a wider copy)
        wide = torch.zeros(*t.shape[:-1], 2 * W, dtype=dtype)
        wide[..., ::2] = t
        return [t.contiguous(memory_format=torch.channels_last), wide[..., ::2]]

    want = backward(grad_out, a, b, out, K, 1, normalize, 1e-8, True, True)
    self_backward = torch.ops.stccl_ops._self_correlation_backward
    want_self = self_backward(grad_out, a, self_out, K, 1, normalize, 1e-8)
    for g_view, o_view, s_view in zip(views(grad_out), views(out), views(self_out)):
        for mine, expected in zip(backward(g_view, a, b, o_view, K, 1, normalize, 1e-8, True,
                                           True), want):
            assert torch.equal(mine, expected)
        assert torch.equal(self_backward(g_view, a, s_view, K, 1, normalize, 1e-8), want_self)
    ref, ref_grads = grads(lambda p, q: reference.local_correlation(p, q, K, 1, normalize),
                           (leaf(a), leaf(b)), grad_out)
    for mine, expected in zip(want, ref_grads):
        assert_close(mine, expected, "grad")


@pytest.mark.parametrize("cpu_layout", ["rows", "flat", "pixels"], indirect=True)
def test_both_layouts_are_bitwise_deterministic_across_thread_counts(cpu_layout):
    channels = 5 if cpu_layout == "pixels" else 70  # the pixel gather takes at most 8
    a = torch.randn(5, channels, 9, 9)
    b = torch.randn(5, channels, 9, 9)
    g = torch.randn(5, 25, 9, 9)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.ops.stccl_ops.local_correlation(a, b, 5, 1, True, 1e-8)
            ga, gb = torch.ops.stccl_ops._local_correlation_backward(g, a, b, out, 5, 1, True,
                                                                     1e-8, True, True)
            results.append((out, ga, gb))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for x, y in zip(results[0], other):
            assert torch.equal(x, y)



@pytest.mark.parametrize("cpu_layout", ["rows", "flat", "pixels"], indirect=True)
@pytest.mark.parametrize("cpu_path", CPU_PATHS, indirect=True)
@pytest.mark.parametrize("op", ["local", "self", "temporal"])
@pytest.mark.parametrize("at_row_ends", [False, True])
def test_infinite_and_nan_inputs_as_the_reference(cpu_layout, cpu_path, op, at_row_ends):
    """See check_infinite_and_nan: the flat layout's backward reads the next
    row's pixel with a weight of 0 where a window passes a row's end, so with
    values at row ends only its forward is compared."""
    check_infinite_and_nan("cpp", op, at_row_ends,
                           gradients=not (cpu_layout == "flat" and at_row_ends))
