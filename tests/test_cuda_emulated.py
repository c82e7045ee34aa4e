"""The CUDA kernels executed on the CPU (backend `cuda_emulated`): every kernel
and every branch of csrc/cuda/forward.cu and backward.cu against the reference.

test_correctness.py runs its shared grid on this backend too; the cases here
aim at the CUDA code's own branches, which the shared grid's small maps do not
all reach. Which case reaches which branch (see the kernels' launchers):

| case                | kernels and branches                                              |
| ------------------- | ----------------------------------------------------------------- |
| local K=1..9        | forward_staged at buckets G = 1, 9, 25, 49, 81; weights, gather_staged, inverse_norms |
| local K=11, 13      | several offset groups per launch sequence (81 + 40, 81 + 81 + 7)  |
| self K=3..13        | self staging (a = b tile), mirror, Grad::Self weights, G up to 81 + 9 |
| K=31 dilation 2     | forward_unstaged and gather_unstaged (halo beyond shared memory)   |
| grid caps           | image loops past gridDim.z, grid-stride loops past gridDim.x       |
| shapes              | maps smaller than a tile and not a multiple of it, 1x1, C = 1, C past a chunk |
| layouts             | channels_last, sliced, expanded operands; clip views (temporal)   |
| spatiotemporal      | spatiotemporal (both tiles, groups of both windows, frames with no successor), clip_weights (absent terms), clip_gather (three tiles, zeroed ones, several groups, float16 partial sums), the composed passes (halo beyond shared memory), grid caps |
"""

import pytest
import torch

import stccl_ops
from stccl_ops import reference

from helpers import DTYPES, assert_close, grads, leaf, require_cuda_emulated

pytestmark = pytest.mark.cuda_emulated
BACKEND = "cuda_emulated"


@pytest.fixture(autouse=True)
def emulated():
    require_cuda_emulated()


def rand(shape, dtype, seed, layout="contiguous"):
    g = torch.Generator().manual_seed(seed)
    if layout == "sliced":  # every other channel and column of a larger map
        big = list(shape)
        big[-3] *= 2
        big[-1] *= 2
        t = torch.randn(big, generator=g, dtype=torch.float64)[..., ::2, :, 1::2]
        return t.to(dtype)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        t = t.to(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def check_local(shape, K, dilation, dtype, normalize=True, layout="contiguous", seed=0,
                which=("a", "b")):
    a = leaf(rand(shape, dtype, seed, layout), "a" in which)
    b = leaf(rand(shape, dtype, seed + 1, layout), "b" in which)
    g = rand((shape[0], K * K, *shape[2:]), dtype, seed + 2)
    window = (K, dilation, normalize, 1e-8)
    out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, *window, backend=BACKEND),
                     (a, b), g)
    ref, want = grads(lambda x, y: reference.local_correlation(x, y, *window), (a, b), g)
    assert_close(out, ref)
    for actual, expected in zip(got, want):
        assert_close(actual, expected, "grad")


def check_self(shape, K, dilation, dtype, normalize=True, layout="contiguous", seed=0):
    x = leaf(rand(shape, dtype, seed, layout))
    g = rand((*shape[:-3], K * K, *shape[-2:]), dtype, seed + 2)
    window = (K, dilation, normalize, 1e-8)
    out, (gx,) = grads(lambda v: stccl_ops.spatial_correlation(v, *window, backend=BACKEND), (x,),
                       g)
    ref, (rx,) = grads(lambda v: reference.spatial_correlation(v, *window), (x,), g)
    assert_close(out, ref)
    assert_close(gx, rx, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 3, 5, 7, 9])
def test_staged_forward_at_every_bucket(dtype, K):
    check_local((2, 6, 11, 37), K, 1, dtype, seed=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [11, 13])
def test_windows_of_several_offset_groups(dtype, K):
    """More offsets than the largest bucket: the forward and the gather run in
    groups, the gather carrying float32 partial sums between them."""
    check_local((1, 5, 9, 14), K, 1, dtype, seed=K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,dilation", [(3, 1), (5, 2), (9, 1), (11, 1), (13, 1)])
def test_self_correlation_staging_mirror_and_self_gradient(dtype, K, dilation):
    check_self((2, 7, 10, 35), K, dilation, dtype, seed=K + dilation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["local", "self"])
def test_unstaged_kernels_for_halos_beyond_shared_memory(dtype, op):
    # K = 31, dilation 2: a halo of 30 pixels, a b tile of 68 x 92 that does
    # not fit the shared-memory budget even for one channel.
    if op == "local":
        check_local((1, 3, 5, 9), 31, 2, dtype, seed=31)
    else:
        check_self((1, 3, 5, 9), 31, 2, dtype, seed=32)


@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "raw"])
def test_image_and_grid_stride_loops_past_the_grid(normalize):
    module = stccl_ops._extension._C_cuda_emulated
    module.set_grid_limits(flat_x=1, z=2)
    try:
        check_local((5, 4, 6, 40), 3, 2, torch.float32, normalize, seed=5)
        check_self((5, 4, 6, 40), 5, 1, torch.float32, normalize, seed=6)
    finally:
        module.set_grid_limits()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape,K,normalize", [
    ((1, 4, 5, 7), 3, True),      # smaller than one 8 x 32 tile
    ((2, 3, 19, 45), 5, True),    # tiles that overhang both edges
    ((3, 2, 1, 1), 3, True),      # 1 x 1 maps: every neighbour outside
    ((2, 1, 6, 9), 3, False),     # C = 1 (raw: a cosine of one channel is +-1)
    ((1, 40, 6, 9), 3, True),     # more channels than one staged chunk
    ((1, 70, 9, 33), 7, False),   # several chunks, wide window, raw
], ids=["small", "overhang", "1x1", "c1", "c40", "c70_k7"])
def test_map_sizes_and_channel_counts(dtype, shape, K, normalize):
    check_local(shape, K, 1, dtype, normalize, seed=sum(shape))
    check_self(shape, K, 1, dtype, normalize, seed=sum(shape) + 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_strided_operands(dtype, layout):
    check_local((2, 5, 9, 13), 3, 1, dtype, layout=layout, seed=3)
    check_self((2, 5, 9, 13), 5, 1, dtype, layout=layout, seed=4)


@pytest.mark.parametrize("which", [("a",), ("b",)], ids=["grad_a", "grad_b"])
def test_one_sided_gradients(which):
    check_local((2, 6, 7, 12), 5, 1, torch.float64, which=which, seed=9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frame_stride,K", [(1, 3), (2, 1)])
def test_temporal_on_clip_views(dtype, frame_stride, K):
    v = leaf(rand((2, 4, 6, 7, 10), dtype, 12, "channels_last"))
    g = rand((2, 4 - frame_stride, K * K, 7, 10), dtype, 13)
    window = dict(kernel_size=K, frame_stride=frame_stride)
    out, (gv,) = grads(lambda x: stccl_ops.temporal_correlation(x, backend=BACKEND, **window),
                       (v,), g)
    ref, (rv,) = grads(lambda x: reference.temporal_correlation(x, **window), (v,), g)
    assert_close(out, ref)
    assert_close(gv, rv, "grad")


def test_zero_vectors_and_empty_tensors():
    a = rand((1, 4, 6, 6), torch.float32, 21)
    a[:, :, 1:3, 2:5] = 0
    check_local(tuple(a.shape), 3, 1, torch.float32, seed=21)
    x = leaf(a)
    y = stccl_ops.spatial_correlation(x, 3, backend=BACKEND)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (y[:, :, 1:3, 2:5] == 0).all()
    e = leaf(torch.randn(0, 3, 4, 4))
    out = stccl_ops.local_correlation(e, e, 3, backend=BACKEND)
    assert out.shape == (0, 9, 4, 4)
    out.sum().backward()
    assert e.grad.shape == e.shape


def test_bitwise_deterministic_across_runs():
    a, b = leaf(rand((2, 9, 12, 40), torch.float32, 1)), leaf(rand((2, 9, 12, 40), torch.float32, 2))
    g = rand((2, 25, 12, 40), torch.float32, 3)
    runs = []
    for _ in range(2):
        out, got = grads(lambda x, y: stccl_ops.local_correlation(x, y, 5, 1, backend=BACKEND),
                         (a, b), g)
        runs.append((out, *got))
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_gradcheck_float64():
    opts = dict(dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(1, 3, 4, 5, **opts), torch.randn(1, 3, 4, 5, **opts)
    assert torch.autograd.gradcheck(
        lambda x, y: stccl_ops.local_correlation(x, y, 3, 2, backend=BACKEND), (a, b))
    assert torch.autograd.gradcheck(
        lambda x: stccl_ops.spatial_correlation(x, 3, 1, backend=BACKEND), (a,))


def test_ops_pass_opcheck():
    ops = torch.ops.stccl_ops_cuda_emulated
    a, b = torch.randn(2, 3, 5, 6, requires_grad=True), torch.randn(2, 3, 5, 6, requires_grad=True)
    torch.library.opcheck(ops.local_correlation, (a, b, 3, 1, True, 1e-8))
    torch.library.opcheck(ops.self_correlation, (a, 3, 1, True, 1e-8))
    v = torch.randn(1, 3, 2, 5, 6, requires_grad=True)
    torch.library.opcheck(ops.temporal_correlation, (v, 3, 1, True, 1e-8, 1))


@pytest.mark.slow
def test_maps_taller_than_65535_tile_rows():
    """Tiles are numbered along the grid's x axis: a map of more than 65535
    rows of 8-pixel tiles (a grid y beyond the GPU's limit) still launches."""
    a = rand((1, 2, 8 * 65536 + 3, 1), torch.float32, 50)
    b = rand((1, 2, 8 * 65536 + 3, 1), torch.float32, 51)
    out = torch.ops.stccl_ops_cuda_emulated.local_correlation(a, b, 1, 1, True, 1e-8)
    assert_close(out, reference.local_correlation(a, b, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("K,dilation", [(3, 1), (13, 1), (31, 2)], ids=["k3", "k13_groups",
                                                                        "k31_unstaged"])
def test_half_types_accumulate_in_float32_and_round_once(dtype, K, dilation):
    """The contract is float32 accumulation: on half inputs, every kernel must
    give exactly the float32 kernels' result on the same values, rounded once.
    A partial sum stored in the half type between offset groups breaks it."""
    ops = torch.ops.stccl_ops_cuda_emulated
    shape = (1, 6, 9, 14)
    a, b = rand(shape, dtype, 40), rand(shape, dtype, 41)
    g = rand((1, K * K, 9, 14), dtype, 42)
    window = (K, dilation, True, 1e-8)
    out = ops.local_correlation(a, b, *window)
    out32 = ops.local_correlation(a.float(), b.float(), *window)
    assert torch.equal(out, out32.to(dtype))
    got = ops._local_correlation_backward(g, a, b, out, *window, True, True)
    want = ops._local_correlation_backward(g.float(), a.float(), b.float(), out.float(), *window,
                                           True, True)
    for actual, expected in zip(got, want):
        assert torch.equal(actual, expected.to(dtype)), (actual.double() - expected.double()).abs().max()
    self_out = ops.self_correlation(a, *window)
    self_grad = ops._self_correlation_backward(g, a, self_out, *window)
    expected = ops._self_correlation_backward(g.float(), a.float(), self_out.float(), *window)
    assert torch.equal(self_grad, expected.to(dtype))


# (B, T, C, H, W), (K, dilation, Kt, temporal dilation, frame_stride), layout
CLIP_CASES = {
    "stccl": ((2, 4, 5, 9, 35), (3, 1, 3, 1, 1), "contiguous"),
    # 41 + 81 forward offsets (two launches), 81 + 2 * 81 weights (several gathers)
    "groups": ((1, 2, 3, 9, 11), (9, 1, 9, 1, 1), "contiguous"),
    # frame 1 is in no pair: spatial term alone, zeroed successor and predecessor tiles
    "no-pair": ((1, 3, 4, 6, 7), (5, 1, 3, 2, 2), "contiguous"),
    # channels innermost in each frame (staging along channels), several chunks
    "channels-last": ((1, 3, 40, 6, 9), (3, 1, 1, 1, 1), "channels_last"),
    # a halo beyond shared memory: the composed self and temporal passes
    "halo-beyond-smem": ((1, 2, 2, 5, 6), (3, 20, 3, 1, 1), "contiguous"),
}


def check_clip(case, dtype, grads_of=("spatial", "temporal")):
    shape, (K, d, Kt, dt, s), layout = CLIP_CASES[case]
    v = rand(shape, dtype, sum(shape))
    if layout == "channels_last":
        v = v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    x, r = leaf(v), leaf(v)
    got = stccl_ops.spatiotemporal_correlation(x, K, d, Kt, dt, s, backend=BACKEND)
    want = (reference.spatial_correlation(r, K, d), reference.temporal_correlation(r, Kt, dt,
                                                                                   frame_stride=s))
    assert_close(got.spatial, want[0])
    assert_close(got.temporal, want[1])
    picks = [i for i, name in enumerate(("spatial", "temporal")) if name in grads_of]
    upstream = [rand(want[i].shape, dtype, i + 7) for i in picks]
    (mine,) = torch.autograd.grad([got[i] for i in picks], x, upstream)
    (expected,) = torch.autograd.grad([want[i] for i in picks], r, upstream)
    assert_close(mine, expected, "grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_spatiotemporal_kernels(case, dtype):
    check_clip(case, dtype)


@pytest.mark.parametrize("grads_of", [("spatial",), ("temporal",)])
def test_spatiotemporal_kernels_one_volume(grads_of):
    check_clip("stccl", torch.float32, grads_of)


def test_spatiotemporal_kernels_past_the_grid():
    module = stccl_ops._extension._C_cuda_emulated
    module.set_grid_limits(flat_x=1, z=2)
    try:
        check_clip("no-pair", torch.float32)
    finally:
        module.set_grid_limits()
